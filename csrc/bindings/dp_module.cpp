// ant_core._dp: the interval-clustering solver for Python (numpy in, numpy out, no torch).
// Every entry point releases the GIL while it computes. std::invalid_argument -> ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "ant/costs.hpp"
#include "ant/interval_dp.hpp"

namespace py = pybind11;

namespace {

using Array = py::array_t<double, py::array::c_style | py::array::forcecast>;

ant::Method parse_method(const std::string& m) {
  if (m == "exact") return ant::Method::Exact;
  if (m == "monge") return ant::Method::Monge;
  throw std::invalid_argument("method must be 'exact' or 'monge', got '" + m + "'");
}

py::dict to_dict(const ant::Partition& p) {
  py::array_t<int64_t> bounds(static_cast<py::ssize_t>(p.boundaries.size()));
  std::copy(p.boundaries.begin(), p.boundaries.end(), bounds.mutable_data());
  py::array_t<double> by_k(static_cast<py::ssize_t>(p.costs_by_k.size()));
  std::copy(p.costs_by_k.begin(), p.costs_by_k.end(), by_k.mutable_data());
  py::dict d;
  d["boundaries"] = bounds;
  d["cost"] = p.cost;
  d["costs_by_k"] = by_k;
  d["fast_path"] = p.fast_path;
  return d;
}

int64_t square_size(const Array& m, const char* name) {
  if (m.ndim() != 2 || m.shape(0) != m.shape(1))
    throw std::invalid_argument(std::string(name) + " must be a square 2-D matrix");
  return m.shape(0);
}

py::dict solve_series(const Array& values, const std::string& kind, int64_t k, int64_t min_size,
                      int64_t max_size, const std::string& method) {
  if (values.ndim() != 1) throw std::invalid_argument("values must be 1-D");
  const int64_t T = values.shape(0);
  const ant::Method m = parse_method(method);
  const ant::SizeBounds b{min_size, max_size};
  ant::Partition p;
  {
    py::gil_scoped_release release;
    if (kind == "abs") {
      p = ant::solve(ant::AbsDeviationCost(values.data(), T), T, k, b, m);
    } else if (kind == "sse") {
      p = ant::solve(ant::SquaredErrorCost(values.data(), T), T, k, b, m);
    } else {
      throw std::invalid_argument("kind must be 'abs' or 'sse', got '" + kind + "'");
    }
  }
  return to_dict(p);
}

py::dict solve_matrix(const Array& cost, int64_t k, int64_t min_size, int64_t max_size,
                      const std::string& method) {
  const int64_t T = square_size(cost, "cost_matrix");
  const ant::Method m = parse_method(method);
  ant::Partition p;
  {
    py::gil_scoped_release release;
    p = ant::solve(ant::MatrixCost(cost.data(), T), T, k, ant::SizeBounds{min_size, max_size}, m);
  }
  return to_dict(p);
}

bool matrix_is_monge(const Array& cost) {
  const int64_t T = square_size(cost, "cost_matrix");
  py::gil_scoped_release release;
  return ant::is_monge(ant::MatrixCost(cost.data(), T), T);
}

Array affinity_costs(const Array& affinity, const std::string& centre) {
  const int64_t T = square_size(affinity, "affinity");
  ant::AffinityCentre c;
  if (centre == "middle")
    c = ant::AffinityCentre::Middle;
  else if (centre == "medoid")
    c = ant::AffinityCentre::Medoid;
  else if (centre == "average")
    c = ant::AffinityCentre::Average;
  else
    throw std::invalid_argument("centre must be 'middle', 'medoid' or 'average', got '" +
                                centre + "'");
  Array out({T, T});
  {
    py::gil_scoped_release release;
    const std::vector<double> C = ant::affinity_cost_matrix(affinity.data(), T, c);
    std::copy(C.begin(), C.end(), out.mutable_data());
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_dp, m) {
  m.doc() = "Exact interval-clustering dynamic program (ant-core C++ core).";
  m.def("solve_series", &solve_series, py::arg("values"), py::arg("kind"), py::arg("k"),
        py::arg("min_size") = 1, py::arg("max_size") = 0, py::arg("method") = "exact",
        "Cluster a 1-D series with the 'abs' (deviation from the middle index; monotone series) "
        "or 'sse' (squared error around the mean) cost.");
  m.def("solve_matrix", &solve_matrix, py::arg("cost"), py::arg("k"), py::arg("min_size") = 1,
        py::arg("max_size") = 0, py::arg("method") = "exact",
        "Cluster with a dense T x T cost matrix, cost[l, r] for the inclusive interval l..r.");
  m.def("is_monge", &matrix_is_monge, py::arg("cost"),
        "Whether a T x T interval cost matrix satisfies the quadrangle inequality.");
  m.def("affinity_cost_matrix", &affinity_costs, py::arg("affinity"), py::arg("centre"),
        "Interval cost matrix of an affinity objective ('middle', 'medoid' or 'average').");
}

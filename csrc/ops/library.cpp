// ant_core._C: the schemas of every ant_core torch op, and the Python module stub.
// Kernels register per device with TORCH_LIBRARY_IMPL in their own files; fake (meta) kernels
// and autograd are registered from Python (ant_core/losses.py, ant_core/_extension.py) or C++
// (csrc/ops/grouped_mse_autograd.cpp).
#include <Python.h>
#include <torch/library.h>

// Importing ant_core._C runs the static registrations below; the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(ant_core, m) {
  // Fused grouped MSE. Returns (group_loss (K,), sample_mse (B,), group_count (K,) int64):
  //   sample_mse[i] = mean over non-batch dims of (pred[i] - target[i])^2 (unweighted),
  //   group_loss[k] = mean_{i: groups[i] = k} weight[i] * sample_mse[i]  (0 for an empty group).
  // Losses are float32 (float64 for float64 inputs).
  m.def(
      "grouped_mse(Tensor pred, Tensor target, Tensor groups, int num_groups, Tensor? weight) "
      "-> (Tensor, Tensor, Tensor)");
  // Backward of grouped_mse with respect to pred (and target when need_grad_target; otherwise
  // the second output is an empty tensor). grad_sample may be None (sample_mse unused).
  m.def(
      "grouped_mse_backward(Tensor grad_group, Tensor? grad_sample, Tensor pred, Tensor target, "
      "Tensor groups, Tensor group_count, Tensor? weight, bool need_grad_target) "
      "-> (Tensor, Tensor)");
  // Exact interval DP for a batch of dense cost matrices (B, T, T) (cost[b, l, r] for the
  // inclusive interval l..r; max_size 0 = unbounded). Returns (boundaries (B, k + 1) int64,
  // costs_by_k (B, k) float64).
  m.def("interval_dp_batched(Tensor costs, int k, int min_size, int max_size) -> (Tensor, Tensor)");
}

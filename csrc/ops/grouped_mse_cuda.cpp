// CUDA dispatch of ant_core::grouped_mse / grouped_mse_backward: checks, allocation through the
// caching allocator, device guard and current stream; the kernels are in csrc/cuda/grouped_mse.cu.
// Compiled only when setup.py builds the CUDA kernels (WITH_CUDA).
#ifdef WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "cuda/grouped_mse.h"

namespace ant_core {
namespace grouped_mse_detail {  // defined in grouped_mse.cpp
at::ScalarType accumulate_type(const at::Tensor& pred, const at::Tensor& target);
void check_forward_inputs(const at::Tensor& pred, const at::Tensor& target,
                          const at::Tensor& groups, int64_t num_groups,
                          const std::optional<at::Tensor>& weight);
void check_backward_inputs(const at::Tensor& grad_group,
                           const std::optional<at::Tensor>& grad_sample,
                           const at::Tensor& pred, const at::Tensor& target,
                           const at::Tensor& groups, const at::Tensor& group_count,
                           const std::optional<at::Tensor>& weight);
}  // namespace grouped_mse_detail

namespace {

cuda::DType kernel_dtype(at::ScalarType type) {
  switch (type) {
    case at::kHalf:
      return cuda::DType::F16;
    case at::kBFloat16:
      return cuda::DType::BF16;
    case at::kDouble:
      return cuda::DType::F64;
    default:
      return cuda::DType::F32;
  }
}

cuda::IndexType kernel_index_type(const at::Tensor& groups) {
  return groups.scalar_type() == at::kLong ? cuda::IndexType::I64 : cuda::IndexType::I32;
}

int sm_count(int device) {
  static std::mutex mutex;
  static std::map<int, int> counts;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = counts.find(device);
  if (it != counts.end()) return it->second;
  int count = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
  TORCH_CHECK(err == cudaSuccess, "grouped_mse: cudaDeviceGetAttribute failed: ",
              cudaGetErrorString(err));
  counts.emplace(device, count);
  return count;
}

// The forward kernel's "last block" ticket counter; it must be 0 when the kernel starts, and the
// kernel's last block resets it to 0. Outside CUDA graph capture: one counter per (device, stream),
// zero-initialised once (at::zeros on that stream) and cached for the life of the process (the
// map is leaked on purpose: no CUDA frees after the driver shuts down), so a call costs no memset;
// kernels on one stream never overlap, so they never share it. During graph capture a fresh zeroed
// counter is taken from the graph's pool instead (its fill is one more node of the graph): a
// cached counter could be garbage when first created inside a capture (the fill only runs at
// replay) and a replay may run concurrently with eager work on the capturing stream.
at::Tensor ticket_counter(const c10::cuda::CUDAStream& stream) {
  const auto options = at::TensorOptions().dtype(at::kInt).device(at::kCUDA, stream.device_index());
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  const cudaError_t err = cudaStreamIsCapturing(stream.stream(), &capture);
  TORCH_CHECK(err == cudaSuccess, "grouped_mse: cudaStreamIsCapturing failed: ",
              cudaGetErrorString(err));
  if (capture != cudaStreamCaptureStatusNone) return at::zeros({1}, options);

  static std::mutex mutex;
  static auto* counters = new std::map<std::pair<int, int64_t>, at::Tensor>();
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(static_cast<int>(stream.device_index()),
                                  static_cast<int64_t>(stream.id()));
  auto it = counters->find(key);
  if (it == counters->end()) it = counters->emplace(key, at::zeros({1}, options)).first;
  return it->second;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_mse_cuda(
    const at::Tensor& pred_in, const at::Tensor& target_in, const at::Tensor& groups_in,
    int64_t num_groups, const std::optional<at::Tensor>& weight_in) {
  grouped_mse_detail::check_forward_inputs(pred_in, target_in, groups_in, num_groups, weight_in);
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const at::Tensor groups = groups_in.contiguous();
  const at::Tensor weight = weight_in.has_value() ? weight_in->contiguous() : at::Tensor();

  const int64_t batch = pred.size(0);
  const int64_t per_sample = pred.numel() / batch;
  const auto acc_options = pred.options().dtype(grouped_mse_detail::accumulate_type(pred, target));
  at::Tensor group_loss = at::empty({num_groups}, acc_options);
  at::Tensor sample_mse = at::empty({batch}, acc_options);
  at::Tensor group_count = at::empty({num_groups}, pred.options().dtype(at::kLong));

  const auto stream = c10::cuda::getCurrentCUDAStream(pred.get_device());
  const void* pointers[] = {pred.data_ptr(), target.data_ptr()};
  const cuda::GroupedMsePlan plan = cuda::grouped_mse_plan(
      batch, per_sample, kernel_dtype(pred.scalar_type()), kernel_dtype(target.scalar_type()),
      pointers, 2, sm_count(pred.get_device()));
  at::Tensor partials = at::empty({plan.num_tiles}, pred.options().dtype(at::kDouble));
  const at::Tensor ticket = ticket_counter(stream);

  cuda::GroupedMseForwardArgs args;
  args.pred = pred.data_ptr();
  args.pred_dtype = kernel_dtype(pred.scalar_type());
  args.target = target.data_ptr();
  args.target_dtype = kernel_dtype(target.scalar_type());
  args.groups = groups.data_ptr();
  args.groups_dtype = kernel_index_type(groups);
  args.weight = weight.defined() ? weight.data_ptr() : nullptr;
  args.weight_dtype = weight.defined() ? kernel_dtype(weight.scalar_type()) : cuda::DType::F32;
  args.batch = batch;
  args.per_sample = per_sample;
  args.num_groups = num_groups;
  args.group_loss = group_loss.data_ptr();
  args.sample_mse = sample_mse.data_ptr();
  args.group_count = group_count.data_ptr<int64_t>();
  args.partials = partials.data_ptr<double>();
  args.ticket = reinterpret_cast<unsigned int*>(ticket.data_ptr());
  check_launch(cuda::grouped_mse_forward(args, plan, stream.stream()), "grouped_mse");
  return {group_loss, sample_mse, group_count};
}

std::tuple<at::Tensor, at::Tensor> grouped_mse_backward_cuda(
    const at::Tensor& grad_group_in, const std::optional<at::Tensor>& grad_sample_in,
    const at::Tensor& pred_in, const at::Tensor& target_in, const at::Tensor& groups_in,
    const at::Tensor& group_count_in, const std::optional<at::Tensor>& weight_in,
    bool need_grad_target) {
  grouped_mse_detail::check_backward_inputs(grad_group_in, grad_sample_in, pred_in, target_in,
                                            groups_in, group_count_in, weight_in);
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const at::Tensor groups = groups_in.contiguous();
  const at::Tensor group_count = group_count_in.contiguous();
  const at::Tensor weight = weight_in.has_value() ? weight_in->contiguous() : at::Tensor();
  // The gradients arrive in the accumulation type from autograd (no-op conversions); any stride
  // (an expanded gradient of loss.sum() has stride 0) is read in place.
  const auto acc_type = grouped_mse_detail::accumulate_type(pred, target);
  const at::Tensor grad_group = grad_group_in.to(acc_type);
  const at::Tensor grad_sample =
      grad_sample_in.has_value() ? grad_sample_in->to(acc_type) : at::Tensor();

  const int64_t batch = pred.size(0);
  const int64_t per_sample = pred.numel() / batch;
  at::Tensor grad_pred = at::empty(pred.sizes(), pred.options());
  at::Tensor grad_target = need_grad_target ? at::empty(target.sizes(), target.options())
                                            : at::empty({0}, target.options());

  const auto stream = c10::cuda::getCurrentCUDAStream(pred.get_device());
  const void* pointers[] = {pred.data_ptr(), target.data_ptr(), grad_pred.data_ptr(),
                            need_grad_target ? grad_target.data_ptr() : nullptr};
  const cuda::GroupedMsePlan plan = cuda::grouped_mse_plan(
      batch, per_sample, kernel_dtype(pred.scalar_type()), kernel_dtype(target.scalar_type()),
      pointers, 4, sm_count(pred.get_device()));

  cuda::GroupedMseBackwardArgs args;
  args.grad_group = grad_group.data_ptr();
  args.grad_group_stride = grad_group.stride(0);
  args.grad_sample = grad_sample.defined() ? grad_sample.data_ptr() : nullptr;
  args.grad_sample_stride = grad_sample.defined() ? grad_sample.stride(0) : 0;
  args.pred = pred.data_ptr();
  args.pred_dtype = kernel_dtype(pred.scalar_type());
  args.target = target.data_ptr();
  args.target_dtype = kernel_dtype(target.scalar_type());
  args.groups = groups.data_ptr();
  args.groups_dtype = kernel_index_type(groups);
  args.group_count = group_count.data_ptr<int64_t>();
  args.weight = weight.defined() ? weight.data_ptr() : nullptr;
  args.weight_dtype = weight.defined() ? kernel_dtype(weight.scalar_type()) : cuda::DType::F32;
  args.batch = batch;
  args.per_sample = per_sample;
  args.num_groups = group_count.size(0);
  args.grad_pred = grad_pred.data_ptr();
  args.grad_target = need_grad_target ? grad_target.data_ptr() : nullptr;
  check_launch(cuda::grouped_mse_backward(args, plan, stream.stream()), "grouped_mse_backward");
  return {grad_pred, grad_target};
}

}  // namespace
}  // namespace ant_core

TORCH_LIBRARY_IMPL(ant_core, CUDA, m) {
  m.impl("grouped_mse", &ant_core::grouped_mse_cuda);
  m.impl("grouped_mse_backward", &ant_core::grouped_mse_backward_cuda);
}

#endif  // WITH_CUDA

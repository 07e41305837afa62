// Autograd of ant_core::grouped_mse, in C++ (one kernel for every device, at the Autograd key).
//
// pred and target get their gradients from the fused ant_core::grouped_mse_backward op; a
// differentiable weight gets d L_k / d w_i = [g_i = k] * sample_mse_i / count_k with a few
// (B,)-sized ops. Written in C++ rather than with torch.library.register_autograd because the
// Python autograd path costs more host time per training step than the fused kernels take on
// a GPU at common image sizes (benchmarks/RESULTS.md). The fake kernels stay in Python
// (ant_core/losses.py), so torch.compile traces through this function like any other.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace ant_core {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_mse_op(
    const at::Tensor& pred, const at::Tensor& target, const at::Tensor& groups,
    int64_t num_groups, const std::optional<at::Tensor>& weight) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ant_core::grouped_mse", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
              const std::optional<at::Tensor>&)>();
  return op.call(pred, target, groups, num_groups, weight);
}

std::tuple<at::Tensor, at::Tensor> grouped_mse_backward_op(
    const at::Tensor& grad_group, const std::optional<at::Tensor>& grad_sample,
    const at::Tensor& pred, const at::Tensor& target, const at::Tensor& groups,
    const at::Tensor& group_count, const std::optional<at::Tensor>& weight,
    bool need_grad_target) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ant_core::grouped_mse_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&, bool)>();
  return op.call(grad_group, grad_sample, pred, target, groups, group_count, weight,
                 need_grad_target);
}

// dL/dl_i through the group means: grad_group[g_i] / count[g_i] in `dtype` (differentiable aten
// ops). Ids outside [0, K) occur only on CUDA (the forward then poisons every loss with NaN); as
// in the fused kernel their gradient is NaN, and they are never used as an index.
at::Tensor per_sample_group_grad(const at::Tensor& grad_group, const at::Tensor& group_count,
                                 const at::Tensor& groups, int64_t num_groups,
                                 at::ScalarType dtype) {
  const at::Tensor per_group = grad_group.to(dtype) / group_count.clamp_min(1).to(dtype);
  const at::Tensor valid = groups.ge(0).logical_and(groups.lt(num_groups));
  return at::where(valid,
                   per_group.index_select(0, groups.clamp(0, num_groups - 1).to(at::kLong)),
                   std::numeric_limits<double>::quiet_NaN());
}

// The gradients of pred and target from differentiable aten ops, for a backward that builds a
// graph (create_graph=True: gradient penalties, double backward). The fused kernel's result is
// not differentiable; this is the same formula, 2/N * (w_i * dL_{g_i} / count_{g_i} + dl_i) *
// (pred_i - target_i), accumulated in float32 (float64 when an input is).
std::tuple<at::Tensor, at::Tensor> differentiable_grads(
    const at::Tensor& grad_group, const at::Tensor& grad_sample, const at::Tensor& pred,
    const at::Tensor& target, const at::Tensor& groups, const at::Tensor& group_count,
    const at::Tensor& weight, int64_t num_groups) {
  const auto acc = pred.scalar_type() == at::kDouble || target.scalar_type() == at::kDouble
                       ? at::kDouble
                       : at::kFloat;
  const int64_t batch = pred.size(0);
  at::Tensor coef = per_sample_group_grad(grad_group, group_count, groups, num_groups, acc);
  if (weight.defined()) coef = coef * weight.to(acc);
  if (grad_sample.defined()) coef = coef + grad_sample.to(acc);  // NaN stays NaN
  std::vector<int64_t> shape(pred.dim(), 1);
  shape[0] = batch;
  const double scale = 2.0 * static_cast<double>(batch) / static_cast<double>(pred.numel());
  const at::Tensor grad = (coef * scale).view(shape) * (pred.to(acc) - target.to(acc));
  return {grad.to(pred.scalar_type()), grad.neg().to(target.scalar_type())};
}

std::optional<at::Tensor> optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

class GroupedMse : public torch::autograd::Function<GroupedMse> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& pred,
                               const at::Tensor& target, const at::Tensor& groups,
                               int64_t num_groups, const std::optional<at::Tensor>& weight) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [group_loss, sample_mse, group_count] =
        grouped_mse_op(pred, target, groups, num_groups, weight);
    ctx->saved_data["num_groups"] = num_groups;
    ctx->saved_data["has_weight"] = weight.has_value();
    ctx->set_materialize_grads(false);  // an unused output costs no zero-filled gradient
    ctx->mark_non_differentiable({group_count});
    ctx->save_for_backward({pred, target, groups, group_count,
                            weight.value_or(at::Tensor()), sample_mse});
    return {group_loss, sample_mse, group_count};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &pred = saved[0], &target = saved[1], &groups = saved[2];
    const at::Tensor &group_count = saved[3], &weight = saved[4], &sample_mse = saved[5];
    const int64_t num_groups = ctx->saved_data["num_groups"].toInt();
    // Input edges: pred 0, target 1, groups 2, then weight 3 when given.
    const bool need_pred = ctx->needs_input_grad(0);
    const bool need_target = ctx->needs_input_grad(1);
    const bool need_weight = ctx->saved_data["has_weight"].toBool() && ctx->needs_input_grad(3);
    variable_list out(5);  // one entry per forward argument
    const bool group_used = grads[0].defined();
    const at::Tensor& grad_sample = grads[1];
    if (!group_used && !grad_sample.defined()) return out;
    const at::Tensor grad_group =
        group_used ? grads[0] : at::zeros({num_groups}, sample_mse.options());
    // The weight enters through the group losses only: when just the per-sample losses were
    // used, leave it out (an infinite weight would make 0 * inf = NaN of the absent term).
    const at::Tensor& w = group_used ? weight : at::Tensor();
    if (need_pred || need_target) {
      // Grad mode is on in a backward exactly when it builds a graph (create_graph=True).
      auto [grad_pred, grad_target] =
          at::GradMode::is_enabled()
              ? differentiable_grads(grad_group, grad_sample, pred, target, groups, group_count,
                                     w, num_groups)
              : grouped_mse_backward_op(grad_group, optional(grad_sample), pred, target, groups,
                                        group_count, optional(w), need_target);
      if (need_pred) out[0] = grad_pred;
      if (need_target) out[1] = grad_target;
    }
    if (need_weight && group_used) {
      out[4] = (per_sample_group_grad(grad_group, group_count, groups, num_groups,
                                      grad_group.scalar_type()) *
                sample_mse)
                   .to(weight.scalar_type());
    }
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_mse_autograd(
    const at::Tensor& pred, const at::Tensor& target, const at::Tensor& groups,
    int64_t num_groups, const std::optional<at::Tensor>& weight) {
  const variable_list out = GroupedMse::apply(pred, target, groups, num_groups, weight);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace ant_core

TORCH_LIBRARY_IMPL(ant_core, Autograd, m) {
  m.impl("grouped_mse", &ant_core::grouped_mse_autograd);
}

/* The mnv2:: BatchNorm + activation (ReLU6, Mish) training operators: schemas, argument checks and autograd
 * in C++ around the C kernels of batch_norm_act.c (C++ for the reason given in triplet_attention_ops.cpp). */
#include "operators.h"

using mnv2::i64;

extern "C" {
int bn_act_forward(const float* x, i64 B, i64 C, i64 inner, int nhwc, const float* w, const float* b, double eps,
                   int act, float* y, float* mean, float* invstd, float* unbiased_var, int nthreads);
int bn_act_backward(const float* grad, const float* x, i64 B, i64 C, i64 inner, int nhwc, const float* w,
                    const float* b, const float* mean, const float* invstd, int act, float* dx, float* dw, float* db,
                    int nthreads);
}

namespace {

using namespace mnv2;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Outputs = std::tuple<Tensor, Tensor, Tensor>;

// the C kernels' code of an activation (batch_norm_act.c's ACT_RELU6, ACT_MISH)
int activation_code(const char* op, c10::string_view activation) {
  TORCH_CHECK_VALUE(activation == "relu6" || activation == "mish", "mnv2::", op,
                    ": activation must be one of ('relu6', 'mish'); got '", activation, "'");
  return activation == "mish" ? 1 : 0;
}

void check_input(const char* op, const Tensor& x, const Tensor& weight, const Tensor& bias) {
  check_feature_map(op, x);
  const i64 channels = x.size(1);
  check_shape(op, "weight", weight, {channels});
  check_shape(op, "bias", bias, {channels});
  // (nn.BatchNorm2d's own message, which its module path raises too)
  TORCH_CHECK_VALUE(x.size(0) * x.size(2) * x.size(3) > 1, "mnv2::", op,
                    ": expected more than 1 value per channel when training, got input size ", tuple(x.sizes()));
}

// activation(BatchNorm(x)) with the batch's statistics; the running statistics move towards them (nn.BatchNorm2d's
// update with momentum) and count grows by one. Returns (y, mean, invstd): what backward needs besides x.
Outputs batch_norm_act_cpu(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& running_mean,
                           const Tensor& running_var, const Tensor& count, double momentum, double eps,
                           c10::string_view activation) {
  const char* op = "batch_norm_act";
  const int act = activation_code(op, activation);
  check_input(op, x, weight, bias);
  const i64 channels = x.size(1);
  check_shape(op, "running_mean", running_mean, {channels});
  check_shape(op, "running_var", running_var, {channels});
  check_running_stats(op, "", running_mean, running_var, count);
  const auto options = x.options();
  Tensor y = at::empty_like(x);
  Tensor mean = at::empty({channels}, options), invstd = at::empty({channels}, options);
  std::vector<float> unbiased_var(channels);
  check_allocated(op, bn_act_forward(cptr(x), x.size(0), channels, x.size(2) * x.size(3), is_channels_last(x),
                                     cptr(weight.contiguous()), cptr(bias.contiguous()), eps, act, mptr(y),
                                     mptr(mean), mptr(invstd), unbiased_var.data(), at::get_num_threads()));
  update_running_stats(running_mean, running_var, count, cptr(mean), unbiased_var.data(), momentum);
  return {y, mean, invstd};
}

// (dx, dweight, dbias) from the gradient of y
Outputs batch_norm_act_backward_cpu(const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& bias,
                                    const Tensor& mean, const Tensor& invstd, c10::string_view activation) {
  const char* op = "batch_norm_act_backward";
  const int act = activation_code(op, activation);
  check_input(op, x, weight, bias);
  check_same_layout(op, "grad", grad, x);
  const i64 channels = x.size(1);
  check_shape(op, "mean", mean, {channels});
  check_shape(op, "invstd", invstd, {channels});
  Tensor dx = at::empty_like(x), dweight = at::empty_like(weight), dbias = at::empty_like(bias);
  check_allocated(op, bn_act_backward(cptr(grad), cptr(x), x.size(0), channels, x.size(2) * x.size(3),
                                      is_channels_last(x), cptr(weight.contiguous()), cptr(bias.contiguous()),
                                      cptr(mean.contiguous()), cptr(invstd.contiguous()), act, mptr(dx),
                                      mptr(dweight), mptr(dbias), at::get_num_threads()));
  return {dx, dweight, dbias};
}

class BatchNormActFunction : public torch::autograd::Function<BatchNormActFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& bias,
                               const Tensor& running_mean, const Tensor& running_var, const Tensor& count,
                               double momentum, double eps, c10::string_view activation) {
    static auto op = operator_handle<decltype(batch_norm_act_cpu)>("mnv2::batch_norm_act");
    Outputs result;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      result = op.call(x, weight, bias, running_mean, running_var, count, momentum, eps, activation);
    }
    bump_versions({running_mean, running_var, count});
    auto [y, mean, invstd] = result;
    ctx->save_for_backward({x, weight, bias, mean, invstd});  // not y: the activation's input is recomputed
    ctx->saved_data["activation"] = std::string(activation);
    ctx->mark_non_differentiable({mean, invstd});  // saved state, not results
    ctx->set_materialize_grads(false);
    return {y, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = operator_handle<decltype(batch_norm_act_backward_cpu)>("mnv2::batch_norm_act_backward");
    variable_list result(9);  // one per forward argument
    if (!grads[0].defined()) return result;
    const auto s = ctx->get_saved_variables();
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    auto [dx, dweight, dbias] =
        op.call(grads[0].contiguous(memory_format(s[0])), s[0], s[1], s[2], s[3], s[4], activation);
    result[0] = dx, result[1] = dweight, result[2] = dbias;
    return result;
  }
};

Outputs batch_norm_act_autograd(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                const Tensor& running_mean, const Tensor& running_var, const Tensor& count,
                                double momentum, double eps, c10::string_view activation) {
  auto o = BatchNormActFunction::apply(x, weight, bias, running_mean, running_var, count, momentum, eps, activation);
  return {o[0], o[1], o[2]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mnv2, m) {
  m.def("batch_norm_act(Tensor x, Tensor weight, Tensor bias, Tensor(a!) running_mean, Tensor(b!) running_var, "
        "Tensor(c!) count, float momentum, float eps, str activation) -> (Tensor, Tensor, Tensor)");
  m.def("batch_norm_act_backward(Tensor grad, Tensor x, Tensor weight, Tensor bias, Tensor mean, Tensor invstd, "
        "str activation) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mnv2, CPU, m) {
  m.impl("batch_norm_act", batch_norm_act_cpu);
  m.impl("batch_norm_act_backward", batch_norm_act_backward_cpu);
}

TORCH_LIBRARY_IMPL(mnv2, Autograd, m) {
  m.impl("batch_norm_act", batch_norm_act_autograd);
  m.impl("batch_norm_act_backward", torch::autograd::autogradNotImplementedFallback());
}

/* The mnv2:: CNSN operators: schemas, argument checks, output allocation and autograd in C++ around the
 * C kernels of cnsn.c (see mnv2lib/ops/cnsn.py for what each computes). C++ for the reason given in
 * triplet_attention_ops.cpp: inside a network the Python glue of a call costs more than its kernel. */
#include "operators.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/zeros_like.h>

using mnv2::i64;

extern "C" {
void cn_stats(const float* x, i64 B, i64 C, i64 n, int nhwc, double eps, float* mean, float* std, int nthreads);
void sn_apply(const float* x, i64 B, i64 C, i64 n, int nhwc, const float* g, const float* h, float* out, int nthreads);
void sn_backward_reduce(const float* x, const float* go, i64 B, i64 C, i64 n, int nhwc, float* sgx, float* sg,
                        int nthreads);
void sn_backward_dx(const float* x, const float* go, i64 B, i64 C, i64 n, int nhwc, const float* g,
                    const float* alpha, const float* beta, const float* mean, float* dx, int nthreads);
int sn_eval(const float* x, i64 B, i64 C, i64 n, int nhwc, double eps, const float* gfc, const float* gw,
            const float* gb, const float* grm, const float* grv, double geps, const float* ffc, const float* fw,
            const float* fb, const float* frm, const float* frv, double feps, float* out, int nthreads);
void sn_gate_input(const float* mean, const float* std, const float* fc, i64 B, i64 C, float* y);
void sn_gate_input_backward(const float* dy, const float* mean, const float* std, const float* fc, i64 B, i64 C,
                            float* dmean, float* dstd, float* dfc);
}

namespace {

using namespace mnv2;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// x (B, C, H, W) as the kernels read it: planes of n = H * W values, channels innermost where NHWC
struct Layout {
  i64 batch, channels, n;
  int nhwc;
};

Layout layout(const Tensor& x) { return {x.size(0), x.size(1), x.size(2) * x.size(3), is_channels_last(x)}; }

// a gate: 1x1 conv weight (C, 1, 2) over (mean, std), BatchNorm1d vectors (C,)
void check_gate(const char* op, i64 channels, const Tensor& fc, std::initializer_list<std::pair<const char*, const Tensor*>> vectors,
                const char* fc_name = "fc") {
  check_shape(op, fc_name, fc, {channels, 1, 2});
  for (const auto& [name, t] : vectors) check_shape(op, name, *t, {channels});
}

std::tuple<Tensor, Tensor> channel_stats_cpu(const Tensor& x, double eps) {
  check_feature_map("channel_stats", x);
  const Layout l = layout(x);
  Tensor mean = at::empty({l.batch, l.channels}, x.options()), std = at::empty({l.batch, l.channels}, x.options());
  cn_stats(cptr(x), l.batch, l.channels, l.n, l.nhwc, eps, mptr(mean), mptr(std), at::get_num_threads());
  return {mean, std};
}

// dx = grad * gate + d_mean / n + d_std * (x - mean) / ((n - 1) std), one pass (grad and gate may be undefined)
Tensor stats_dx(const Tensor& x, const Tensor& mean, const Tensor& std, const Tensor& d_mean, const Tensor& d_std,
                const Tensor& grad = {}, const Tensor& gate = {}) {
  const Layout l = layout(x);
  const Tensor alpha = (d_mean / l.n).contiguous();
  const Tensor beta = l.n == 1 ? at::zeros_like(std) : (d_std / (std * (l.n - 1))).contiguous();
  Tensor dx = at::empty_like(x);
  sn_backward_dx(cptr(x), cptr(grad), l.batch, l.channels, l.n, l.nhwc, cptr(gate), cptr(alpha), cptr(beta),
                 cptr(mean), mptr(dx), at::get_num_threads());
  return dx;
}

Tensor channel_stats_backward_cpu(const Tensor& x, const Tensor& mean, const Tensor& std, const Tensor& d_mean,
                                  const Tensor& d_std) {
  const char* op = "channel_stats_backward";
  check_feature_map(op, x);
  const i64 shape[2] = {x.size(0), x.size(1)};
  check_shape(op, "mean", mean, shape);
  check_shape(op, "std", std, shape);
  check_shape(op, "d_mean", d_mean, shape);
  check_shape(op, "d_std", d_std, shape);
  return stats_dx(x, mean.contiguous(), std.contiguous(), d_mean, d_std);
}

using SelfNormOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// in training the gate's running statistics move towards the batch's (nn.BatchNorm1d's update)
SelfNormOutputs selfnorm_cpu(const Tensor& x, const Tensor& fc, const Tensor& gamma, const Tensor& beta,
                             const Tensor& running_mean, const Tensor& running_var, const Tensor& count,
                             bool training, double bn_eps, double eps, double momentum) {
  const char* op = "selfnorm";
  check_feature_map(op, x);
  const Layout l = layout(x);
  check_gate(op, l.channels, fc, {{"gamma", &gamma}, {"beta", &beta}, {"running_mean", &running_mean},
                                  {"running_var", &running_var}});
  if (training) check_running_stats(op, "", running_mean, running_var, count);
  const int threads = at::get_num_threads();
  const auto options = x.options();
  Tensor mean = at::empty({l.batch, l.channels}, options), std = at::empty({l.batch, l.channels}, options);
  Tensor y = at::empty({l.batch, l.channels}, options), g = at::empty({l.batch, l.channels}, options);
  Tensor xhat = at::empty({l.batch, l.channels}, options), invstd = at::empty({l.channels}, options);
  std::vector<float> batch_stats(2 * l.channels);  // batch means and unbiased variances
  cn_stats(cptr(x), l.batch, l.channels, l.n, l.nhwc, eps, mptr(mean), mptr(std), threads);
  sn_gate_input(cptr(mean), cptr(std), cptr(fc.contiguous()), l.batch, l.channels, mptr(y));
  bn_sigmoid_forward(cptr(y), l.batch, l.channels, 1, cptr(gamma.contiguous()), cptr(beta.contiguous()),
                     cptr(running_mean.contiguous()), cptr(running_var.contiguous()), training, bn_eps, mptr(g),
                     mptr(xhat), mptr(invstd), batch_stats.data(), batch_stats.data() + l.channels,
                     1 /* (a few values per channel) */);
  Tensor out = at::empty_like(x);
  sn_apply(cptr(x), l.batch, l.channels, l.n, l.nhwc, cptr(g), nullptr, mptr(out), threads);
  if (training && x.numel() > 0)  // (an empty x has no statistics: aten's batch_norm leaves the running ones too)
    update_running_stats(running_mean, running_var, count, batch_stats.data(), batch_stats.data() + l.channels,
                         momentum);
  return {out, mean, std, g, xhat, invstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> selfnorm_backward_cpu(const Tensor& grad, const Tensor& x, const Tensor& fc,
                                                                 const Tensor& gamma, const Tensor& mean_in,
                                                                 const Tensor& std_in, const Tensor& g_in,
                                                                 const Tensor& xhat_in, const Tensor& invstd,
                                                                 bool training) {
  const char* op = "selfnorm_backward";
  check_feature_map(op, x);
  check_same_layout(op, "grad", grad, x);
  const Layout l = layout(x);
  check_gate(op, l.channels, fc, {{"gamma", &gamma}, {"invstd", &invstd}});
  const i64 shape[2] = {l.batch, l.channels};
  check_shape(op, "mean", mean_in, shape);
  check_shape(op, "std", std_in, shape);
  check_shape(op, "g", g_in, shape);
  check_shape(op, "xhat", xhat_in, shape);
  const auto options = x.options();
  if (x.numel() == 0)  // nothing reaches the parameters from an empty x
    return {at::empty_like(x), at::zeros({l.channels, 1, 2}, options), at::zeros({l.channels}, options),
            at::zeros({l.channels}, options)};
  const Tensor mean = mean_in.contiguous(), std = std_in.contiguous(), g = g_in.contiguous();
  const Tensor xhat = xhat_in.contiguous(), weights = fc.contiguous();
  Tensor d_gate = at::empty(shape, options), dy = at::empty(shape, options);
  sn_backward_reduce(cptr(x), cptr(grad), l.batch, l.channels, l.n, l.nhwc, mptr(d_gate), nullptr,
                     at::get_num_threads());
  Tensor d_gamma = at::empty({l.channels}, options), d_beta = at::empty({l.channels}, options);
  Tensor d_fc = at::empty({l.channels, 1, 2}, options);
  bn_sigmoid_backward(cptr(d_gate), cptr(g), cptr(xhat), l.batch, l.channels, 1, cptr(gamma.contiguous()),
                      cptr(invstd.contiguous()), training, mptr(dy), mptr(d_gamma), mptr(d_beta), 1);
  Tensor d_mean = at::zeros(shape, options), d_std = at::zeros(shape, options);
  sn_gate_input_backward(cptr(dy), cptr(mean), cptr(std), cptr(weights), l.batch, l.channels, mptr(d_mean),
                         mptr(d_std), mptr(d_fc));
  return {stats_dx(x, mean, std, d_mean, d_std, grad, g), d_fc, d_gamma, d_beta};
}

// SelfNorm with running statistics into `out` (x itself for the in-place operator: each plane's statistics
// are taken before it is written); the second gate's tensors all given or none
void inference(const Tensor& x, const Tensor& g_fc, const Tensor& g_gamma, const Tensor& g_beta, const Tensor& g_mean,
               const Tensor& g_var, double g_eps, const std::optional<Tensor>& f_fc,
               const std::optional<Tensor>& f_gamma, const std::optional<Tensor>& f_beta,
               const std::optional<Tensor>& f_mean, const std::optional<Tensor>& f_var, double f_eps, double eps,
               const Tensor& out) {
  const char* op = "selfnorm_inference";
  check_feature_map(op, x);
  const Layout l = layout(x);
  check_gate(op, l.channels, g_fc, {{"g_gamma", &g_gamma}, {"g_beta", &g_beta}, {"g_mean", &g_mean},
                                    {"g_var", &g_var}}, "g_fc");
  const std::optional<Tensor>* second[5] = {&f_fc, &f_gamma, &f_beta, &f_mean, &f_var};
  int given = 0;
  for (const auto* t : second) given += t->has_value();
  TORCH_CHECK_VALUE(given == 0 || given == 5,
                    "mnv2::selfnorm_inference: give all of f_fc, f_gamma, f_beta, f_mean, f_var or none");
  Tensor f[5];
  if (given) {
    check_gate(op, l.channels, **second[0], {{"f_gamma", &**second[1]}, {"f_beta", &**second[2]},
                                             {"f_mean", &**second[3]}, {"f_var", &**second[4]}}, "f_fc");
    for (int i = 0; i < 5; i++) f[i] = (*second[i])->contiguous();
  }
  if (x.numel() == 0) return;  // an empty result
  const Tensor gate[5] = {g_fc.contiguous(), g_gamma.contiguous(), g_beta.contiguous(), g_mean.contiguous(),
                          g_var.contiguous()};
  check_allocated(op, sn_eval(cptr(x), l.batch, l.channels, l.n, l.nhwc, eps, cptr(gate[0]), cptr(gate[1]),
                              cptr(gate[2]), cptr(gate[3]), cptr(gate[4]), g_eps, cptr(f[0]), cptr(f[1]), cptr(f[2]),
                              cptr(f[3]), cptr(f[4]), f_eps, mptr(out), at::get_num_threads()));
}

#define INFERENCE_PARAMS                                                                                         \
  const Tensor &g_fc, const Tensor &g_gamma, const Tensor &g_beta, const Tensor &g_mean, const Tensor &g_var,    \
      double g_eps, const std::optional<Tensor> &f_fc, const std::optional<Tensor> &f_gamma,                     \
      const std::optional<Tensor> &f_beta, const std::optional<Tensor> &f_mean,                                  \
      const std::optional<Tensor> &f_var, double f_eps, double eps
#define INFERENCE_ARGS g_fc, g_gamma, g_beta, g_mean, g_var, g_eps, f_fc, f_gamma, f_beta, f_mean, f_var, f_eps, eps

Tensor selfnorm_inference_cpu(const Tensor& x, INFERENCE_PARAMS) {
  Tensor out = at::empty_like(x);
  inference(x, INFERENCE_ARGS, out);
  return out;
}

void selfnorm_inference__cpu(const Tensor& x, INFERENCE_PARAMS) { inference(x, INFERENCE_ARGS, x); }

// ---- autograd: each backward is its own operator ----

class ChannelStatsFunction : public torch::autograd::Function<ChannelStatsFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = operator_handle<decltype(channel_stats_cpu)>("mnv2::channel_stats");
    auto [mean, std] = op.call(x, eps);
    ctx->save_for_backward({x, mean, std});
    return {mean, std};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {  // (undefined grads come as zeros)
    static auto op = operator_handle<decltype(channel_stats_backward_cpu)>("mnv2::channel_stats_backward");
    const auto saved = ctx->get_saved_variables();
    return {op.call(saved[0], saved[1], saved[2], grads[0], grads[1]), Tensor()};
  }
};

std::tuple<Tensor, Tensor> channel_stats_autograd(const Tensor& x, double eps) {
  auto outputs = ChannelStatsFunction::apply(x, eps);
  return {outputs[0], outputs[1]};
}

class SelfNormFunction : public torch::autograd::Function<SelfNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& fc, const Tensor& gamma,
                               const Tensor& beta, const Tensor& running_mean, const Tensor& running_var,
                               const Tensor& count, bool training, double bn_eps, double eps, double momentum) {
    static auto op = operator_handle<decltype(selfnorm_cpu)>("mnv2::selfnorm");
    SelfNormOutputs result;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      result = op.call(x, fc, gamma, beta, running_mean, running_var, count, training, bn_eps, eps, momentum);
    }
    if (training) bump_versions({running_mean, running_var, count});
    auto [out, mean, std, g, xhat, invstd] = result;
    ctx->saved_data["training"] = training;
    ctx->save_for_backward({x, fc, gamma, mean, std, g, xhat, invstd});
    ctx->mark_non_differentiable({mean, std, g, xhat, invstd});  // saved state, not results
    ctx->set_materialize_grads(false);
    return {out, mean, std, g, xhat, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = operator_handle<decltype(selfnorm_backward_cpu)>("mnv2::selfnorm_backward");
    variable_list result(11);  // one per forward argument
    if (!grads[0].defined()) return result;
    const auto s = ctx->get_saved_variables();
    const Tensor grad = grads[0].contiguous(memory_format(s[0]));
    auto [dx, d_fc, d_gamma, d_beta] =
        op.call(grad, s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], ctx->saved_data["training"].toBool());
    result[0] = dx, result[1] = d_fc, result[2] = d_gamma, result[3] = d_beta;
    return result;
  }
};

SelfNormOutputs selfnorm_autograd(const Tensor& x, const Tensor& fc, const Tensor& gamma, const Tensor& beta,
                                  const Tensor& running_mean, const Tensor& running_var, const Tensor& count,
                                  bool training, double bn_eps, double eps, double momentum) {
  auto o = SelfNormFunction::apply(x, fc, gamma, beta, running_mean, running_var, count, training, bn_eps, eps,
                                   momentum);
  return {o[0], o[1], o[2], o[3], o[4], o[5]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mnv2, m) {
  m.def("channel_stats(Tensor x, float eps) -> (Tensor, Tensor)");
  m.def("channel_stats_backward(Tensor x, Tensor mean, Tensor std, Tensor d_mean, Tensor d_std) -> Tensor");
  m.def("selfnorm(Tensor x, Tensor fc, Tensor gamma, Tensor beta, Tensor(a!) running_mean, Tensor(b!) running_var, "
        "Tensor(c!) count, bool training, float bn_eps, float eps, float momentum) -> (Tensor, Tensor, Tensor, Tensor, "
        "Tensor, Tensor)");
  m.def("selfnorm_backward(Tensor grad, Tensor x, Tensor fc, Tensor gamma, Tensor mean, Tensor std, Tensor g, "
        "Tensor xhat, Tensor invstd, bool training) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("selfnorm_inference(Tensor x, Tensor g_fc, Tensor g_gamma, Tensor g_beta, Tensor g_mean, Tensor g_var, "
        "float g_eps, Tensor? f_fc, Tensor? f_gamma, Tensor? f_beta, Tensor? f_mean, Tensor? f_var, float f_eps, "
        "float eps) -> Tensor");
  m.def("selfnorm_inference_(Tensor(a0!) x, Tensor g_fc, Tensor g_gamma, Tensor g_beta, Tensor g_mean, "
        "Tensor g_var, float g_eps, Tensor? f_fc, Tensor? f_gamma, Tensor? f_beta, Tensor? f_mean, Tensor? f_var, "
        "float f_eps, float eps) -> ()");
}

TORCH_LIBRARY_IMPL(mnv2, CPU, m) {
  m.impl("channel_stats", channel_stats_cpu);
  m.impl("channel_stats_backward", channel_stats_backward_cpu);
  m.impl("selfnorm", selfnorm_cpu);
  m.impl("selfnorm_backward", selfnorm_backward_cpu);
  m.impl("selfnorm_inference", selfnorm_inference_cpu);
  m.impl("selfnorm_inference_", selfnorm_inference__cpu);
}

TORCH_LIBRARY_IMPL(mnv2, Autograd, m) {
  m.impl("channel_stats", channel_stats_autograd);
  m.impl("selfnorm", selfnorm_autograd);
  for (const char* name : {"channel_stats_backward", "selfnorm_backward", "selfnorm_inference"})
    m.impl(name, torch::autograd::autogradNotImplementedFallback());
  m.impl("selfnorm_inference_", torch::CppFunction::makeFromBoxedFunction<&write_without_gradient>());
}

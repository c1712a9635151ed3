/* The mnv2:: Triplet Attention operators: schemas, argument checks, output allocation and autograd in
 * C++ around the C kernels of triplet_attention.c (see mnv2lib/ops/triplet.py for the layouts).
 *
 * C++ rather than Python functions over ctypes because of what a call costs inside a network: with the
 * glue in Python, the 17 Triplet Attention calls of a batch-128 MobileNetV2 training step spent some
 * 25 ms around 27 ms of kernels (checks of 18 tensors, allocations, the Python autograd wrapper);
 * here the step is 35-40 ms shorter (the closing note of issue 15). */
#include "operators.h"

using mnv2::i64;

extern "C" {  // each returns 0, or 1 where a work buffer could not be allocated
int ta_pool(const float* x, i64 B, i64 C, i64 H, i64 W, float* mcw, int tcw, float* mhc, int thc, float* ms, int ts,
            int nthreads);
int ta_conv(const float* maps, i64 B, i64 R, i64 Q, i64 k, const float* w, int t, float* z, int nthreads);
int ta_combine(const float* x, i64 B, i64 C, i64 H, i64 W, const float* gcw, int tcw, const float* ghc, int thc,
               const float* gs, int ts, float* out, int nthreads);
int ta_eval(const float* x, i64 B, i64 C, i64 H, i64 W, i64 k, const float* wcw, const float* whc, const float* ws,
            const float* const* bn, double eps, int tcw, int thc, int ts, int wt, float* out, int nthreads);
int ta_backward_reduce(const float* x, const float* go, i64 B, i64 C, i64 H, i64 W, const float* mcw, int tcw,
                       const float* mhc, int thc, const float* ms, int ts, float* dcw, float* dhc, float* ds,
                       float* ncw, float* nhc, float* ns, int nthreads);
int ta_conv_backward(const float* maps, const float* gz, i64 B, i64 R, i64 Q, i64 k, const float* w, int t,
                     float* gmap, float* gw, int nthreads);
int ta_backward_dx(const float* x, const float* go, i64 B, i64 C, i64 H, i64 W, const float* gcw,
                   const float* ghc, const float* gs, const float* mcw, const float* mhc, const float* ms, int tcw,
                   int thc, int ts, const float* dcw, const float* dhc, const float* dsp, const float* ncw,
                   const float* nhc, const float* ns, float* dx, int nthreads);
}

namespace {

using namespace mnv2;

// the parameters of the three branches: conv weights (1, 2, k, k), per-branch vectors (1,)
i64 check_params(const char* op, const Tensor& x, const Tensor* weights, std::initializer_list<const Tensor*> vectors,
                 std::initializer_list<const char*> names) {
  check_feature_map(op, x);
  const i64 k = weights[0].dim() == 4 ? weights[0].size(-1) : -1;
  TORCH_CHECK_VALUE(k >= 1 && k % 2 == 1, "mnv2::", op,
                    ": conv weights must have shape (1, 2, k, k) with odd k; got ", tuple(weights[0].sizes()));
  const char* wnames[3] = {"w_cw", "w_hc", "w_s"};
  for (int i = 0; i < 3; i++) check_shape(op, wnames[i], weights[i], {1, 2, k, k});
  auto name = names.begin();
  for (const Tensor* branch : vectors) {
    for (int i = 0; i < 3; i++) {
      const std::string full = std::string(*name) + "_" + (i == 0 ? "cw" : i == 1 ? "hc" : "s");
      check_shape(op, full, branch[i], {1});
    }
    ++name;
  }
  return k;
}

// A branch's (1, 2, k, k) conv weight as 2 k k floats in order: the tensor's own, or a copy where a channels_last
// model stores it with other strides (copied here: Tensor::contiguous() costs a dispatch and an allocation, and
// an inference step of a channels_last MobileNetV2 made 51 of them)
class ConvWeight {
 public:
  explicit ConvWeight(const Tensor& w) {
    if (w.is_contiguous()) {
      data_ = cptr(w);
      return;
    }
    const auto a = w.accessor<float, 4>();
    copy_.reserve(w.numel());
    for (i64 c = 0; c < w.size(1); c++)
      for (i64 i = 0; i < w.size(2); i++)
        for (i64 j = 0; j < w.size(3); j++) copy_.push_back(a[0][c][i][j]);
    data_ = copy_.data();
  }
  ConvWeight(const ConvWeight&) = delete;  // data_ may point into copy_
  ConvWeight& operator=(const ConvWeight&) = delete;
  const float* data() const { return data_; }

 private:
  std::vector<float> copy_;
  const float* data_ = nullptr;
};

// x as the contiguous (B, C, H, W) the kernels read: NHWC memory read as (B, H, W, C), branches rotated
struct Geometry {
  Tensor xv;
  bool nhwc;
  i64 batch, c, h, w;
  int flags[3];
  i64 rows[3], cols[3];
  int branch[3];      // lane -> branch of x (0 cw, 1 hc, 2 s)
  int transposed[3];  // lane -> that branch's weight read transposed
};

// A plane is stored as its official orientation or the transpose, whichever the convolution's tiles of
// TILE columns cover with fewer positions (the longer side in the columns); on a tie the pooling's
// natural layout (official for cw and s, the transpose for hc), which needs no transposing copies.
// TILE: TQ of triplet_attention.c with AVX-512. The count uses 16-column tiles on every CPU (the stored shapes
// must not depend on it: Python's fake kernels compute them too); with 8-column tiles (no AVX-512) the
// orientation it picks is sometimes not the one with fewer tiles.
constexpr i64 TILE = 16;
int stored_transposed(i64 rows, i64 cols, bool natural_is_transposed) {
  const i64 as_is = rows * ((cols + TILE - 1) / TILE), transposed = cols * ((rows + TILE - 1) / TILE);
  return as_is == transposed ? natural_is_transposed : transposed < as_is;
}

Geometry geometry(const Tensor& x) {
  Geometry g;
  g.nhwc = is_channels_last(x);
  g.xv = g.nhwc ? x.permute({0, 2, 3, 1}) : x;
  g.batch = g.xv.size(0), g.c = g.xv.size(1), g.h = g.xv.size(2), g.w = g.xv.size(3);
  const i64 official[3][2] = {{g.c, g.w}, {g.h, g.c}, {g.h, g.w}};
  for (int i = 0; i < 3; i++) g.flags[i] = stored_transposed(official[i][0], official[i][1], i == 1);
  for (int i = 0; i < 3; i++) {
    g.rows[i] = g.flags[i] ? official[i][1] : official[i][0];
    g.cols[i] = g.flags[i] ? official[i][0] : official[i][1];
  }
  static const int lanes[2][3][2] = {{{0, 0}, {1, 0}, {2, 0}}, {{1, 0}, {2, 1}, {0, 1}}};
  for (int i = 0; i < 3; i++) g.branch[i] = lanes[g.nhwc][i][0], g.transposed[i] = lanes[g.nhwc][i][1];
  return g;
}

Tensor nchw_view(const Tensor& t, bool nhwc) { return nhwc ? t.permute({0, 2, 3, 1}) : t; }

// the parameters of the three branches, in the schemas' order
#define BRANCH_PARAMS                                                                                            \
  const Tensor &w_cw, const Tensor &w_hc, const Tensor &w_s, const Tensor &gamma_cw, const Tensor &gamma_hc,     \
      const Tensor &gamma_s, const Tensor &beta_cw, const Tensor &beta_hc, const Tensor &beta_s,                 \
      const Tensor &mean_cw, const Tensor &mean_hc, const Tensor &mean_s, const Tensor &var_cw,                  \
      const Tensor &var_hc, const Tensor &var_s
// BatchNorm's num_batches_tracked of each branch (written, with the running statistics, in training)
#define BRANCH_COUNTS const Tensor &count_cw, const Tensor &count_hc, const Tensor &count_s
#define COUNT_ARGS count_cw, count_hc, count_s
#define BRANCH_TABLES                                                                                     \
  const Tensor weights[3] = {w_cw, w_hc, w_s}, gammas[3] = {gamma_cw, gamma_hc, gamma_s},                \
               betas[3] = {beta_cw, beta_hc, beta_s}, means[3] = {mean_cw, mean_hc, mean_s},             \
               vars[3] = {var_cw, var_hc, var_s};
#define BRANCH_ARGS \
  w_cw, w_hc, w_s, gamma_cw, gamma_hc, gamma_s, beta_cw, beta_hc, beta_s, mean_cw, mean_hc, mean_s, var_cw, var_hc, var_s

using Outputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// in training the branches' running statistics move towards the batch's (nn.BatchNorm2d's update)
Outputs triplet_attention_cpu(const Tensor& x, BRANCH_PARAMS, BRANCH_COUNTS, bool training, double eps,
                              double momentum) {
  BRANCH_TABLES
  const i64 k = check_params("triplet_attention", x, weights, {gammas, betas, means, vars},
                             {"gamma", "beta", "mean", "var"});
  const Tensor counts[3] = {count_cw, count_hc, count_s};
  const char* suffixes[3] = {"_cw", "_hc", "_s"};
  if (training)
    for (int b = 0; b < 3; b++) check_running_stats("triplet_attention", suffixes[b], means[b], vars[b], counts[b]);
  const Geometry g = geometry(x);
  const int threads = at::get_num_threads();
  Tensor maps[3], gates[3], xhats[3];
  if (x.numel() == 0) {
    // an empty result, as aten's ops give; no statistics to take (aten's batch_norm leaves the running ones
    // alone on an empty input) and zeros for the saved planes, which backward multiplies by an empty grad
    for (int i = 0; i < 3; i++) {
      maps[i] = at::zeros({g.batch, 2, g.rows[i], g.cols[i]}, x.options());
      gates[i] = at::zeros({g.batch, g.rows[i], g.cols[i]}, x.options());
      xhats[i] = at::zeros({g.batch, g.rows[i], g.cols[i]}, x.options());
    }
    return {at::empty_like(x), maps[0], maps[1], maps[2], gates[0], gates[1], gates[2], xhats[0], xhats[1],
            xhats[2], at::zeros({3}, x.options())};
  }
  for (int i = 0; i < 3; i++) maps[i] = at::empty({g.batch, 2, g.rows[i], g.cols[i]}, x.options());
  check_allocated("triplet_attention",
                  ta_pool(cptr(g.xv), g.batch, g.c, g.h, g.w, mptr(maps[0]), g.flags[0], mptr(maps[1]), g.flags[1],
                          mptr(maps[2]), g.flags[2], threads));
  Tensor invstd = at::empty({3}, x.options());
  float bs[6] = {0};  // batch means and unbiased variances of the branches (cw, hc, s)
  for (int lane = 0; lane < 3; lane++) {
    const int b = g.branch[lane];
    const i64 r = g.rows[lane], q = g.cols[lane];
    const ConvWeight weight(weights[b]);
    Tensor z = at::empty({g.batch, r, q}, x.options());
    gates[lane] = at::empty({g.batch, r, q}, x.options());
    xhats[lane] = at::empty({g.batch, r, q}, x.options());
    check_allocated("triplet_attention", ta_conv(cptr(maps[lane]), g.batch, r, q, k, weight.data(),
                                                 g.flags[lane] ^ g.transposed[lane], mptr(z), threads));
    bn_sigmoid_forward(cptr(z), g.batch, 1, r * q, cptr(gammas[b]), cptr(betas[b]), cptr(means[b]), cptr(vars[b]),
                       training, eps, mptr(gates[lane]), mptr(xhats[lane]), mptr(invstd) + lane, bs + b, bs + 3 + b,
                       threads);
  }
  Tensor out = at::empty_like(x);
  check_allocated("triplet_attention",
                  ta_combine(cptr(g.xv), g.batch, g.c, g.h, g.w, cptr(gates[0]), g.flags[0], cptr(gates[1]),
                             g.flags[1], cptr(gates[2]), g.flags[2], mptr(nchw_view(out, g.nhwc)), threads));
  if (training)
    for (int b = 0; b < 3; b++) update_running_stats(means[b], vars[b], counts[b], bs + b, bs + 3 + b, momentum);
  return {out, maps[0], maps[1], maps[2], gates[0], gates[1], gates[2], xhats[0], xhats[1], xhats[2], invstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> triplet_attention_backward_cpu(
    const Tensor& grad, const Tensor& x, const Tensor& w_cw, const Tensor& w_hc, const Tensor& w_s,
    const Tensor& gamma_cw, const Tensor& gamma_hc, const Tensor& gamma_s, const Tensor& maps_0, const Tensor& maps_1,
    const Tensor& maps_2, const Tensor& gates_0, const Tensor& gates_1, const Tensor& gates_2, const Tensor& xhat_0,
    const Tensor& xhat_1, const Tensor& xhat_2, const Tensor& invstd_in, bool training) {
  const char* op = "triplet_attention_backward";
  const Tensor weights[3] = {w_cw, w_hc, w_s}, gammas[3] = {gamma_cw, gamma_hc, gamma_s};
  const i64 k = check_params(op, x, weights, {gammas}, {"gamma"});
  check_same_layout(op, "grad", grad, x);
  const Geometry g = geometry(x);
  const int threads = at::get_num_threads();
  const Tensor gv = nchw_view(grad, g.nhwc);
  const Tensor maps_in[3] = {maps_0, maps_1, maps_2}, gates_in[3] = {gates_0, gates_1, gates_2},
               xhats_in[3] = {xhat_0, xhat_1, xhat_2};
  Tensor maps[3], gates[3], xhats[3];
  const char* mnames[3] = {"maps_0", "maps_1", "maps_2"};
  const char* gnames[3] = {"gates_0", "gates_1", "gates_2"};
  const char* xnames[3] = {"xhat_0", "xhat_1", "xhat_2"};
  for (int lane = 0; lane < 3; lane++) {
    const i64 r = g.rows[lane], q = g.cols[lane];
    check_shape(op, mnames[lane], maps_in[lane], {g.batch, 2, r, q});
    check_shape(op, gnames[lane], gates_in[lane], {g.batch, r, q});
    check_shape(op, xnames[lane], xhats_in[lane], {g.batch, r, q});
    maps[lane] = maps_in[lane].contiguous();
    gates[lane] = gates_in[lane].contiguous();
    xhats[lane] = xhats_in[lane].contiguous();
  }
  check_shape(op, "invstd", invstd_in, {3});
  if (x.numel() == 0)  // nothing reaches the parameters from an empty x
    return {at::empty_like(x), at::zeros({1, 2, k, k}, x.options()), at::zeros({1, 2, k, k}, x.options()),
            at::zeros({1, 2, k, k}, x.options()), at::zeros({3}, x.options()), at::zeros({3}, x.options())};
  const Tensor invstd = invstd_in.contiguous();
  Tensor d_gates[3], ties[3];
  for (int lane = 0; lane < 3; lane++) d_gates[lane] = at::empty({g.batch, g.rows[lane], g.cols[lane]}, x.options());
  ties[0] = at::empty({g.batch, g.c, g.w}, x.options());
  ties[1] = at::empty({g.batch, g.c, g.h}, x.options());
  ties[2] = at::empty({g.batch, g.h, g.w}, x.options());
  check_allocated(op, ta_backward_reduce(cptr(g.xv), cptr(gv), g.batch, g.c, g.h, g.w, cptr(maps[0]), g.flags[0],
                                         cptr(maps[1]), g.flags[1], cptr(maps[2]), g.flags[2], mptr(d_gates[0]),
                                         mptr(d_gates[1]), mptr(d_gates[2]), mptr(ties[0]), mptr(ties[1]),
                                         mptr(ties[2]), threads));
  Tensor d_gamma = at::empty({3}, x.options()), d_beta = at::empty({3}, x.options());
  Tensor d_weights[3], d_maps[3];
  for (int lane = 0; lane < 3; lane++) {
    const int b = g.branch[lane];
    const i64 r = g.rows[lane], q = g.cols[lane];
    Tensor dz = at::empty({g.batch, r, q}, x.options());
    bn_sigmoid_backward(cptr(d_gates[lane]), cptr(gates[lane]), cptr(xhats[lane]), g.batch, 1, r * q,
                        cptr(gammas[b]), cptr(invstd) + lane, training, mptr(dz), mptr(d_gamma) + b,
                        mptr(d_beta) + b, threads);
    const ConvWeight weight(weights[b]);
    d_maps[lane] = at::empty({g.batch, 2, r, q}, x.options());
    d_weights[b] = at::empty({1, 2, k, k}, x.options());
    check_allocated(op, ta_conv_backward(cptr(maps[lane]), cptr(dz), g.batch, r, q, k, weight.data(),
                                         g.flags[lane] ^ g.transposed[lane], mptr(d_maps[lane]), mptr(d_weights[b]),
                                         threads));
  }
  Tensor dx = at::empty_like(x);
  check_allocated(op, ta_backward_dx(cptr(g.xv), cptr(gv), g.batch, g.c, g.h, g.w, cptr(gates[0]), cptr(gates[1]),
                                     cptr(gates[2]), cptr(maps[0]), cptr(maps[1]), cptr(maps[2]), g.flags[0],
                                     g.flags[1], g.flags[2], cptr(d_maps[0]), cptr(d_maps[1]), cptr(d_maps[2]),
                                     cptr(ties[0]), cptr(ties[1]), cptr(ties[2]), mptr(nchw_view(dx, g.nhwc)),
                                     threads));
  return {dx, d_weights[0], d_weights[1], d_weights[2], d_gamma, d_beta};
}

void inference(const Tensor& x, BRANCH_PARAMS, double eps, const Tensor& out) {
  BRANCH_TABLES
  const i64 k = check_params("triplet_attention_inference", x, weights, {gammas, betas, means, vars},
                             {"gamma", "beta", "mean", "var"});
  if (x.numel() == 0) return;  // an empty result
  const Geometry g = geometry(x);
  const ConvWeight lane_weights[3] = {ConvWeight(weights[g.branch[0]]), ConvWeight(weights[g.branch[1]]),
                                      ConvWeight(weights[g.branch[2]])};
  const float* bn[12];  // per lane: BN weight, bias, running mean, running var
  int mask = 0;
  for (int lane = 0; lane < 3; lane++) {
    const int b = g.branch[lane];
    bn[4 * lane] = cptr(gammas[b]), bn[4 * lane + 1] = cptr(betas[b]);
    bn[4 * lane + 2] = cptr(means[b]), bn[4 * lane + 3] = cptr(vars[b]);
    mask |= g.transposed[lane] << lane;
  }
  check_allocated("triplet_attention_inference",
                  ta_eval(cptr(g.xv), g.batch, g.c, g.h, g.w, k, lane_weights[0].data(), lane_weights[1].data(),
                          lane_weights[2].data(), bn, eps, g.flags[0], g.flags[1], g.flags[2], mask,
                          mptr(nchw_view(out, g.nhwc)), at::get_num_threads()));
}

Tensor triplet_attention_inference_cpu(const Tensor& x, BRANCH_PARAMS, double eps) {
  Tensor out = at::empty_like(x);
  inference(x, BRANCH_ARGS, eps, out);
  return out;
}

// (written over x: the kernel gates each element right after reading it, sample by sample)
void triplet_attention_inference__cpu(const Tensor& x, BRANCH_PARAMS, double eps) { inference(x, BRANCH_ARGS, eps, x); }

// ---- autograd: the backward is its own operator ----
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class TripletAttentionFunction : public torch::autograd::Function<TripletAttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, BRANCH_PARAMS, BRANCH_COUNTS, bool training,
                               double eps, double momentum) {
    static auto op = operator_handle<decltype(triplet_attention_cpu)>("mnv2::triplet_attention");
    Outputs result;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      result = op.call(x, BRANCH_ARGS, COUNT_ARGS, training, eps, momentum);
    }
    if (training) bump_versions({mean_cw, mean_hc, mean_s, var_cw, var_hc, var_s, count_cw, count_hc, count_s});
    variable_list outputs = {std::get<0>(result), std::get<1>(result), std::get<2>(result), std::get<3>(result),
                             std::get<4>(result), std::get<5>(result), std::get<6>(result), std::get<7>(result),
                             std::get<8>(result), std::get<9>(result), std::get<10>(result)};
    ctx->saved_data["training"] = training;
    ctx->save_for_backward({x, w_cw, w_hc, w_s, gamma_cw, gamma_hc, gamma_s, outputs[1], outputs[2], outputs[3],
                            outputs[4], outputs[5], outputs[6], outputs[7], outputs[8], outputs[9], outputs[10]});
    // everything after `out` is saved state, not a result: no gradient buffers for it
    ctx->mark_non_differentiable(variable_list(outputs.begin() + 1, outputs.end()));
    ctx->set_materialize_grads(false);
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = operator_handle<decltype(triplet_attention_backward_cpu)>("mnv2::triplet_attention_backward");
    const auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    variable_list result(22);  // one per forward argument
    if (!grads[0].defined()) return result;
    const Tensor grad = grads[0].contiguous(memory_format(x));
    auto [dx, dw_cw, dw_hc, dw_s, d_gamma, d_beta] =
        op.call(grad, x, saved[1], saved[2], saved[3], saved[4], saved[5], saved[6], saved[7], saved[8], saved[9],
                saved[10], saved[11], saved[12], saved[13], saved[14], saved[15], saved[16],
                ctx->saved_data["training"].toBool());
    result[0] = dx, result[1] = dw_cw, result[2] = dw_hc, result[3] = dw_s;
    for (int b = 0; b < 3; b++) result[4 + b] = d_gamma.narrow(0, b, 1), result[7 + b] = d_beta.narrow(0, b, 1);
    return result;
  }
};

Outputs triplet_attention_autograd(const Tensor& x, BRANCH_PARAMS, BRANCH_COUNTS, bool training, double eps,
                                   double momentum) {
  auto o = TripletAttentionFunction::apply(x, BRANCH_ARGS, COUNT_ARGS, training, eps, momentum);
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7], o[8], o[9], o[10]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mnv2, m) {
  m.def("triplet_attention(Tensor x, Tensor w_cw, Tensor w_hc, Tensor w_s, Tensor gamma_cw, Tensor gamma_hc, "
        "Tensor gamma_s, Tensor beta_cw, Tensor beta_hc, Tensor beta_s, Tensor(a!) mean_cw, Tensor(b!) mean_hc, "
        "Tensor(c!) mean_s, Tensor(d!) var_cw, Tensor(e!) var_hc, Tensor(f!) var_s, Tensor(g!) count_cw, "
        "Tensor(h!) count_hc, Tensor(i!) count_s, bool training, float eps, float momentum) -> (Tensor, Tensor, "
        "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("triplet_attention_backward(Tensor grad, Tensor x, Tensor w_cw, Tensor w_hc, Tensor w_s, Tensor gamma_cw, "
        "Tensor gamma_hc, Tensor gamma_s, Tensor maps_0, Tensor maps_1, Tensor maps_2, Tensor gates_0, "
        "Tensor gates_1, Tensor gates_2, Tensor xhat_0, Tensor xhat_1, Tensor xhat_2, Tensor invstd, "
        "bool training) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("triplet_attention_inference(Tensor x, Tensor w_cw, Tensor w_hc, Tensor w_s, Tensor gamma_cw, "
        "Tensor gamma_hc, Tensor gamma_s, Tensor beta_cw, Tensor beta_hc, Tensor beta_s, Tensor mean_cw, "
        "Tensor mean_hc, Tensor mean_s, Tensor var_cw, Tensor var_hc, Tensor var_s, float eps) -> Tensor");
  m.def("triplet_attention_inference_(Tensor(a0!) x, Tensor w_cw, Tensor w_hc, Tensor w_s, Tensor gamma_cw, "
        "Tensor gamma_hc, Tensor gamma_s, Tensor beta_cw, Tensor beta_hc, Tensor beta_s, Tensor mean_cw, "
        "Tensor mean_hc, Tensor mean_s, Tensor var_cw, Tensor var_hc, Tensor var_s, float eps) -> ()");
}

TORCH_LIBRARY_IMPL(mnv2, CPU, m) {
  m.impl("triplet_attention", triplet_attention_cpu);
  m.impl("triplet_attention_backward", triplet_attention_backward_cpu);
  m.impl("triplet_attention_inference", triplet_attention_inference_cpu);
  m.impl("triplet_attention_inference_", triplet_attention_inference__cpu);
}

TORCH_LIBRARY_IMPL(mnv2, Autograd, m) {
  m.impl("triplet_attention", triplet_attention_autograd);
  m.impl("triplet_attention_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("triplet_attention_inference", torch::autograd::autogradNotImplementedFallback());
  m.impl("triplet_attention_inference_", torch::CppFunction::makeFromBoxedFunction<&write_without_gradient>());
}

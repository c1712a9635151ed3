/* The mnv2:: Mish operators: schemas, argument checks and autograd in C++ around the C kernels of mish.c,
 * which read the flat storage of a dense (contiguous or channels_last) float32 CPU tensor. C++ for the
 * reason given in triplet_attention_ops.cpp: inside a network the Python around a call costs more than
 * the kernel of a small feature map. */
#include "operators.h"

using mnv2::i64;

extern "C" {
void mish_forward(const float* x, float* out, i64 n, int nthreads);
void mish_backward(const float* x, const float* grad, float* dx, i64 n, int nthreads);
}

namespace {

using namespace mnv2;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

void check_dense(const char* op, const Tensor& x) {
  check_float32_cpu(op, "x", x);
  TORCH_CHECK_VALUE(x.is_contiguous() || is_channels_last(x), "mnv2::", op,
                    ": x must be contiguous or channels_last; got strides ", tuple(x.strides()));
}

// x * tanh(softplus(x)), same layout out
Tensor mish_cpu(const Tensor& x) {
  check_dense("mish", x);
  Tensor out = at::empty_like(x);
  mish_forward(cptr(x), mptr(out), x.numel(), at::get_num_threads());
  return out;
}

// grad * mish'(x); grad with the layout of x
Tensor mish_backward_cpu(const Tensor& x, const Tensor& grad) {
  check_dense("mish_backward", x);
  check_same_layout("mish_backward", "grad", grad, x);
  Tensor dx = at::empty_like(x);
  mish_backward(cptr(x), cptr(grad), mptr(dx), x.numel(), at::get_num_threads());
  return dx;
}

// in place (inference: no autograd graph may need x)
void mish__cpu(const Tensor& x) {
  check_dense("mish_", x);
  mish_forward(cptr(x), mptr(x), x.numel(), at::get_num_threads());
}

class MishFunction : public torch::autograd::Function<MishFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = operator_handle<decltype(mish_cpu)>("mnv2::mish");
    ctx->save_for_backward({x});  // only the input is kept for backward
    return op.call(x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = operator_handle<decltype(mish_backward_cpu)>("mnv2::mish_backward");
    const Tensor x = ctx->get_saved_variables()[0];
    return {op.call(x, grads[0].contiguous(memory_format(x)))};
  }
};

Tensor mish_autograd(const Tensor& x) { return MishFunction::apply(x); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(mnv2, m) {
  m.def("mish(Tensor x) -> Tensor");
  m.def("mish_backward(Tensor x, Tensor grad) -> Tensor");
  m.def("mish_(Tensor(a0!) x) -> ()");
}

TORCH_LIBRARY_IMPL(mnv2, CPU, m) {
  m.impl("mish", mish_cpu);
  m.impl("mish_backward", mish_backward_cpu);
  m.impl("mish_", mish__cpu);
}

TORCH_LIBRARY_IMPL(mnv2, Autograd, m) {
  m.impl("mish", mish_autograd);
  m.impl("mish_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("mish_", torch::CppFunction::makeFromBoxedFunction<&write_without_gradient>());
}

/* What the C++ operators (csrc/<name>_ops.cpp) share: argument checks whose errors name the operator, the
 * argument and what is expected (as the Python-defined operators' do), raw pointers for the C kernels,
 * and the autograd kernel of the operators that write their inputs. C++ only: the C kernels do not
 * include it. */
#pragma once

#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/variable.h>

#include <string>
#include <vector>

extern "C" {  // csrc/bn_sigmoid.h, compiled into each C library that includes it
void bn_sigmoid_forward(const float* y, int64_t B, int64_t C, int64_t inner, const float* gamma, const float* beta,
                        const float* rm, const float* rv, int training, double eps, float* g, float* xhat,
                        float* invstd, float* bmean, float* bvar, int nthreads);
void bn_sigmoid_backward(const float* dg, const float* g, const float* xhat, int64_t B, int64_t C, int64_t inner,
                         const float* gamma, const float* invstd, int training, float* dy, float* dgamma,
                         float* dbeta, int nthreads);
}

namespace mnv2 {

using at::Tensor;
using i64 = int64_t;

inline const float* cptr(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }
inline float* mptr(const Tensor& t) { return t.data_ptr<float>(); }

// sizes and strides as Python prints a tuple: (1, 2, 3, 3), (1,)
inline std::string tuple(at::IntArrayRef values) {
  std::string text = "(";
  for (size_t i = 0; i < values.size(); i++) text += (i ? ", " : "") + std::to_string(values[i]);
  return text + (values.size() == 1 ? ",)" : ")");
}

// a dtype as Python prints it: torch.float64
inline std::string dtype(const Tensor& t) { return "torch." + std::string(c10::getDtypeNames(t.scalar_type()).first); }

inline bool is_channels_last(const Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::MemoryFormat memory_format(const Tensor& x) {
  return is_channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

inline void check_float32_cpu(const char* op, const std::string& name, const Tensor& t) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat && t.device().is_cpu(), "mnv2::", op, ": ", name,
                    " must be a float32 CPU tensor; got ", dtype(t), " on ", t.device());
}

inline void check_shape(const char* op, const std::string& name, const Tensor& t, at::IntArrayRef shape) {
  check_float32_cpu(op, name, t);
  TORCH_CHECK_VALUE(t.sizes() == shape, "mnv2::", op, ": ", name, " must have shape ", tuple(shape), "; got ",
                    tuple(t.sizes()));
}

inline void check_feature_map(const char* op, const Tensor& x) {
  check_float32_cpu(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() == 4, "mnv2::", op, ": x must be 4-D (batch, channels, height, width); got shape ",
                    tuple(x.sizes()));
  TORCH_CHECK_VALUE(x.is_contiguous() || is_channels_last(x), "mnv2::", op,
                    ": x must be contiguous (NCHW) or channels_last; got strides ", tuple(x.strides()));
}

// the same memory order as x: equal strides wherever a dimension has more than one element (the stride of a
// size-1 dimension is never used: a channels_last slice x[:, :, 2:3, :] and its gradient may differ there)
inline bool same_layout(const Tensor& t, const Tensor& x) {
  if (x.numel() == 0) return true;  // (no element to place: an empty grad comes with any strides)
  for (int64_t d = 0; d < x.dim(); d++)
    if (x.size(d) > 1 && t.stride(d) != x.stride(d)) return false;
  return true;
}

inline void check_same_layout(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  check_shape(op, name, t, x.sizes());
  TORCH_CHECK_VALUE(same_layout(t, x), "mnv2::", op, ": ", name, " must have the layout (strides ",
                    tuple(x.strides()), ") of x; got strides ", tuple(t.strides()));
}

// A C kernel's status: 0, or nonzero where one of its work buffers could not be allocated
inline void check_allocated(const char* op, int status) {
  TORCH_CHECK_WITH(OutOfMemoryError, status == 0, "mnv2::", op,
                   ": out of memory for the kernels' work buffers (a smaller batch, map or kernel size fits)");
}

// A BatchNorm's running statistics and batch count as an operator updates them in training: checked
// before any work, so that bad buffers raise before anything is written
inline void check_running_stats(const char* op, const std::string& suffix, const Tensor& running_mean,
                                const Tensor& running_var, const Tensor& count) {
  TORCH_CHECK_VALUE(count.scalar_type() == at::kLong && count.device().is_cpu() && count.numel() == 1, "mnv2::", op,
                    ": count", suffix, " must be an int64 CPU tensor of one element (num_batches_tracked); got ",
                    dtype(count), " of shape ", tuple(count.sizes()), " on ", count.device());
  TORCH_CHECK_VALUE(running_mean.is_contiguous() && running_var.is_contiguous(), "mnv2::", op, ": mean", suffix,
                    " and var", suffix, " must be contiguous to be updated in place");
}

// BatchNorm's running averages, as nn.BatchNorm keeps them, from the batch mean and unbiased variance of
// its channels: running = lerp(running, batch, momentum) (torch.lerp's formula), one more batch counted
inline void update_running_stats(const Tensor& running_mean, const Tensor& running_var, const Tensor& count,
                                 const float* batch_mean, const float* batch_var, double momentum) {
  float* mean = mptr(running_mean);
  float* var = mptr(running_var);
  const float w = static_cast<float>(momentum);
  const auto lerp = [w](float from, float to) {
    return w < 0.5f ? from + w * (to - from) : to - (to - from) * (1.f - w);
  };
  for (i64 c = 0; c < running_mean.numel(); c++) {
    mean[c] = lerp(mean[c], batch_mean[c]);
    var[c] = lerp(var[c], batch_var[c]);
  }
  count.data_ptr<int64_t>()[0] += 1;
}

// After an operator wrote these tensors: their version counters move, as after PyTorch's own in-place ops
// (so that autograd refuses a saved tensor changed since)
inline void bump_versions(at::ArrayRef<Tensor> written) {
  for (const Tensor& t : written) torch::autograd::impl::bump_version(t);
}

// The operator `name` as a typed handle, to call through the dispatcher (autograd kernels do: under
// torch.compile the call reaches the fake kernel, not the CPU one)
template <typename Signature>
c10::TypedOperatorHandle<Signature> operator_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Autograd kernel of an operator that writes its inputs: no gradient through it (a clear error where one
// is asked for), and the written tensors' version counters bumped after the write
inline void write_without_gradient(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const size_t n = schema.arguments().size();
  std::vector<Tensor> written;
  for (size_t i = 0; i < n; i++) {
    const c10::IValue& argument = (*stack)[stack->size() - n + i];
    if (!argument.isTensor()) continue;
    TORCH_CHECK(!(at::GradMode::is_enabled() && argument.toTensor().requires_grad()), schema.name(),
                " writes its input and is not differentiable: call it without gradients (torch.no_grad)");
    if (schema.is_mutable({c10::SchemaArgType::input, i})) written.push_back(argument.toTensor());
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  bump_versions(written);
}

}  // namespace mnv2

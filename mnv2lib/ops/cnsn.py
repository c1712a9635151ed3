"""CNSN operators over ``csrc/cnsn.c``: per-(sample, channel) statistics and SelfNorm.

- ``mnv2::channel_stats(x, eps) -> (mean, std)``, (B, C) each: mean and sqrt(unbiased var + eps) over
  H x W (variance 0 for a single pixel); ``mnv2::channel_stats_backward``.
- ``mnv2::selfnorm``: SelfNorm with one gate in training (or with autograd): statistics, the gate
  ``sigmoid(BN1d(fc0 * mean + fc1 * std))`` (batch statistics, whose running averages it updates in
  place, or running statistics) and ``x * g``; returns what backward needs. ``mnv2::selfnorm_backward``.
- ``mnv2::selfnorm_inference``: one or two gates with running statistics, one fused pass;
  ``mnv2::selfnorm_inference_`` writes the result over x.

x: float32 CPU (B, C, H, W), contiguous or channels_last.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import kernels
from .checks import check_feature_map, check_float32_cpu, check_same_layout, is_channels_last, memory_format
from .library import define


def _layout(x: Tensor) -> tuple[int, int, int, int]:
    batch, channels, height, width = x.shape
    return batch, channels, height * width, int(is_channels_last(x))


@define("mnv2::channel_stats", mutates_args=(), device_types="cpu")
def channel_stats(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    check_feature_map("channel_stats", "x", x)
    batch, channels, n, nhwc = _layout(x)
    mean, std = x.new_empty(batch, channels), x.new_empty(batch, channels)
    kernels.require("cnsn").cn_stats(x.data_ptr(), batch, channels, n, nhwc, eps, mean.data_ptr(), std.data_ptr(),
                                     kernels.threads())
    return mean, std


@channel_stats.register_fake
def _(x, eps):
    return x.new_empty(x.shape[:2]), x.new_empty(x.shape[:2])


def _stats_dx(lib, x, mean, std, d_mean, d_std, grad=None, gate=None) -> Tensor:
    """dx = grad * gate + d_mean / n + d_std * (x - mean) / ((n - 1) std), one pass."""
    batch, channels, n, nhwc = _layout(x)
    alpha = (d_mean / n).contiguous()
    beta = torch.zeros_like(std) if n == 1 else (d_std / ((n - 1) * std)).contiguous()
    dx = torch.empty_like(x)
    lib.sn_backward_dx(x.data_ptr(), kernels.ptr(grad), batch, channels, n, nhwc, kernels.ptr(gate),
                       alpha.data_ptr(), beta.data_ptr(), mean.data_ptr(), dx.data_ptr(), kernels.threads())
    return dx


@define("mnv2::channel_stats_backward", mutates_args=(), device_types="cpu")
def channel_stats_backward(x: Tensor, mean: Tensor, std: Tensor, d_mean: Tensor, d_std: Tensor) -> Tensor:
    check_feature_map("channel_stats_backward", "x", x)
    for name, t in (("mean", mean), ("std", std), ("d_mean", d_mean), ("d_std", d_std)):
        check_float32_cpu("channel_stats_backward", name, t, x.shape[:2])
    return _stats_dx(kernels.require("cnsn"), x, mean.contiguous(), std.contiguous(), d_mean, d_std)


@channel_stats_backward.register_fake
def _(x, *args):
    return torch.empty_like(x)


def _stats_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], *output)


def _stats_backward(ctx, d_mean, d_std):
    x, mean, std = ctx.saved_tensors
    d_mean = torch.zeros_like(mean) if d_mean is None else d_mean
    d_std = torch.zeros_like(std) if d_std is None else d_std
    return torch.ops.mnv2.channel_stats_backward(x, mean, std, d_mean, d_std), None


channel_stats.register_autograd(_stats_backward, setup_context=_stats_setup)


def _check_gate(op: str, channels: int, fc: Tensor, vectors: dict[str, Tensor]) -> None:
    check_float32_cpu(op, "fc", fc, (channels, 1, 2))
    for name, t in vectors.items():
        check_float32_cpu(op, name, t, (channels,))


@define("mnv2::selfnorm", mutates_args=(), device_types="cpu")
def selfnorm(x: Tensor, fc: Tensor, gamma: Tensor, beta: Tensor, running_mean: Tensor, running_var: Tensor,
             training: bool, bn_eps: float, eps: float,
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """SelfNorm, one gate. Returns (out, mean, std, gate, normalized gate input, inverse std of BN (C,),
    batch statistics (2, C): mean and unbiased variance of the gate input, for ``mnv2::batch_norm_update``)."""
    check_feature_map("selfnorm", "x", x)
    batch, channels, n, nhwc = _layout(x)
    _check_gate("selfnorm", channels, fc, {"gamma": gamma, "beta": beta, "running_mean": running_mean,
                                          "running_var": running_var})
    lib, threads = kernels.require("cnsn"), kernels.threads()
    mean, std, y, g, xhat = (x.new_empty(batch, channels) for _ in range(5))
    invstd, batch_stats = x.new_empty(channels), x.new_zeros(2, channels)  # (zero without batch statistics)
    lib.cn_stats(x.data_ptr(), batch, channels, n, nhwc, eps, mean.data_ptr(), std.data_ptr(), threads)
    fc = fc.contiguous()
    lib.sn_gate_input(mean.data_ptr(), std.data_ptr(), fc.data_ptr(), batch, channels, y.data_ptr())
    lib.bn_sigmoid_forward(y.data_ptr(), batch, channels, 1, gamma.contiguous().data_ptr(),
                           beta.contiguous().data_ptr(), running_mean.contiguous().data_ptr(),
                           running_var.contiguous().data_ptr(), int(training), bn_eps, g.data_ptr(), xhat.data_ptr(),
                           invstd.data_ptr(), batch_stats[0].data_ptr(), batch_stats[1].data_ptr())
    out = torch.empty_like(x)
    lib.sn_apply(x.data_ptr(), batch, channels, n, nhwc, g.data_ptr(), None, out.data_ptr(), threads)
    return out, mean, std, g, xhat, invstd, batch_stats


@selfnorm.register_fake
def _(x, fc, *args):
    stats = [x.new_empty(x.shape[:2]) for _ in range(4)]
    return (torch.empty_like(x), *stats, x.new_empty(x.shape[1]), x.new_empty(2, x.shape[1]))


@define("mnv2::selfnorm_backward", mutates_args=(), device_types="cpu")
def selfnorm_backward(grad: Tensor, x: Tensor, fc: Tensor, gamma: Tensor, mean: Tensor, std: Tensor, g: Tensor,
                      xhat: Tensor, invstd: Tensor, training: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (grad x, grad fc, grad BN weight, grad BN bias)."""
    check_feature_map("selfnorm_backward", "x", x)
    check_same_layout("selfnorm_backward", "grad", grad, x)
    batch, channels, n, nhwc = _layout(x)
    _check_gate("selfnorm_backward", channels, fc, {"gamma": gamma, "invstd": invstd})
    for name, t in (("mean", mean), ("std", std), ("g", g), ("xhat", xhat)):
        check_float32_cpu("selfnorm_backward", name, t, (batch, channels))
    mean, std, g, xhat, fc = (t.contiguous() for t in (mean, std, g, xhat, fc))
    lib, threads = kernels.require("cnsn"), kernels.threads()
    d_gate, dy = x.new_empty(batch, channels), x.new_empty(batch, channels)
    lib.sn_backward_reduce(x.data_ptr(), grad.data_ptr(), batch, channels, n, nhwc, d_gate.data_ptr(), None, threads)
    d_gamma, d_beta, d_fc = x.new_empty(channels), x.new_empty(channels), x.new_empty(channels, 1, 2)
    lib.bn_sigmoid_backward(d_gate.data_ptr(), g.data_ptr(), xhat.data_ptr(), batch, channels, 1,
                            gamma.contiguous().data_ptr(), invstd.contiguous().data_ptr(), int(training),
                            dy.data_ptr(), d_gamma.data_ptr(), d_beta.data_ptr())
    d_mean, d_std = x.new_zeros(batch, channels), x.new_zeros(batch, channels)
    lib.sn_gate_input_backward(dy.data_ptr(), mean.data_ptr(), std.data_ptr(), fc.data_ptr(), batch, channels,
                               d_mean.data_ptr(), d_std.data_ptr(), d_fc.data_ptr())
    return _stats_dx(lib, x, mean, std, d_mean, d_std, grad, g), d_fc, d_gamma, d_beta


@selfnorm_backward.register_fake
def _(grad, x, fc, gamma, *args):
    return torch.empty_like(x), torch.empty_like(fc), torch.empty_like(gamma), torch.empty_like(gamma)


def _selfnorm_setup(ctx, inputs, output):
    x, fc, gamma = inputs[:3]
    ctx.training = inputs[6]
    ctx.save_for_backward(x, fc, gamma, *output[1:6])
    ctx.mark_non_differentiable(*output[1:])  # saved state, not results (see triplet.py)
    ctx.set_materialize_grads(False)


def _selfnorm_backward(ctx, grad, *unused):
    x, fc, gamma, mean, std, g, xhat, invstd = ctx.saved_tensors
    grad = grad.contiguous(memory_format=memory_format(x))
    dx, d_fc, d_gamma, d_beta = torch.ops.mnv2.selfnorm_backward(grad, x, fc, gamma, mean, std, g, xhat, invstd,
                                                                 ctx.training)
    return dx, d_fc, d_gamma, d_beta, None, None, None, None, None


selfnorm.register_autograd(_selfnorm_backward, setup_context=_selfnorm_setup)


def _inference(x, gate, second, g_eps, f_eps, eps, out) -> None:
    """SelfNorm of x with running statistics into ``out`` (x itself for the in-place operator: each plane's
    statistics are taken before it is written)."""
    check_feature_map("selfnorm_inference", "x", x)
    batch, channels, n, nhwc = _layout(x)
    _check_gate("selfnorm_inference", channels, gate[0], dict(zip(("g_gamma", "g_beta", "g_mean", "g_var"), gate[1:])))
    if any(t is not None for t in second):
        if any(t is None for t in second):
            raise ValueError("mnv2::selfnorm_inference: give all of f_fc, f_gamma, f_beta, f_mean, f_var or none")
        _check_gate("selfnorm_inference", channels, second[0],
                    dict(zip(("f_gamma", "f_beta", "f_mean", "f_var"), second[1:])))
        second = [t.contiguous() for t in second]
    gate = [t.contiguous() for t in gate]
    kernels.require("cnsn").sn_eval(x.data_ptr(), batch, channels, n, nhwc, eps, *[t.data_ptr() for t in gate], g_eps,
                                    *[kernels.ptr(t) for t in second], f_eps, out.data_ptr(), kernels.threads())


@define("mnv2::selfnorm_inference", mutates_args=(), device_types="cpu")
def selfnorm_inference(x: Tensor, g_fc: Tensor, g_gamma: Tensor, g_beta: Tensor, g_mean: Tensor, g_var: Tensor,
                       g_eps: float, f_fc: Tensor | None, f_gamma: Tensor | None, f_beta: Tensor | None,
                       f_mean: Tensor | None, f_var: Tensor | None, f_eps: float, eps: float) -> Tensor:
    """SelfNorm with running statistics: ``x * g`` (one gate) or ``g * (x - mean) + f * mean`` (two)."""
    out = torch.empty_like(x)
    _inference(x, [g_fc, g_gamma, g_beta, g_mean, g_var], [f_fc, f_gamma, f_beta, f_mean, f_var], g_eps, f_eps, eps,
               out)
    return out


@selfnorm_inference.register_fake
def _(x, *args):
    return torch.empty_like(x)


@define("mnv2::selfnorm_inference_", mutates_args=("x",), device_types="cpu")
def selfnorm_inference_(x: Tensor, g_fc: Tensor, g_gamma: Tensor, g_beta: Tensor, g_mean: Tensor, g_var: Tensor,
                        g_eps: float, f_fc: Tensor | None, f_gamma: Tensor | None, f_beta: Tensor | None,
                        f_mean: Tensor | None, f_var: Tensor | None, f_eps: float, eps: float) -> None:
    """``selfnorm_inference`` written over x, for a tensor nobody else reads (a block's own output)."""
    _inference(x, [g_fc, g_gamma, g_beta, g_mean, g_var], [f_fc, f_gamma, f_beta, f_mean, f_var], g_eps, f_eps, eps,
               x)


@selfnorm_inference_.register_fake
def _(x, *args):
    return None


# Statistics, gates and gating are elementwise or reductions, which torch's FLOP counter does not count
# (torch.var_mean, sigmoid, mul): the same here, so that counts do not depend on the implementation.
@register_flop_formula([torch.ops.mnv2.channel_stats, torch.ops.mnv2.channel_stats_backward, torch.ops.mnv2.selfnorm,
                        torch.ops.mnv2.selfnorm_backward, torch.ops.mnv2.selfnorm_inference,
                        torch.ops.mnv2.selfnorm_inference_])
def _(*args, **kwargs) -> int:
    return 0

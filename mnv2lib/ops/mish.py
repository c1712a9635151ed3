"""``mnv2::mish``, ``mnv2::mish_backward``, ``mnv2::mish_`` (in place, inference): the
single-exponential Mish as C kernels over the flat storage of a dense float32 CPU tensor."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import kernels
from .checks import check_float32_cpu, check_same_layout, is_dense, memory_format
from .library import define


def _check(op: str, x: Tensor) -> None:
    check_float32_cpu(op, "x", x)
    if not is_dense(x):
        raise ValueError(f"mnv2::{op}: x must be contiguous or channels_last; got strides {x.stride()}")


@define("mnv2::mish", mutates_args=(), device_types="cpu")
def mish(x: Tensor) -> Tensor:
    """x * tanh(softplus(x)) of a dense float32 CPU tensor (same layout out)."""
    _check("mish", x)
    out = torch.empty_like(x)
    kernels.require("mish").mish_forward(x.data_ptr(), out.data_ptr(), x.numel(), kernels.threads())
    return out


@mish.register_fake
def _(x):
    return torch.empty_like(x)


@define("mnv2::mish_backward", mutates_args=(), device_types="cpu")
def mish_backward(x: Tensor, grad: Tensor) -> Tensor:
    """grad * mish'(x); grad with the layout of x."""
    _check("mish_backward", x)
    check_same_layout("mish_backward", "grad", grad, x)
    dx = torch.empty_like(x)
    kernels.require("mish").mish_backward(x.data_ptr(), grad.data_ptr(), dx.data_ptr(), x.numel(),
                                          kernels.threads())
    return dx


@mish_backward.register_fake
def _(x, grad):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])  # only the input is kept for backward


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return torch.ops.mnv2.mish_backward(x, grad.contiguous(memory_format=memory_format(x)))


mish.register_autograd(_backward, setup_context=_setup_context)


@define("mnv2::mish_", mutates_args=("x",), device_types="cpu")
def mish_(x: Tensor) -> None:
    """Mish in place (inference: no autograd graph may need x)."""
    _check("mish_", x)
    kernels.require("mish").mish_forward(x.data_ptr(), x.data_ptr(), x.numel(), kernels.threads())


@mish_.register_fake
def _(x):
    return None


# Elementwise ops cost no FLOPs in torch's FLOP counter (F.mish, ReLU, sigmoid are not counted):
# the same here, so that counts do not depend on which implementation ran.
@register_flop_formula([torch.ops.mnv2.mish, torch.ops.mnv2.mish_backward, torch.ops.mnv2.mish_])
def _mish_flops(*args, **kwargs) -> int:
    return 0

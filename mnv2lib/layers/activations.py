"""Activations, created by name: ``create_activation("mish")``.

The project's Mish is a custom autograd Function with a single-exponential
forward and backward, saving only its input. PyTorch's ``F.mish`` evaluates
softplus, tanh and (in backward) sigmoid separately, which on CPU costs about
nine times a ReLU6; no maintained library ships a faster CPU Mish, so it is
written here. The two elementwise kernels are compiled with ``torch.compile``
when that works on the machine, and run eagerly otherwise.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable

import torch
from torch import nn
from torch.autograd.function import once_differentiable

# Above this the single-exponential form would overflow; mish(x) == x there to float precision.
_EXP_CLAMP = 20.0


def mish_reference(x: torch.Tensor) -> torch.Tensor:
    """The textbook definition, x * tanh(softplus(x)), for tests and benchmarks."""
    return x * torch.tanh(nn.functional.softplus(x))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # half precision is computed in float32 (e^x overflows float16 at x > 11); float64 stays.
    return torch.promote_types(t.dtype, torch.float32)


def _mish_forward_math(x: torch.Tensor) -> torch.Tensor:
    # tanh(softplus(x)) = n / (n + 2) with n = e^x (e^x + 2): one exponential.
    xf = x.to(_compute_dtype(x))
    e = torch.exp(torch.clamp(xf, max=_EXP_CLAMP))
    n = e * (e + 2.0)
    return (xf * n / (n + 2.0)).to(x.dtype)


def _mish_backward_math(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    # d/dx mish = t + x * sigmoid(x) * (1 - t^2), t = n / d, d = n + 2;
    # sigmoid(x) * (1 - t^2) = 4 e (e + 1) / d^2.
    xf = x.to(_compute_dtype(x))
    e = torch.exp(torch.clamp(xf, max=_EXP_CLAMP))
    d = e * (e + 2.0) + 2.0
    dy = (d - 2.0) / d + xf * (4.0 * e * (e + 1.0)) / (d * d)
    return (grad.to(xf.dtype) * dy).to(grad.dtype)


class _Kernels:
    """Forward/backward kernels: compiled on first use when possible, else eager."""

    def __init__(self) -> None:
        self.backend = os.environ.get("MNV2_MISH_BACKEND", "auto")  # auto | compiled | eager
        self._compiled: tuple[Callable, Callable] | None = None
        self._failed = False

    def get(self) -> tuple[Callable, Callable]:
        if self.backend == "eager" or self._failed:
            return _mish_forward_math, _mish_backward_math
        if self._compiled is None:
            self._compiled = (
                torch.compile(_mish_forward_math, dynamic=True, fullgraph=True),
                torch.compile(_mish_backward_math, dynamic=True, fullgraph=True),
            )
        return self._compiled

    def disable(self, error: Exception) -> None:
        if self.backend == "compiled":
            raise error
        self._failed = True
        warnings.warn(
            f"torch.compile is unavailable for Mish ({type(error).__name__}: {error}); "
            "using the eager single-exponential kernels, which are correct but slower.",
            RuntimeWarning,
            stacklevel=3,
        )


_kernels = _Kernels()


def set_mish_backend(backend: str) -> None:
    """Choose how Mish runs: "auto" (compiled when possible), "compiled" or "eager"."""
    allowed = ("auto", "compiled", "eager")
    if backend not in allowed:
        raise ValueError(f"mish backend: got {backend!r}; allowed values are {allowed}")
    _kernels.backend = backend
    _kernels._failed = False


def _run(kernel_index: int, *tensors: torch.Tensor) -> torch.Tensor:
    x = tensors[0]
    # The compiled kernels see a flat view of the storage, so one kernel serves every
    # shape and memory format (contiguous or channels_last) without recompiling.
    dense = all(_is_dense(t) and t.stride() == x.stride() for t in tensors)
    flat = [t.as_strided((t.numel(),), (1,)) for t in tensors] if dense else [t.reshape(-1) for t in tensors]
    kernel = _kernels.get()[kernel_index]
    try:
        out = kernel(*flat)
    except Exception as error:  # noqa: BLE001 - compilation can fail in many ways
        if kernel in (_mish_forward_math, _mish_backward_math):
            raise
        _kernels.disable(error)
        out = _kernels.get()[kernel_index](*flat)
    return out.as_strided(x.size(), x.stride()) if dense else out.view(x.shape)


def _is_dense(t: torch.Tensor) -> bool:
    return t.storage_offset() == 0 and (
        t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
    )


class _MishFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)  # only the input is kept for backward
        return _run(0, x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        if grad.stride() != x.stride():
            grad = grad.contiguous(memory_format=_memory_format(x))
        return _run(1, x, grad)


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def mish(x: torch.Tensor) -> torch.Tensor:
    """Mish (Misra, 2019): x * tanh(softplus(x)), fast and memory-light."""
    if x.requires_grad and torch.is_grad_enabled():
        return _MishFunction.apply(x)
    if _is_dense(x):
        return _run(0, x)
    return _run(0, x.contiguous())


class Mish(nn.Module):
    """Module form of :func:`mish`; ``inplace`` is accepted for API parity and ignored."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mish(x)


class MishReference(nn.Module):
    """``torch.nn.functional.mish``: the baseline the fast Mish is benchmarked against."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.mish(x, inplace=self.inplace)


# name -> module class taking ``inplace``; the registry a config string picks from.
_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu6": nn.ReLU6,
    "relu": nn.ReLU,
    "mish": Mish,
    "mish_reference": MishReference,
    "silu": nn.SiLU,
    "hardswish": nn.Hardswish,
    "gelu": nn.GELU,
}


def activation_names() -> tuple[str, ...]:
    return tuple(_ACTIVATIONS)


def register_activation(name: str, module_class: type[nn.Module]) -> None:
    _ACTIVATIONS[name] = module_class


def get_activation_class(name: str) -> type[nn.Module]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation: got {name!r}; allowed values are {activation_names()}")
    return _ACTIVATIONS[name]


def create_activation(name: str, inplace: bool = True) -> nn.Module:
    """An activation module by name; in-place where the module supports it (ReLU6 as torchvision)."""
    cls = get_activation_class(name)
    if cls is nn.GELU:
        return nn.GELU()
    return cls(inplace=inplace)

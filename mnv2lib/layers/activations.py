"""Activations, created by name: ``create_activation("mish")``.

The project's Mish uses a single exponential, ``tanh(softplus(x)) = n / (n + 2)`` with
``n = e^x (e^x + 2)``, and keeps only its input for backward. PyTorch's ``F.mish`` evaluates
softplus, tanh and (in backward) sigmoid separately, which on CPU costs about nine times a ReLU6;
no maintained library ships a faster CPU Mish, so it is written here. On dense float32 CPU tensors
it runs as the ``mnv2::mish`` operator (a C kernel, see :mod:`mnv2lib.ops`); in inference
``Mish(inplace=True)``, as ``Conv2dNormActivation`` builds it, overwrites its input like
torchvision's in-place ReLU6 (``mnv2::mish_``). Elsewhere (CUDA, other dtypes, export, tracing and
scripting, ``torch.func`` transforms) :func:`mish_pytorch`, a few standard ops with bounded
intermediates (one sigmoid), computes the same function.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd import forward_ad

from .. import ops

# Above this e^x (e^x + 2) overflows float32; mish(x) == x there to float precision.


def exporting() -> bool:
    """True while ``torch.export``, ``torch.jit.trace`` or ``torch.jit.script`` captures the model: modules
    then take their PyTorch path, so that exported graphs hold standard operators only. (Scripted modules
    branch on ``torch.jit.is_scripting()`` in ``forward`` itself: TorchScript compiles only that branch.)"""
    return torch.compiler.is_exporting() or torch.jit.is_tracing() or torch.jit.is_scripting()


def pytorch_only() -> bool:
    """True where the modules must run their PyTorch implementation rather than the native operators: while
    exporting (:func:`exporting`), under a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``, ``jvp``,
    ...) and in forward-mode AD (``torch.autograd.forward_ad``): the operators' autograd is a C++
    ``torch::autograd::Function``, which functorch and forward-mode AD refuse."""
    # (exporting()'s three tests inlined: this runs at every module call)
    return (torch.compiler.is_exporting() or torch.jit.is_tracing() or torch.jit.is_scripting()
            or torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0)


def mish_reference(x: torch.Tensor) -> torch.Tensor:
    """The textbook definition, x * tanh(softplus(x)), for tests and benchmarks."""
    return x * torch.tanh(nn.functional.softplus(x))


def mish_pytorch(x: torch.Tensor) -> torch.Tensor:
    """Mish as standard ops with bounded intermediates: with s = sigmoid(x),
    tanh(softplus(x)) = s (2 - s) / (1 + (1 - s)^2), so mish(x) = x * s (2 - s) / (1 + (1 - s)^2).
    Every intermediate lies in [0, 2], which int8 observers can represent: the one-exponential form
    x * n / (n + 2), n = e^x (e^x + 2), spans ~1e17 and its int8 models fell to chance accuracy. One
    transcendental (sigmoid, which XNNPACK and ONNX Runtime run natively) and no select. Half
    precision is computed in float32."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    s = torch.sigmoid(xf)
    u = 1.0 - s
    return (xf * (s * (2.0 - s)) / (1.0 + u * u)).to(x.dtype)


def _native(x: torch.Tensor) -> bool:
    # (pytorch_only first: under vmap a channels_last layout query raises)
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not pytorch_only() and ops.is_dense(x)
            and ops.available("mish"))


def mish(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Mish (Misra, 2019): x * tanh(softplus(x)), fast and memory-light.

    ``inplace=True`` overwrites ``x`` where no autograd graph is recorded (inference,
    ``torch.no_grad``) and the native operator runs; where a graph is, Mish must keep its input
    for backward, so the result is a new tensor and ``x`` is left alone.
    """
    overwrite = inplace and not (x.requires_grad and torch.is_grad_enabled())
    if _native(x):
        if overwrite:
            torch.ops.mnv2.mish_(x)
            return x
        return torch.ops.mnv2.mish(x)
    if overwrite and not pytorch_only() and ops.is_dense(x):  # (exported and transformed graphs stay functional)
        return x.copy_(mish_pytorch(x))
    return mish_pytorch(x)


def set_kernel_backend(backend: str) -> None:
    """How the native operators (Mish, Triplet Attention, CNSN) run: "auto" (C kernels where they
    build), "compiled" (raise if they do not) or "eager" (PyTorch implementations only)."""
    ops.set_kernel_backend(backend)


def set_mish_backend(backend: str) -> None:
    """Alias of :func:`set_kernel_backend` (kept for callers of the earlier name)."""
    try:
        ops.set_kernel_backend(backend)
    except ValueError:
        raise ValueError(f"mish backend: got {backend!r}; allowed values are {ops.kernels.BACKENDS}") from None


class _ClampReLU6(torch.autograd.Function):
    """ReLU6 in place with autograd: ``clamp_(0, 6)`` and ``hardtanh_backward`` on the saved output, the
    same values and gradients as ``nn.ReLU6(inplace=True)``. Written by hand because PyTorch's autograd
    runs ``hardtanh_`` as an out-of-place clamp and a copy back into the input: about 9% of a quick
    baseline training step on this CPU (``make bench``: ``baseline_vs_torchvision_train_ratio``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x.clamp_(0.0, 6.0)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors  # y in (0, 6) exactly where the input was: hardtanh's own mask
        return torch.ops.aten.hardtanh_backward(grad, y, 0.0, 6.0)


class ReLU6(nn.ReLU6):
    """``torch.nn.ReLU6`` (a subclass: same repr, state and isinstance) whose in-place form trains
    without the copy PyTorch's autograd adds to ``hardtanh_``; where a graph is exported, traced,
    compiled or transformed, and without a graph, it is ``nn.ReLU6`` itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # (the branch TorchScript compiles)
            return nn.functional.hardtanh(x, 0.0, 6.0, self.inplace)
        if (self.inplace and x.requires_grad and torch.is_grad_enabled() and not x.is_leaf
                and not pytorch_only() and not torch.compiler.is_compiling()):
            return _ClampReLU6.apply(x)
        return super().forward(x)


class Mish(nn.Module):
    """Module form of :func:`mish`. ``inplace=True`` (what ``Conv2dNormActivation`` passes)
    overwrites the input in inference, like torchvision's ReLU6; in training the input is
    what backward needs, so it is kept and a new tensor is returned."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # (the branch TorchScript compiles: functional, standard ops)
            return mish_pytorch(x)
        return mish(x, self.inplace)


class MishReference(nn.Module):
    """``torch.nn.functional.mish``: the baseline the fast Mish is benchmarked against."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.mish(x, inplace=self.inplace)


# name -> module class taking ``inplace``; the registry a config string picks from.
_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu6": ReLU6,
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

"""``define``: a ``mnv2::`` operator from a typed Python function, with the same decorator interface as
``torch.library.custom_op`` (``register_fake``, ``register_autograd``), built on torch.library's lower
layer: the schema from ``torch.library.infer_schema``, then ``Library.define`` and ``Library.impl``.

Why not ``custom_op`` itself: its per-call Python wrapper (a dynamo-disabling decorator and a check that
results alias no input) costs some 35 us per call inside a network on the 2-core CPU, about 0.55 ms of a
42 ms batch-64 Triplet Attention MobileNetV2 forward (measured side by side; the closing note of issue 15).
The schemas, fake kernels, autograd and ``torch.library.opcheck`` are the same.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable

import torch

NAMESPACE = "mnv2"
LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")  # (also holds registrations for the C++ operators)
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", None: "CompositeExplicitAutograd"}
_OPERATORS: list[Operator] = []


class Operator:
    """A defined operator: calling it calls ``torch.ops.mnv2.<name>``."""

    def __init__(self, qualname: str, fn: Callable, mutates_args: Iterable[str], device_types: str | None):
        namespace, name = qualname.split("::")
        if namespace != NAMESPACE:
            raise ValueError(f"operator name: got {qualname!r}; allowed: '{NAMESPACE}::<name>'")
        if device_types not in _DISPATCH_KEYS:
            raise ValueError(f"device_types: got {device_types!r}; allowed values are {tuple(_DISPATCH_KEYS)}")
        self.qualname = qualname
        self.has_autograd = False
        mutated = self.mutates_args = tuple(mutates_args)
        LIBRARY.define(name + torch.library.infer_schema(fn, mutates_args=mutated))
        LIBRARY.impl(name, _counting_writes(fn, mutated) if mutated else fn, _DISPATCH_KEYS[device_types])
        self._packet = getattr(getattr(torch.ops, NAMESPACE), name)
        functools.update_wrapper(self, fn)
        _OPERATORS.append(self)

    def __call__(self, *args, **kwargs):
        return self._packet(*args, **kwargs)

    def register_fake(self, fn: Callable) -> Callable:
        torch.library.register_fake(self.qualname, fn, lib=LIBRARY)
        return fn

    def register_autograd(self, backward: Callable, *, setup_context: Callable | None = None) -> None:
        torch.library.register_autograd(self.qualname, backward, setup_context=setup_context, lib=LIBRARY)
        self.has_autograd = True


def refuse_gradients_where_unregistered() -> None:
    """Give every functional operator without a backward formula one that raises a clear error, as
    ``custom_op`` does: the dispatcher's fallback would only warn and let gradients be silently wrong.
    (Operators that write their inputs cannot have autograd registered; the modules call them only where
    no gradient is recorded, and the version counters they bump make a later backward fail loudly.)"""
    for op in _OPERATORS:
        if not op.has_autograd and not op.mutates_args:
            torch.library.register_autograd(op.qualname, _refusal(op.qualname), lib=LIBRARY)
            op.has_autograd = True


def _refusal(qualname: str) -> Callable:
    def backward(ctx, *grads):
        raise RuntimeError(f"{qualname} is not differentiable (no backward formula is registered for it)")
    return backward


def _counting_writes(fn: Callable, mutated: tuple[str, ...]) -> Callable:
    """``fn`` bumping the version counters of the tensors it writes, as PyTorch's own in-place ops do (so
    that autograd refuses a saved tensor changed since); ``custom_op`` does this in its ADInplaceOrView
    kernel, the public ``torch.autograd.graph.increment_version`` does it here."""
    parameters = list(inspect.signature(fn).parameters)
    unknown = [name for name in mutated if name not in parameters]
    if unknown:
        raise ValueError(f"mutates_args: got {unknown}; allowed values are the parameters {parameters}")
    positions = [parameters.index(name) for name in mutated]

    @functools.wraps(fn)
    def kernel(*args):
        for position in positions:
            written = args[position]
            torch.autograd.graph.increment_version(written if isinstance(written, torch.Tensor)
                                                   else [t for t in written if t is not None])
        return fn(*args)

    return kernel


def define(qualname: str, *, mutates_args: Iterable[str], device_types: str | None = None) -> Callable[[Callable], Operator]:
    """Decorator: ``@define("mnv2::name", mutates_args=(), device_types="cpu")`` over a typed function."""
    return lambda fn: Operator(qualname, fn, mutates_args, device_types)

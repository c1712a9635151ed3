"""The loaded C libraries, one per ``csrc/<name>.c``, and the backend switch.

``get(name)`` loads a library on first use (see :mod:`.build`) and returns the ctypes handle, or
None where the backend is "eager" or the library cannot be built or trusted (one warning per
library); modules then run their PyTorch implementation. ``available(name)`` is the same test as a
bool, treated by ``torch.compile`` as a constant (so building never happens inside a traced graph).

A library with C++ operators (``csrc/<name>_ops.cpp``) defines them when it is loaded, once per process
(a second copy would register them twice), and then runs the Python registrations given to
:func:`on_load` (fake kernels, FLOP formulas): its ``torch.ops.mnv2`` operators exist from the first
``get``/``available`` on.
"""
from __future__ import annotations

import ctypes
import os
import warnings
from collections.abc import Callable

import torch

from . import build

P, I64, INT, DBL = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double

_BN_SIGMOID = {
    "bn_sigmoid_forward": [P, I64, I64, I64, P, P, P, P, INT, DBL, P, P, P, P, P],
    "bn_sigmoid_backward": [P, P, P, I64, I64, I64, P, P, INT, P, P, P],
}

FUNCTIONS: dict[str, dict[str, list]] = {
    "mish": {
        "mish_forward": [P, P, I64, INT],
        "mish_backward": [P, P, P, I64, INT],
    },
    "triplet_attention": {},  # called from its C++ operators only
    "cnsn": {
        "cn_stats": [P, I64, I64, I64, INT, DBL, P, P, INT],
        "sn_apply": [P, I64, I64, I64, INT, P, P, P, INT],
        "sn_backward_reduce": [P, P, I64, I64, I64, INT, P, P, INT],
        "sn_backward_dx": [P, P, I64, I64, I64, INT, P, P, P, P, P, INT],
        "sn_eval": [P, I64, I64, I64, INT, DBL, P, P, P, P, P, DBL, P, P, P, P, P, DBL, P, INT],
        "sn_gate_input": [P, P, P, I64, I64, P],
        "sn_gate_input_backward": [P, P, P, P, I64, I64, P, P, P],
        **_BN_SIGMOID,
    },
}

BACKENDS = ("auto", "compiled", "eager")
_state = {"backend": os.environ.get("MNV2_KERNEL_BACKEND", "auto")}
_libraries: dict[str, ctypes.CDLL] = {}
_failed: set[str] = set()
_operator_libraries: dict[str, ctypes.CDLL] = {}  # loaded with their operators: never again in this process
_on_load: dict[str, list[Callable[[], None]]] = {}


def on_load(name: str, register: Callable[[], None]) -> None:
    """Run ``register()`` once the C++ operators of library ``name`` are defined (at once if they are)."""
    _on_load.setdefault(name, []).append(register)
    if name in _operator_libraries:
        register()


def _load(name: str) -> ctypes.CDLL:
    if build.operators_source(name) is None:
        return build.load(name, FUNCTIONS[name])
    path = build.build(name)  # (built and verified even when loaded before: the cache's checks apply)
    if name not in _operator_libraries:
        torch.ops.load_library(str(path))
        _operator_libraries[name] = ctypes.CDLL(str(path))
        for register in _on_load.get(name, ()):
            register()
    return _operator_libraries[name]


def set_kernel_backend(backend: str) -> None:
    """"auto" (C kernels where they build, else PyTorch), "compiled" (raise if they do not build) or
    "eager" (PyTorch implementations only)."""
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend: got {backend!r}; allowed values are {BACKENDS}")
    _state["backend"] = backend
    _failed.clear()


def kernel_backend() -> str:
    return _state["backend"]


def get(name: str) -> ctypes.CDLL | None:
    if _state["backend"] == "eager" or name in _failed:
        return None
    lib = _libraries.get(name)
    if lib is None:
        try:
            lib = _libraries[name] = _load(name)
        except Exception as error:  # noqa: BLE001 - no compiler, no OpenMP, unsafe cache, read-only disk, ...
            if _state["backend"] == "compiled":
                raise
            _failed.add(name)
            warnings.warn(f"C kernels for {name} are unavailable ({type(error).__name__}: {error}); "
                          "using the PyTorch implementation, which is correct but slower.",
                          RuntimeWarning, stacklevel=3)
            return None
    return lib


@torch.compiler.assume_constant_result
def available(name: str) -> bool:
    return get(name) is not None


def require(name: str) -> ctypes.CDLL:
    """The library for an operator's implementation; a clear error where it is unavailable."""
    lib = get(name)
    if lib is None:
        raise RuntimeError(f"mnv2 operator: the C kernels for {name} are unavailable (backend "
                           f"{_state['backend']!r}, or they failed to build: see the warning); the modules "
                           "run their PyTorch implementation instead")
    return lib


def threads() -> int:
    return torch.get_num_threads()


def ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()

"""The native libraries, one per ``csrc/<name>.c`` with its ``csrc/<name>_ops.cpp``, and the backend switch.

``get(name)`` builds a library on first use (see :mod:`.build`), loads it and returns its path, or None
where the backend is "eager" or the library cannot be built or trusted (one warning per library);
modules then run their PyTorch implementation. ``available(name)`` is the same test as a bool, treated
by ``torch.compile`` as a constant (so building never happens inside a traced graph).

Loading a library defines its ``torch.ops.mnv2`` operators (``TORCH_LIBRARY``), so it happens once per
process (a second copy would register them twice), and then runs the Python registrations given to
:func:`on_load` (fake kernels, FLOP formulas): the operators exist from the first ``get``/``available``.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from . import build

LIBRARIES = ("mish", "triplet_attention", "cnsn", "batch_norm_act")
BACKENDS = ("auto", "compiled", "eager")


def _environment_backend() -> str:
    """``MNV2_KERNEL_BACKEND`` (unset or empty: "auto"), checked when the package is imported: a typo
    ("eagre") used to leave the native kernels running without a word."""
    backend = os.environ.get("MNV2_KERNEL_BACKEND") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"MNV2_KERNEL_BACKEND: got {backend!r}; allowed values are {BACKENDS} (or unset: 'auto')")
    return backend


_state = {"backend": _environment_backend()}
_libraries: dict[str, Path] = {}  # built (or found) and verified in the current cache
_failed: set[str] = set()
_loaded: dict[str, Path] = {}  # loaded into this process: never again
_on_load: dict[str, list[Callable[[], None]]] = {}


def on_load(name: str, register: Callable[[], None]) -> None:
    """Run ``register()`` once the operators of library ``name`` are defined (at once if they are)."""
    _on_load.setdefault(name, []).append(register)
    if name in _loaded:
        register()


def _load(name: str) -> Path:
    path = build.build(name)  # (built and verified even when loaded before: the cache's checks apply)
    if name not in _loaded:
        torch.ops.load_library(str(path))
        _loaded[name] = path
        for register in _on_load.get(name, ()):
            register()
    return path


def set_kernel_backend(backend: str) -> None:
    """"auto" (native operators where they build, else PyTorch), "compiled" (raise if they do not build)
    or "eager" (PyTorch implementations only)."""
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend: got {backend!r}; allowed values are {BACKENDS}")
    _state["backend"] = backend
    _failed.clear()


def kernel_backend() -> str:
    return _state["backend"]


def get(name: str) -> Path | None:
    if name not in LIBRARIES:
        raise ValueError(f"native library: got {name!r}; allowed values are {LIBRARIES}")
    if _state["backend"] == "eager" or name in _failed:
        return None
    path = _libraries.get(name)
    if path is None:
        try:
            path = _libraries[name] = _load(name)
        except Exception as error:  # noqa: BLE001 - no compiler, no OpenMP, unsafe cache, read-only disk, ...
            if _state["backend"] == "compiled":
                raise
            _failed.add(name)
            warnings.warn(f"native kernels for {name} are unavailable ({type(error).__name__}: {error}); "
                          "using the PyTorch implementation, which is correct but slower.",
                          RuntimeWarning, stacklevel=3)
            return None
    return path


@torch.compiler.assume_constant_result
def available(name: str) -> bool:
    return get(name) is not None

"""What PyTorch takes from Python for the C++ operators of the ``mnv2`` namespace, registered once their
library is loaded (:func:`.kernels.on_load`): fake kernels (the output shapes ``torch.compile`` and
``torch.export`` trace with) and FLOP formulas (``torch.utils.flop_counter``)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import register_flop_formula

from . import kernels

NAMESPACE = "mnv2"
LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")  # holds the Python registrations


def no_flops(*args, **kwargs) -> int:
    """Elementwise ops and reductions cost no FLOPs in torch's FLOP counter (F.mish, sigmoid, var_mean are
    not counted): the same for the operators that are only those, so counts do not depend on the path."""
    return 0


def fake_like_x(x, *args) -> torch.Tensor:
    """Fake kernel of an operator whose result has x's shape and layout."""
    return torch.empty_like(x)


def fake_inplace(x, *args) -> None:
    return None


def register_when_loaded(library: str, fakes: dict[str, Callable],
                         flop_formulas: dict[Callable, tuple[str, ...]]) -> None:
    """Once library ``library`` has defined its operators: the fake kernel of each operator named in
    ``fakes``, and each FLOP formula for the operators named with it."""
    def register() -> None:
        for name, fake in fakes.items():
            torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=LIBRARY)
        namespace = getattr(torch.ops, NAMESPACE)
        for formula, names in flop_formulas.items():
            register_flop_formula([getattr(namespace, name) for name in names])(formula)

    kernels.on_load(library, register)

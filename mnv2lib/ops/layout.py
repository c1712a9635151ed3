"""Layout tests shared by the modules and the fake kernels (the operators' own argument checks are C++,
``csrc/operators.h``)."""
from __future__ import annotations

import torch


def is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def is_dense(x: torch.Tensor) -> bool:
    """Contiguous or channels_last: what the C kernels read flat."""
    return x.is_contiguous() or is_channels_last(x)

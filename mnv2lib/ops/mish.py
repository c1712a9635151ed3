"""``mnv2::mish``, ``mnv2::mish_backward``, ``mnv2::mish_`` (in place, inference): the
single-exponential Mish as C kernels over the flat storage of a dense float32 CPU tensor.

The operators, their CPU kernels and autograd are C++ (``csrc/mish_ops.cpp``), defined when the library is
first loaded (``mnv2lib.ops.available("mish")``); this module registers their fake kernels and FLOP
formulas then.
"""
from __future__ import annotations

from .library import fake_inplace, fake_like_x, no_flops, register_when_loaded

register_when_loaded("mish", {"mish": fake_like_x, "mish_backward": fake_like_x, "mish_": fake_inplace},
                     {no_flops: ("mish", "mish_backward", "mish_")})

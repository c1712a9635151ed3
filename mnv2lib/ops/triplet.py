"""Triplet Attention operators: ``csrc/triplet_attention_ops.cpp`` over ``csrc/triplet_attention.c``.

- ``mnv2::triplet_attention``: the whole module in training (or with autograd): ZPool of the three
  branches in one pass over x, the three 2->1 k x k convolutions, BatchNorm (batch statistics, whose
  running averages and batch counts it updates in place with ``momentum`` as nn.BatchNorm2d does, or
  running statistics) and sigmoid of the small gate planes, and the gating ``x * (g_cw + g_hc + g_s) / 3``.
  It returns the output and what backward needs.
- ``mnv2::triplet_attention_backward``: gradients of x, conv weights and BN affine parameters, two
  passes over (x, grad).
- ``mnv2::triplet_attention_inference``: running statistics, no autograd; one fused pass per sample.
  ``mnv2::triplet_attention_inference_`` writes the result over x (for a network's own intermediates).

Arguments per branch (channel_width, height_channel, spatial): conv weight (1, 2, k, k), BN weight,
bias, running mean, running var (shape (1,) each), batches tracked (int64, shape ()). x: float32 CPU,
(B, C, H, W), contiguous or channels_last; an empty x (any of B, C, H, W zero) gives an empty result,
zero-filled saved planes and zero parameter gradients, and leaves the running statistics alone. Any odd
kernel size runs (the work buffers are on the heap). Planes are stored as they are or transposed, whichever
16-column tiles cover with fewer positions (on a tie the pooling's natural layout); a channels_last x is
read in place as the contiguous (B, H, W, C) tensor y: Triplet Attention of y is that of x with the branches
rotated (y's channel-width plane is x's height-channel plane, y's height-channel plane x's spatial plane
transposed, y's spatial plane x's channel-width plane transposed; the "lanes" of the C++ code).

The operators, their CPU kernels and autograd are C++ (``TORCH_LIBRARY``), defined when the library is
first loaded (``mnv2lib.ops.available("triplet_attention")``); this module registers what PyTorch takes
from Python once they exist: the fake kernels (shapes for ``torch.compile`` and ``torch.export``) and
the FLOP formulas.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .layout import is_channels_last
from .library import fake_inplace, fake_like_x, register_when_loaded

_TILE = 16  # the C++ code's TILE (the kernels' tile width with AVX-512; counted so on every CPU, see there)


def _stored_transposed(rows: int, cols: int, natural_is_transposed: bool) -> bool:
    """The C++ code's ``stored_transposed``: the orientation whose columns the tiles cover with fewer positions,
    on a tie the pooling's natural one."""
    as_is, transposed = rows * -(-cols // _TILE), cols * -(-rows // _TILE)
    return natural_is_transposed if as_is == transposed else transposed < as_is


def _planes(x: Tensor) -> tuple[int, list[tuple[int, int]]]:
    """The batch size and the stored (rows, cols) of each lane's gate plane (the C++ code's ``geometry``): a
    channels_last x is read as (B, H, W, C)."""
    batch, c, h, w = x.permute(0, 2, 3, 1).shape if is_channels_last(x) else x.shape
    official = ((c, w), (h, c), (h, w))
    transposed = [_stored_transposed(r, q, natural_is_transposed=i == 1) for i, (r, q) in enumerate(official)]
    return batch, [(q, r) if t else (r, q) for (r, q), t in zip(official, transposed)]


def _fake_forward(x, w_cw, *args):
    batch, shapes = _planes(x)
    maps = [x.new_empty(batch, 2, r, q) for r, q in shapes]
    planes = [x.new_empty(batch, r, q) for r, q in shapes]
    return (torch.empty_like(x), *maps, *planes, *[x.new_empty(batch, r, q) for r, q in shapes], x.new_empty(3))


def _fake_backward(grad, x, w_cw, w_hc, w_s, *args):
    return (torch.empty_like(x), torch.empty_like(w_cw, memory_format=torch.contiguous_format),
            torch.empty_like(w_hc, memory_format=torch.contiguous_format),
            torch.empty_like(w_s, memory_format=torch.contiguous_format), x.new_empty(3), x.new_empty(3))


def _conv_flops(x_shape, k: int) -> int:
    batch, c, h, w = x_shape
    return 2 * batch * (c * w + h * c + h * w) * 2 * k * k  # three 2->1 k x k convolutions


def _forward_flops(x_shape, w_cw_shape, *args, **kwargs) -> int:
    return _conv_flops(x_shape, w_cw_shape[-1])


def _backward_flops(grad_shape, x_shape, w_cw_shape, *args, **kwargs) -> int:
    return 2 * _conv_flops(x_shape, w_cw_shape[-1])  # gradients of the pooled maps and of the weights


register_when_loaded(
    "triplet_attention",
    {"triplet_attention": _fake_forward, "triplet_attention_backward": _fake_backward,
     "triplet_attention_inference": fake_like_x, "triplet_attention_inference_": fake_inplace},
    {_forward_flops: ("triplet_attention", "triplet_attention_inference", "triplet_attention_inference_"),
     _backward_flops: ("triplet_attention_backward",)})

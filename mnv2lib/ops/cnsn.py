"""CNSN operators: ``csrc/cnsn_ops.cpp`` over ``csrc/cnsn.c``: per-(sample, channel) statistics and SelfNorm.

- ``mnv2::channel_stats(x, eps) -> (mean, std)``, (B, C) each: mean and sqrt(unbiased var + eps) over
  H x W (variance 0 for a single pixel; NaN mean and std for an empty map, as ``torch.std``);
  ``mnv2::channel_stats_backward``.
- ``mnv2::selfnorm``: SelfNorm with one gate in training (or with autograd): statistics, the gate
  ``sigmoid(BN1d(fc0 * mean + fc1 * std))`` (batch statistics, whose running averages and batch count it
  updates in place with ``momentum`` as nn.BatchNorm1d does, or running statistics) and ``x * g``; returns
  what backward needs.
  ``mnv2::selfnorm_backward``.
- ``mnv2::selfnorm_inference``: one or two gates with running statistics, one fused pass;
  ``mnv2::selfnorm_inference_`` writes the result over x.

x: float32 CPU (B, C, H, W), contiguous or channels_last; an empty x gives an empty result (the training
operator then leaves the running statistics alone, as aten's batch_norm).

The operators, their CPU kernels and autograd are C++, defined when the library is first loaded
(``mnv2lib.ops.available("cnsn")``); this module registers their fake kernels and FLOP formulas then.
"""
from __future__ import annotations

import torch

from .library import fake_inplace, fake_like_x, no_flops, register_when_loaded


def _fake_channel_stats(x, eps):
    return x.new_empty(x.shape[:2]), x.new_empty(x.shape[:2])


def _fake_selfnorm(x, fc, *args):
    stats = [x.new_empty(x.shape[:2]) for _ in range(4)]
    return (torch.empty_like(x), *stats, x.new_empty(x.shape[1]))


def _fake_selfnorm_backward(grad, x, fc, gamma, *args):
    return torch.empty_like(x), torch.empty_like(fc), torch.empty_like(gamma), torch.empty_like(gamma)


FAKES = {"channel_stats": _fake_channel_stats, "channel_stats_backward": fake_like_x, "selfnorm": _fake_selfnorm,
         "selfnorm_backward": _fake_selfnorm_backward, "selfnorm_inference": fake_like_x,
         "selfnorm_inference_": fake_inplace}
# statistics, gates and gating are elementwise or reductions
register_when_loaded("cnsn", FAKES, {no_flops: tuple(FAKES)})

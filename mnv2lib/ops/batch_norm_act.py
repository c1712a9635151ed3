"""``mnv2::batch_norm_act`` and its backward: a training BatchNorm2d (batch statistics, running statistics
updated in place) followed by ReLU6 or Mish, as C kernels over a dense float32 CPU tensor
(``csrc/batch_norm_act.c``).

- ``mnv2::batch_norm_act(x, weight, bias, running_mean, running_var, count, momentum, eps, activation) -> (y,
  mean, invstd)``: ``y = activation(batch_norm(x))``, ``activation`` "relu6" or "mish" (Mish as
  ``mnv2::mish`` computes it); ``mean`` and ``invstd`` are the batch's, kept for backward.
- ``mnv2::batch_norm_act_backward(grad, x, weight, bias, mean, invstd, activation) -> (dx, dweight, dbias)``.

Fused because, apart, PyTorch reads and writes the feature map some six times forward and eight backward
(statistics, normalization, activation; the activation's gradient, BatchNorm's sums and input gradient);
together it is three and five, and neither the normalized nor the activated map is kept for backward. The
operators, their CPU kernels and autograd are C++ (``csrc/batch_norm_act_ops.cpp``); this module registers
their fake kernels and FLOP formulas when the library loads.
"""
from __future__ import annotations

import torch

from .library import no_flops, register_when_loaded

ACTIVATIONS = ("relu6", "mish")


def _fake_forward(x, weight, *args):
    return torch.empty_like(x), weight.new_empty(x.shape[1]), weight.new_empty(x.shape[1])


def _fake_backward(grad, x, weight, bias, *args):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)


FAKES = {"batch_norm_act": _fake_forward, "batch_norm_act_backward": _fake_backward}
# normalization and activations are elementwise or reductions (torch's counter counts no BatchNorm either)
register_when_loaded("batch_norm_act", FAKES, {no_flops: tuple(FAKES)})

"""Convolution, BatchNorm and activation: torchvision's ``Conv2dNormActivation``, whose BatchNorm2d and ReLU6 or
Mish train as one native operator (``mnv2::batch_norm_act``) where they can.

Apart, a training BatchNorm2d and its activation read and write the feature map some six times forward and
eight backward; fused, three and five, and neither the normalized nor the activated map is kept for backward.
On this project's 2-core CPU a quick training step takes 0.87-0.90 of its time unfused (baseline, Mish,
Triplet Attention, CNSN; ``make bench``: ``fused_norm_activation_train_ratio``). The values are BatchNorm's and
the activation's to float rounding (the sums are taken in double); the running statistics and batch count move
as ``nn.BatchNorm2d`` moves them.
Everywhere else (inference, no graph, other dtypes or devices, hooks on the BatchNorm or the activation,
another norm or activation, export, tracing, compiling, ``torch.func``) the block is torchvision's.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module
from torchvision.ops import misc

from .. import ops
from .activations import Mish, ReLU6, pytorch_only

FUSED_ACTIVATIONS = {nn.ReLU6: "relu6", ReLU6: "relu6", Mish: "mish"}


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _global_hooks() -> bool:
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


def fused_activation(norm: nn.Module, activation: nn.Module, x: torch.Tensor) -> str | None:
    """The ``mnv2::batch_norm_act`` activation ("relu6", "mish") with which ``activation(norm(x))`` may run as
    one operator, or None: a training ``nn.BatchNorm2d`` with affine parameters and running statistics
    averaged with a momentum, then a ReLU6 or the project's Mish, neither hooked, on a dense float32 CPU
    feature map with more than one value per channel, in eager autograd."""
    name = FUSED_ACTIVATIONS.get(type(activation))
    if (name is not None and type(norm) is nn.BatchNorm2d and norm.training and norm.affine
            and norm.track_running_stats and isinstance(norm.momentum, float) and torch.is_grad_enabled()
            and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and x.shape[0] * x.shape[2] * x.shape[3] > 1 and not pytorch_only()
            and not torch.compiler.is_compiling() and ops.is_dense(x) and not _hooked(norm)
            and not _hooked(activation) and not _global_hooks() and ops.available("batch_norm_act")):
        return name
    return None


class Conv2dNormActivation(misc.Conv2dNormActivation):
    """``torchvision.ops.misc.Conv2dNormActivation`` (a subclass: same modules, names, state dict and repr)
    whose BatchNorm2d and activation train as one native operator where :func:`fused_activation` allows."""

    sequential_in_eval = True  # in eval mode it is nn.Sequential: evaluation may fold its BatchNorm


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self) == 3 and self.training and not torch.jit.is_scripting():
            conv, norm, activation = self[0], self[1], self[2]
            x = conv(x)
            name = fused_activation(norm, activation, x)
            if name is not None:
                return torch.ops.mnv2.batch_norm_act(x, norm.weight, norm.bias, norm.running_mean,
                                                     norm.running_var, norm.num_batches_tracked, norm.momentum,
                                                     norm.eps, name)[0]
            return activation(norm(x))
        return super().forward(x)

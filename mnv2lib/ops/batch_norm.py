"""``mnv2::batch_norm_update``: BatchNorm's running averages from the batch statistics an operator
returned (operators with autograd are functional, so the update is this separate, mutating one).
Batch statistics: (2, N) = mean and unbiased variance of N normalized channels, spread over the
BatchNorm modules whose running buffers are given (their sizes add up to N).

A ``torch.library.custom_op`` (ATen ops only, no kernel of its own): its Python wrapper costs some 35 us
per call, once per Triplet Attention or SelfNorm module in a training step."""
from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("mnv2::batch_norm_update", mutates_args=("running_means", "running_vars", "counts"),
                         device_types="cpu")
def batch_norm_update(batch_stats: Tensor, running_means: list[Tensor], running_vars: list[Tensor],
                      counts: list[Tensor], momentum: float) -> None:
    sizes = [m.numel() for m in running_means]
    if batch_stats.dim() != 2 or batch_stats.shape[0] != 2 or batch_stats.shape[1] != sum(sizes):
        raise ValueError(f"mnv2::batch_norm_update: batch_stats must have shape (2, {sum(sizes)}); got "
                         f"{tuple(batch_stats.shape)}")
    for mean, var, new_mean, new_var in zip(running_means, running_vars, batch_stats[0].split(sizes),
                                           batch_stats[1].split(sizes)):
        mean.lerp_(new_mean.view_as(mean), momentum)  # (1 - momentum) * running + momentum * batch
        var.lerp_(new_var.view_as(var), momentum)
    for count in counts:
        count.add_(1)


@batch_norm_update.register_fake
def _(batch_stats, running_means, running_vars, counts, momentum):
    return None

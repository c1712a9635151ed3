"""Input checks of the operators: a wrong shape, dtype, device or layout raises a clear error
naming what is expected, before any C kernel reads memory."""
from __future__ import annotations

import torch


def is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


def is_dense(x: torch.Tensor) -> bool:
    """Contiguous or channels_last: what the C kernels read flat from ``data_ptr()``."""
    return x.is_contiguous() or is_channels_last(x)


def check_float32_cpu(op: str, name: str, t: torch.Tensor, shape: tuple | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"mnv2::{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype != torch.float32 or t.device.type != "cpu":
        raise ValueError(f"mnv2::{op}: {name} must be a float32 CPU tensor; got {t.dtype} on {t.device}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"mnv2::{op}: {name} must have shape {tuple(shape)}; got {tuple(t.shape)}")


def check_feature_map(op: str, name: str, x: torch.Tensor) -> None:
    check_float32_cpu(op, name, x)
    if x.dim() != 4:
        raise ValueError(f"mnv2::{op}: {name} must be 4-D (batch, channels, height, width); got shape "
                         f"{tuple(x.shape)}")
    if not is_dense(x):
        raise ValueError(f"mnv2::{op}: {name} must be contiguous (NCHW) or channels_last; got strides "
                         f"{x.stride()}")


def check_same_layout(op: str, name: str, t: torch.Tensor, like: torch.Tensor, like_name: str = "x") -> None:
    check_float32_cpu(op, name, t, like.shape)
    if t.stride() != like.stride():
        raise ValueError(f"mnv2::{op}: {name} must have the layout (strides {like.stride()}) of {like_name}; "
                         f"got strides {t.stride()}")

"""The check every model runs on its input: a clear error naming the expected shape and dtype,
instead of torch's "expected scalar type" or a BatchNorm error from deep inside the network."""
from __future__ import annotations

import math

import torch
from torch import nn


def output_stride(features: nn.Module) -> int:
    """2 ** (number of stride-2 convolutions): how much the spatial size shrinks (ceil division)."""
    return 2 ** sum(1 for m in features.modules() if isinstance(m, nn.Conv2d) and m.stride[0] == 2)


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 knows only the CUDA flag
        return torch.is_autocast_enabled()


def check_model_input(model: nn.Module, x, name: str, dtype: torch.dtype, smallest_map: int | None) -> None:
    """``x`` must be a 4-D floating tensor (N, model.in_channels, H, W) of the model's parameter
    ``dtype`` (autocast may mix them). In training mode BatchNorm needs more than one value per
    channel: ``smallest_map`` is the model's output stride, so the last feature map of an image is
    ceil(H / stride) x ceil(W / stride); None: a norm runs on the pooled features, one per image."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} input: got {type(x).__name__}; allowed: a torch.Tensor (N, C, H, W)")
    if x.dim() != 4:
        raise ValueError(f"{name} input: got a {x.dim()}-D tensor of shape {tuple(x.shape)}; "
                         "allowed: a 4-D tensor (batch, channels, height, width)")
    if x.shape[1] != model.in_channels:
        raise ValueError(f"{name} input channels: got {x.shape[1]} (input shape {tuple(x.shape)}); "
                         f"allowed: {model.in_channels}, the model's in_channels")
    if x.dtype != dtype and not (x.is_floating_point() and _autocast_on(x.device.type)):
        hint = (" (uint8 images: mnv2lib.engine.data.normalize(images, mean, std) first)"
                if not x.is_floating_point() else f" (x.to({dtype}) or model.to({dtype}))")
        raise ValueError(f"{name} input dtype: got {x.dtype}; allowed: {dtype}, the dtype of the model's "
                         f"parameters{hint}")
    if model.training:
        n, _, h, w = x.shape
        per_image = 1 if smallest_map is None else math.ceil(h / smallest_map) * math.ceil(w / smallest_map)
        if n * per_image < 2:
            raise ValueError(
                f"{name} input: got a batch of {n} image(s) of {h}x{w} in training mode, whose last feature map "
                f"has {per_image} value(s) per channel; BatchNorm in training mode needs more than one. Allowed: "
                "a batch of at least 2 images" + ("" if smallest_map is None else
                                                   f" or images larger than {smallest_map}x{smallest_map}")
                + ", or model.eval() for inference")


def refuse_scripting(module) -> None:
    """``__prepare_scriptable__`` of the networks: TorchScript's frontend cannot compile their blocks (an
    expansion shortcut's tensor handed between blocks, CrossNorm's schedule hook), so ``torch.jit.script``
    says what works instead of failing deep in the frontend. The layers themselves script."""
    raise TypeError(f"torch.jit.script: {type(module).__name__} cannot be scripted; allowed: torch.jit.trace(model."
                    "eval(), example) or torch.export.export(model.eval(), (example,)), which take the PyTorch path "
                    "of every layer (docs/native-operators.md, 'Transforms: what works')")

"""``build_model``: a ``ModelConfig`` (or keyword arguments) in, a ``nn.Module`` out.

Architectures register a builder by name, so a config string picks the family.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn

from ..layers.activations import get_activation_class
from ..layers.attention import create_attention
from ..layers.cnsn import CNSN, CrossNorm, CrossNormSchedule, SelfNorm
from .config import ModelConfig
from .registry import arch_names, get_builder, register_arch

__all__ = ["build_model", "register_arch", "arch_names", "attach_crossnorm_schedule"]


def build_model(config=None, *, features_only: bool = False, out_indices=None, output_stride: int | None = None,
                **kwargs) -> nn.Module:
    """Build a model from a ``ModelConfig`` and/or keyword overrides.

    >>> build_model(arch="mobilenet_v2", num_classes=10, stem="cifar", activation="mish",
    ...             attention="triplet", cnsn="cnsn")

    ``features_only=True`` returns the feature maps of the stages ``out_indices`` instead of logits, with
    ``model.feature_info`` (timm's convention; ``output_stride`` 8 or 16 dilates the later stages, see
    :mod:`mnv2lib.models.features`).
    """
    if not isinstance(features_only, bool):
        raise ValueError(f"features_only: got {features_only!r}; allowed values are True or False")
    if not features_only and (out_indices is not None or output_stride is not None):
        raise ValueError("out_indices, output_stride: allowed only with features_only=True")
    if config is None:
        config = ModelConfig(**kwargs)
    elif kwargs:
        config = config.replace(**kwargs)
    model = get_builder(config.arch)(config)
    model.config = config
    if features_only:
        from .features import features_only as extract

        model = extract(model, out_indices, output_stride)
        model.config = config
    return model


def _activation_layer(config) -> Callable[..., nn.Module]:
    return _activation_factory(config.activation)


def _activation_factory(name: str) -> Callable[..., nn.Module]:
    cls = get_activation_class(name)
    return cls if cls is not nn.GELU else (lambda inplace=False: nn.GELU())


def _bottleneck_activation_layer(config) -> Callable[[], nn.Module] | None:
    """The activation after the projection 1x1 (in place, as every other activation), or None: linear."""
    if config.bottleneck_activation is None:
        return None
    return partial(_activation_factory(config.bottleneck_activation), inplace=True)


def _cnsn_layer(config) -> Callable[[int], nn.Module] | None:
    if config.cnsn is None:
        return None

    def make(channels: int) -> CNSN:
        crossnorm = (CrossNorm(mode=config.crossnorm_mode, crop=config.crossnorm_crop)
                     if config.cnsn in ("cn", "cnsn") else None)
        selfnorm = (SelfNorm(channels, two_gates=config.selfnorm_two_gates)
                    if config.cnsn in ("sn", "cnsn") else None)
        if selfnorm is not None and config.selfnorm_gate_bias:
            for _, bn in selfnorm._gate_modules():
                nn.init.constant_(bn.bias, config.selfnorm_gate_bias)
        return CNSN(crossnorm, selfnorm)

    return make


def attach_crossnorm_schedule(model: nn.Module, cn_prob: float, active_num: int,
                              generator: torch.Generator | None = None) -> CrossNormSchedule | None:
    """Give the model a CrossNorm schedule that fires once per training forward."""
    modules = [m for m in model.modules() if isinstance(m, CrossNorm)]
    if not modules:
        return None
    schedule = CrossNormSchedule(modules, cn_prob=cn_prob, active_num=active_num, generator=generator)
    model.register_forward_pre_hook(schedule)
    model.crossnorm_schedule = schedule
    return schedule


def _drop_cnsn_beyond(model: nn.Module, max_reduction: int) -> None:
    """No CNSN in the blocks whose output is more than ``max_reduction`` times smaller than the input."""
    from .features import child_reductions  # the spatial path's strides, counted where features_only counts them

    for block, reduction in zip(model.features, child_reductions(model)):
        if reduction > max_reduction and getattr(block, "cnsn", None) is not None:
            block.cnsn = None


def _reject(config, fields: tuple[str, ...], defaults) -> None:
    for name in fields:
        if getattr(config, name) != getattr(defaults, name):
            raise ValueError(f"{name}: got {getattr(config, name)!r}; {config.arch} does not support this "
                             f"option (allowed: {getattr(defaults, name)!r})")


@register_arch("mobilenet_v2")
def _build_mobilenet_v2(config) -> nn.Module:
    from .mobilenetv2 import MobileNetV2, mobilenet_v2_block

    # called with the channel count of the tensor it attends to (timm's create_attn convention)
    attention_layer = (partial(create_attention, config.attention, kernel_size=config.attention_kernel)
                       if config.attention else None)
    block = mobilenet_v2_block(attention_layer=attention_layer, attention_position=config.attention_position,
                               cnsn_layer=_cnsn_layer(config), cnsn_position=config.cnsn_position,
                               shortcut=config.shortcut,
                               bottleneck_activation=_bottleneck_activation_layer(config))
    model = MobileNetV2(num_classes=config.num_classes, width_mult=config.width_mult, block=block,
                        dropout=config.dropout, activation_layer=_activation_layer(config),
                        in_channels=config.in_channels, stem=config.stem, expand_ratio=config.expand_ratio)
    if config.cnsn_max_reduction is not None:
        _drop_cnsn_beyond(model, config.cnsn_max_reduction)
    if config.cnsn in ("cn", "cnsn"):
        attach_crossnorm_schedule(model, config.cn_prob, config.active_num)
    if config.pretrained is not None:
        from .pretrained import load_pretrained

        model.config = config  # named in the error when the shapes do not fit
        load_pretrained(model, config.pretrained)  # sets model.base_parameter_names for fine-tuning
    return model


@register_arch("mobilenet_v1", default_activation="relu")  # the MobileNetV1 paper's
def _build_mobilenet_v1(config) -> nn.Module:
    from .mobilenetv1 import MobileNetV1

    _reject(config, ("attention", "cnsn", "bottleneck_activation", "shortcut", "expand_ratio", "pretrained"),
            ModelConfig())
    return MobileNetV1(num_classes=config.num_classes, width_mult=config.width_mult, dropout=config.dropout,
                       activation_layer=_activation_layer(config), in_channels=config.in_channels,
                       stem=config.stem)

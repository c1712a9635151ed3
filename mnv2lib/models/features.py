"""Feature extraction in timm's convention: ``build_model(..., features_only=True, out_indices=(...))``.

A :class:`FeatureExtractor` runs a classification model's ``features`` and returns the feature maps of
the chosen stages, with ``feature_info`` (channels, reduction, module name) for each, as timm's
``features_only`` models do: for MobileNetV2 the stage ends are the last blocks at reductions 2, 4, 8,
16 and 32 (16, 24, 32, 96 and 320 channels at width 1.0, as timm's), and index 5 is the final 1x1 conv
(1280 channels) that the classifier reads. ``output_stride`` 8 or 16 turns the later stride-2
convolutions into dilated ones (DeepLab's atrous convolution, as torchvision's MobileNetV3 ``dilated``
option does for its last stage). ``taps`` adds a block's expansion tensor (SSDLite's attachment point)
to the returned maps. The weights are the classification model's own modules (same names under
``features``), so a classification checkpoint loads into the extractor with only the classifier's
keys unexpected.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .inputs import check_model_input, refuse_scripting
from .mobilenetv2 import InvertedResidual

OUTPUT_STRIDES = (8, 16, 32)


@dataclass(frozen=True)
class FeaturePoint:
    """One feature map a backbone can return: after ``features[index]`` ("output") or the expansion of
    the block ``features[index]`` ("expansion", an inverted residual block's first 1x1 conv)."""

    index: int
    kind: str
    num_chs: int
    reduction: int
    module: str

    def to_dict(self) -> dict:
        return {"num_chs": self.num_chs, "reduction": self.reduction, "module": self.module, "index": self.index}


def _skipped(module: nn.Module, name: str) -> bool:
    # attention and normalization modules keep their own convolutions: Triplet Attention's k x k gates and
    # MobileNetV4's key/value downsampling (MobileMQA.is_attention) are not the backbone's spatial path
    return name.rsplit(".", 1)[-1] in ("attention", "cnsn") or getattr(module, "is_attention", False)


def main_path_convs(module: nn.Module) -> list[nn.Conv2d]:
    """The convolutions of ``module`` on the backbone's spatial path, in order."""
    out, skipped = [], []
    for name, m in module.named_modules():
        if any(name.startswith(s + ".") for s in skipped):
            continue
        if name and _skipped(m, name):
            skipped.append(name)
            continue
        if isinstance(m, nn.Conv2d):
            out.append(m)
    return out


def _features(model: nn.Module) -> nn.Sequential:
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential):
        raise ValueError(f"model: got {type(model).__name__} without a `features` sequence; allowed: the "
                         "MobileNetV1, V2 and V4 models of build_model")
    return features


def has_head_conv(model: nn.Module) -> bool:
    """MobileNetV2 ends its features with the 1x1 conv to ``last_channel``: not a stage of its own."""
    return any(isinstance(m, InvertedResidual) for m in _features(model))


def _out_channels(module: nn.Module) -> int:
    if hasattr(module, "out_channels"):
        return int(module.out_channels)
    return int(main_path_convs(module)[-1].out_channels)


def child_reductions(model: nn.Module) -> list[int]:
    """The reduction (input side / map side) after each module of ``features``, as the strides are now."""
    out, reduction = [], 1
    for child in _features(model):
        reduction *= 2 ** sum(1 for c in main_path_convs(child) if c.stride[0] == 2)
        out.append(reduction)
    return out


def feature_points(model: nn.Module) -> list[FeaturePoint]:
    """The stage ends of ``model``: the last module of ``features`` at each reduction (stride-2 convs
    counted on the spatial path), and MobileNetV2's final 1x1 conv as one more point."""
    children = list(_features(model))
    reductions = child_reductions(model)
    staged = len(children) - 1 if has_head_conv(model) else len(children)
    ends = {reductions[i]: i for i in range(staged)}
    points = [FeaturePoint(i, "output", _out_channels(children[i]), r, f"features.{i}") for r, i in ends.items()]
    if staged < len(children):
        last = len(children) - 1
        points.append(FeaturePoint(last, "output", _out_channels(children[last]), reductions[last], f"features.{last}"))
    return points


def expansion_point(model: nn.Module, index: int) -> FeaturePoint:
    """The expansion tensor of block ``features[index]`` (SSDLite attaches its first head there)."""
    features = _features(model)
    block = features[index] if 0 <= index < len(features) else None
    if not isinstance(block, InvertedResidual) or not block.has_expansion:
        allowed = [i for i, m in enumerate(features) if isinstance(m, InvertedResidual) and m.has_expansion]
        raise ValueError(f"taps: got block {index!r}; allowed: inverted residual blocks with an expansion {allowed}")
    reduction = child_reductions(model)[index - 1] if index else 1
    return FeaturePoint(index, "expansion", block.hidden_dim, reduction, f"features.{index}.conv.0")


def dilate_(model: nn.Module, output_stride: int) -> nn.Module:
    """Make ``model``'s ``features`` reach at most ``output_stride``: every later stride-2 conv becomes
    stride 1, and it and every later k x k conv on the spatial path is dilated by the stride given up."""
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride: got {output_stride!r}; allowed values are {OUTPUT_STRIDES}")
    reduction, dilation = 1, 1
    for child in _features(model):
        for conv in main_path_convs(child):
            if conv.stride[0] == 2:
                if reduction * 2 > output_stride:
                    conv.stride, dilation = (1, 1), dilation * 2
                else:
                    reduction *= 2
            if dilation > 1 and conv.kernel_size[0] > 1:
                conv.dilation = (dilation, dilation)
                conv.padding = tuple(dilation * (k - 1) // 2 for k in conv.kernel_size)
    return model


class FeatureExtractor(nn.Module):
    """The feature maps of ``points`` (a list, in order) from a classification model's ``features``."""

    __prepare_scriptable__ = refuse_scripting

    def __init__(self, model: nn.Module, points: list[FeaturePoint]) -> None:
        super().__init__()
        self.in_channels = getattr(model, "in_channels", 3)
        self.points = list(points)
        self.feature_info = [p.to_dict() for p in self.points]
        self.last_index = max(p.index for p in self.points)
        # the modules after the last point are dropped (same names for those kept: checkpoints still load)
        self.features = _features(model)[:self.last_index + 1]
        self._taps = {p.index for p in self.points if p.kind == "expansion"}
        self.output_stride = max(p.reduction for p in self.points)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        dtype = next(self.parameters()).dtype
        check_model_input(self, x, type(self).__name__, dtype, self.output_stride)
        outputs: dict[tuple[int, str], torch.Tensor] = {}
        sent = None
        for index, module in enumerate(self.features):
            kwargs = {"expanded": sent} if getattr(module, "receives_expansion", False) else {}
            if index in self._taps:
                kwargs["taps"] = tapped = []
            x = module(x, **kwargs)
            sent = module.take_sent() if getattr(module, "sends_expansion", False) else None
            if index in self._taps:
                outputs[(index, "expansion")] = tapped[0]
            outputs[(index, "output")] = x
        return [outputs[(p.index, p.kind)] for p in self.points]


def features_only(model: nn.Module, out_indices=None, output_stride: int | None = None,
                  taps: tuple = ()) -> FeatureExtractor:
    """``model``'s stage feature maps (``out_indices`` into :func:`feature_points`; None: every stage end
    but MobileNetV2's final 1x1 conv, as timm's), dilated to ``output_stride``, plus the expansions of the
    blocks in ``taps``, in the order of the network."""
    points = feature_points(model)  # the stages of the undilated network
    default = tuple(range(len(points) - (1 if has_head_conv(model) else 0)))
    indices = default if out_indices is None else out_indices
    allowed = tuple(range(len(points)))
    if isinstance(indices, (int, bool)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices) \
            or not indices or len(set(indices)) != len(indices) or any(i not in allowed for i in indices):
        raise ValueError(f"out_indices: got {out_indices!r}; allowed: distinct integers from {allowed} "
                         f"(stages {[(p.module, p.num_chs, p.reduction) for p in points]})")
    if output_stride is not None:
        dilate_(model, output_stride)
        reductions = child_reductions(model)
        points = [dataclasses.replace(p, reduction=reductions[p.index]) for p in points]
    chosen = [points[i] for i in sorted(indices)] + [expansion_point(model, i) for i in taps]
    return FeatureExtractor(model, sorted(chosen, key=lambda p: (p.index, p.kind != "expansion")))

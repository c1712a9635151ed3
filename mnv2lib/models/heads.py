"""Detection and segmentation models over any workbook backbone, from torchvision's own heads.

- :func:`build_ssdlite`: SSDLite (torchvision's ``SSD`` with ``SSDLiteHead``, ``DefaultBoxGenerator`` and
  its extra blocks, the settings of ``ssdlite320_mobilenet_v3_large``). For MobileNetV2 the first head
  reads the expansion of the first output-stride-32 block (the paper's "expansion of layer 15") and the
  second the last layer (the 1x1 conv to 1280 channels), as the MobileNetV2 paper's SSDLite does; for
  other families, the last stage at output stride 16 and the last stage.
- :func:`build_deeplabv3`: DeepLabv3 (torchvision's ``DeepLabV3`` with ``DeepLabHead``: ASPP at rates
  12, 24, 36, 256 channels) on the last block's map (the paper's "second last feature map": 320 channels
  for MobileNetV2) at output stride 16 or 8.
- :func:`build_lraspp`: LR-ASPP (torchvision's ``LRASPP``) on the output-stride-8 and 16 maps.

Only the adapters that turn :mod:`mnv2lib.models.features` extractors into the dictionaries torchvision's
heads read are written here.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
from torch import nn

from .factory import build_model
from .features import FeatureExtractor, feature_points, features_only, has_head_conv
from .mobilenetv2 import InvertedResidual

SSDLITE_SIZE = 320


class _NamedMaps(nn.Module):
    """A feature extractor whose maps come out as the ordered dictionary a torchvision head reads."""

    def __init__(self, extractor: FeatureExtractor, names: list[str], extra: nn.ModuleList | None = None) -> None:
        super().__init__()
        self.body = extractor
        self.names = list(names)
        self.extra = extra if extra is not None else nn.ModuleList()

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        maps = self.body(x)
        for block in self.extra:
            maps.append(block(maps[-1]))
        return OrderedDict(zip(self.names + [str(i) for i in range(len(self.names), len(maps))], maps))


def _backbone(overrides: dict) -> nn.Module:
    if "features_only" in overrides or "num_classes" in overrides:
        raise ValueError("backbone: got features_only or num_classes; allowed: build_model options of the "
                         "backbone only (the head sets its own classes)")
    return build_model(**overrides)


def _ssdlite_points(model: nn.Module) -> tuple[tuple, tuple]:
    """(out_indices, taps) of SSDLite's two backbone maps (output stride 16 and 32)."""
    points = feature_points(model)
    last = len(points) - 1
    at16 = [i for i, p in enumerate(points) if p.reduction == 16]
    if not at16 or points[last].reduction != 32:
        raise ValueError(f"backbone: SSDLite needs maps at output stride 16 and 32; this one reaches "
                         f"{[p.reduction for p in points]} (allowed: an ImageNet stem, not 'cifar'/'cifar_lite')")
    blocks = [i for i, m in enumerate(model.features) if isinstance(m, InvertedResidual)]
    first32 = next((i for i in blocks if i > points[at16[-1]].index), None)
    if first32 is not None and model.features[first32].has_expansion:
        return (last,), (first32,)  # MobileNetV2: the expansion of the first stride-32 block
    return (at16[-1], last), ()


def build_ssdlite(num_classes: int = 91, size: int = SSDLITE_SIZE, **backbone) -> nn.Module:
    """SSDLite at ``size`` x ``size`` over ``build_model(**backbone)`` (e.g. ``activation="mish"``), torchvision's
    detection model: ``model(images, targets)`` trains, ``model(images)`` detects."""
    from torchvision.models.detection import ssdlite
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.models.detection.ssd import SSD

    if isinstance(size, bool) or not isinstance(size, int) or size < 64:
        raise ValueError(f"size: got {size!r}; allowed: an integer >= 64 (SSDLite's default {SSDLITE_SIZE})")
    norm_layer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)  # torchvision's SSDLite setting
    model = _backbone(backbone)
    out_indices, taps = _ssdlite_points(model)
    extractor = features_only(model, out_indices, None, taps)
    depths = [512, 256, 256, 128]
    chans = [p.num_chs for p in extractor.points]
    extra = nn.ModuleList([ssdlite._extra_block(a, b, norm_layer) for a, b in zip([chans[-1], *depths], depths)])
    ssdlite._normal_init(extra)
    body = _NamedMaps(extractor, ["0", "1"], extra)
    anchors = DefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)
    head = ssdlite.SSDLiteHead(chans + depths, anchors.num_anchors_per_location(), num_classes, norm_layer)
    detector = SSD(body, anchors, (size, size), num_classes, head=head, score_thresh=0.001, nms_thresh=0.55,
                   detections_per_img=300, topk_candidates=300, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    detector.config = model.config
    return detector


def _last_block_index(model: nn.Module) -> int:
    """The last stage that is not MobileNetV2's final 1x1 conv (DeepLab's "second last feature map")."""
    return len(feature_points(model)) - (2 if has_head_conv(model) else 1)


def build_deeplabv3(num_classes: int = 21, output_stride: int = 16, **backbone) -> nn.Module:
    """DeepLabv3 (ASPP head) over ``build_model(**backbone)`` dilated to ``output_stride``; the output is
    ``{"out": logits at the input size}``."""
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3

    model = _backbone(backbone)
    index = _last_block_index(model)
    extractor = features_only(model, (index,), output_stride)
    segmenter = DeepLabV3(_NamedMaps(extractor, ["out"]), DeepLabHead(extractor.points[0].num_chs, num_classes))
    segmenter.config = model.config
    return segmenter


def build_lraspp(num_classes: int = 21, inter_channels: int = 128, **backbone) -> nn.Module:
    """LR-ASPP over ``build_model(**backbone)``: the output-stride-8 map ("low") and the last block's map
    dilated to output stride 16 ("high")."""
    from torchvision.models.segmentation.lraspp import LRASPP

    model = _backbone(backbone)
    points = feature_points(model)
    low = next((i for i, p in enumerate(points) if p.reduction == 8), None)
    if low is None:
        raise ValueError(f"backbone: LR-ASPP needs a map at output stride 8; this one has "
                         f"{[p.reduction for p in points]}")
    extractor = features_only(model, (low, _last_block_index(model)), 16)
    low_ch, high_ch = (p.num_chs for p in extractor.points)
    segmenter = LRASPP(_NamedMaps(extractor, ["low", "high"]), low_ch, high_ch, num_classes, inter_channels)
    segmenter.config = model.config
    return segmenter

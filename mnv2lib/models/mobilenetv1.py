"""MobileNetV1 (Howard et al., 2017): a standard conv and 13 depthwise-separable layers.

4,231,976 parameters and about 569M multiply-adds at 224x224 for 1000 classes, the
paper's 4.2M / 569M. Built from the same torchvision blocks as MobileNetV2.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models._utils import _make_divisible
from torchvision.ops.misc import Conv2dNormActivation

from .inputs import check_model_input, output_stride, refuse_scripting
from .mobilenetv2 import init_mobilenet_weights

# (output channels, stride) of the 13 depthwise-separable layers
DEPTHWISE_SEPARABLE_SETTING = [
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
]


class DepthwiseSeparable(nn.Sequential):
    def __init__(self, inp: int, oup: int, stride: int, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU):
        super().__init__()
        self.dw = Conv2dNormActivation(inp, inp, stride=stride, groups=inp, norm_layer=norm_layer,
                                       activation_layer=activation_layer)
        self.pw = Conv2dNormActivation(inp, oup, kernel_size=1, norm_layer=norm_layer,
                                       activation_layer=activation_layer)


class MobileNetV1(nn.Module):

    __prepare_scriptable__ = refuse_scripting
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2,
                 activation_layer=nn.ReLU, in_channels: int = 3, stem: str = "imagenet",
                 round_nearest: int = 8) -> None:
        """``stem="cifar"``: stride 1 in the stem conv and in the first stride-2 layer;
        ``stem="cifar_lite"``: stride 1 in the stem conv only."""
        super().__init__()
        self.in_channels = in_channels
        setting = list(DEPTHWISE_SEPARABLE_SETTING)
        if stem == "cifar":
            first_strided = next(i for i, (_, s) in enumerate(setting) if s == 2)
            setting[first_strided] = (setting[first_strided][0], 1)
        channels = _make_divisible(32 * width_mult, round_nearest)
        features: list[nn.Module] = [
            Conv2dNormActivation(in_channels, channels, stride=1 if stem in ("cifar", "cifar_lite") else 2,
                                 activation_layer=activation_layer)
        ]
        for c, s in setting:
            out = _make_divisible(c * width_mult, round_nearest)
            features.append(DepthwiseSeparable(channels, out, s, activation_layer=activation_layer))
            channels = out
        self.features = nn.Sequential(*features)
        self.last_channel = channels
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(channels, num_classes))
        self.output_stride = output_stride(self.features)
        init_mobilenet_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_model_input(self, x, "MobileNetV1", self.classifier[-1].weight.dtype, self.output_stride)
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))

"""MobileNetV2 (Sandler et al., CVPR 2018), weight-compatible with torchvision.

Same table, same module names and the same initialization as
``torchvision.models.mobilenet_v2``, so torchvision's state_dict loads strictly.
The improvements are injected, never woven in: ``activation_layer`` replaces every
ReLU6 (the projection 1x1 stays linear), ``attention_layer`` and ``cnsn_layer``
build extra modules that sit beside ``conv`` in each block and so keep the base
weights' names.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn
from torchvision.models._utils import _make_divisible
from torchvision.ops.misc import Conv2dNormActivation

from ..layers.attention import check_feature_map

ModuleFactory = Callable[..., nn.Module]

# t: expansion, c: output channels, n: repeats, s: stride of the first repeat
INVERTED_RESIDUAL_SETTING = [
    [1, 16, 1, 1],
    [6, 24, 2, 2],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


class InvertedResidual(nn.Module):
    """Expansion 1x1 -> depthwise 3x3 -> linear projection 1x1, shortcut when shapes allow.

    ``attention_position``: "residual" (after the projection BN, before the add; the
    official Triplet Attention MobileNetV2), "block_output" (after the add) or
    "after_depthwise" (on the expanded tensor). ``cnsn_position``: "post" (after the
    add), "pre" (block input), "residual" (end of the residual branch) or "identity"
    (on the shortcut; such blocks without a shortcut get no CNSN).
    """

    def __init__(
        self,
        inp: int,
        oup: int,
        stride: int,
        expand_ratio: float,
        norm_layer: ModuleFactory | None = None,
        activation_layer: ModuleFactory = nn.ReLU6,
        attention_layer: ModuleFactory | None = None,
        attention_position: str = "residual",
        cnsn_layer: ModuleFactory | None = None,
        cnsn_position: str = "post",
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride: got {stride!r}; allowed values are (1, 2)")
        norm_layer = norm_layer or nn.BatchNorm2d
        hidden_dim = int(round(inp * expand_ratio))
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup

        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden_dim, kernel_size=1, norm_layer=norm_layer,
                                               activation_layer=activation_layer))
        layers.extend([
            Conv2dNormActivation(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim,
                                 norm_layer=norm_layer, activation_layer=activation_layer),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            norm_layer(oup),
        ])
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup
        self._is_cn = stride > 1
        self._depthwise_index = len(layers) - 3

        self.attention_position = attention_position
        self.attention = attention_layer() if attention_layer is not None else None
        self.cnsn_position = cnsn_position
        wants_cnsn = cnsn_layer is not None and (cnsn_position != "identity" or self.use_res_connect)
        cnsn_channels = inp if cnsn_position in ("pre", "identity") else oup
        self.cnsn = cnsn_layer(cnsn_channels) if wants_cnsn else None

    def _residual_branch(self, x: torch.Tensor) -> torch.Tensor:
        if self.attention is None or self.attention_position != "after_depthwise":
            return self.conv(x)
        for index, layer in enumerate(self.conv):
            x = layer(x)
            if index == self._depthwise_index:
                x = self.attention(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cnsn, cnsn_at = self.cnsn, self.cnsn_position
        if cnsn is not None and cnsn_at == "pre":
            x = cnsn(x)
        out = self._residual_branch(x)
        if self.attention is not None and self.attention_position == "residual":
            out = self.attention(out)
        if cnsn is not None and cnsn_at == "residual":
            out = cnsn(out)
        if self.use_res_connect:
            out = out + (cnsn(x) if cnsn is not None and cnsn_at == "identity" else x)
        if self.attention is not None and self.attention_position == "block_output":
            out = self.attention(out)
        if cnsn is not None and cnsn_at == "post":
            out = cnsn(out)
        return out


class MobileNetV2(nn.Module):
    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        inverted_residual_setting: list[list[int]] | None = None,
        round_nearest: int = 8,
        block: ModuleFactory | None = None,
        norm_layer: ModuleFactory | None = None,
        dropout: float = 0.2,
        activation_layer: ModuleFactory = nn.ReLU6,
        in_channels: int = 3,
        stem: str = "imagenet",
    ) -> None:
        """``stem="cifar"``: stride 1 in the stem conv and in the first stride-2 stage (for 32x32);
        ``stem="cifar_lite"``: stride 1 in the stem conv only (4x fewer activations than "cifar")."""
        super().__init__()
        block = block or InvertedResidual
        norm_layer = norm_layer or nn.BatchNorm2d
        setting = [list(row) for row in (inverted_residual_setting or INVERTED_RESIDUAL_SETTING)]
        if stem == "cifar":
            first_strided = next(i for i, row in enumerate(setting) if row[3] == 2)
            setting[first_strided][3] = 1
        self.in_channels = in_channels

        input_channel = _make_divisible(32 * width_mult, round_nearest)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [
            Conv2dNormActivation(in_channels, input_channel, stride=1 if stem in ("cifar", "cifar_lite") else 2,
                                 norm_layer=norm_layer, activation_layer=activation_layer)
        ]
        for t, c, n, s in setting:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(block(input_channel, output_channel, s if i == 0 else 1, expand_ratio=t,
                                      norm_layer=norm_layer, activation_layer=activation_layer))
                input_channel = output_channel
        features.append(Conv2dNormActivation(input_channel, self.last_channel, kernel_size=1,
                                             norm_layer=norm_layer, activation_layer=activation_layer))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))

        for m in self.modules():  # torchvision's initialization
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    @property
    def blocks(self) -> list[InvertedResidual]:
        return [m for m in self.features if isinstance(m, InvertedResidual)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map(x, "MobileNetV2")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"MobileNetV2 input channels: got {x.shape[1]} (input shape {tuple(x.shape)}); "
                             f"allowed: {self.in_channels}, the model's in_channels")
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2_block(attention_layer=None, attention_position="residual", cnsn_layer=None,
                       cnsn_position="post") -> ModuleFactory:
    """An ``InvertedResidual`` factory with the improvements bound, for ``MobileNetV2(block=...)``."""
    return partial(InvertedResidual, attention_layer=attention_layer, attention_position=attention_position,
                   cnsn_layer=cnsn_layer, cnsn_position=cnsn_position)

"""MobileNetV2 (Sandler et al., CVPR 2018), weight-compatible with torchvision.

Same table, same module names and the same initialization as
``torchvision.models.mobilenet_v2``, so torchvision's state_dict loads strictly.
The improvements are injected, never woven in: ``activation_layer`` replaces every
ReLU6 (the projection 1x1 stays linear), ``attention_layer`` and ``cnsn_layer``
build extra modules that sit beside ``conv`` in each block and so keep the base
weights' names.

The paper's own design choices can be switched, for the ablations of its Figure 6:
``bottleneck_activation`` makes the projection non-linear, ``shortcut`` moves the
residual connection from the thin bottlenecks to the wide expansions or removes it,
and ``expand_ratio`` replaces every block's t. With their defaults the network is
torchvision's, module for module.

``shortcut="expansion"``: the classic residual arrangement in MobileNetV2's chain of
layers. Read the network as ``... b_j -> E_{j+1} -> e_{j+1} -> D_{j+1} -> P_{j+1} -> b_{j+1} ...``
(E: expansion 1x1, D: depthwise 3x3, P: projection 1x1; b thin, e wide). The paper's
shortcut joins consecutive bottlenecks, ``b_j = b_{j-1} + P_j(D_j(E_j(b_{j-1})))``. The
expansion shortcut joins consecutive expanded tensors instead: for every block j that
would have the bottleneck shortcut (stride 1, as many input as output channels),
``e_{j+1} = E_{j+1}(b_j) + e_j``, where ``e`` is an expansion layer's output (after its
activation; for a block without expansion layer, t = 1, its input). The residual then
spans D_j, P_j and E_{j+1}: wide -> thin -> wide, a ResNet-style bottleneck block, and
the identity stream runs through the wide tensors while no thin tensor is ever added.
The pairs are the same as the paper's, so both variants have the same number of
shortcuts. Shortcuts are identities only (MobileNetV2 never projects a shortcut): where
``e_j`` and ``e_{j+1}`` have different channel counts (``t_j != t_{j+1}``, which the
paper's table never produces at these places) or block j is the last block, that pair
gets no shortcut. ``MobileNetV2.features`` carries ``e_j`` from block j to block j+1.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn
from torchvision.models._utils import _make_divisible

from ..layers.activations import ReLU6
from ..layers.norm_act import Conv2dNormActivation
from .inputs import check_model_input, output_stride, refuse_scripting

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


SHORTCUTS = ("bottleneck", "expansion", "none")


def init_mobilenet_weights(model: nn.Module) -> None:
    """torchvision's MobileNet initialization (kaiming-normal convs, unit norms, small linear)."""
    for m in model.modules():
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


def _allow_inplace(module: nn.Module | None) -> None:
    """Turn on ``inplace`` for a module that has the switch (Triplet Attention, SelfNorm, CNSN)."""
    if module is not None and isinstance(getattr(module, "inplace", None), bool):
        module.inplace = True


class InvertedResidual(nn.Module):
    """Expansion 1x1 -> depthwise 3x3 -> linear projection 1x1, shortcut when shapes allow.

    ``shortcut``: "bottleneck" (the paper's: block input + block output, when stride is 1
    and the channel counts match), "expansion" (see the module docstring: this block
    sends its expanded tensor to the next block, which adds it to its own expanded tensor;
    ``expanded_input_channels`` is the sender's expanded width, given by the network
    builder when the previous block sends) or "none". ``bottleneck_activation``: a
    factory of the activation applied after the projection BN (before any shortcut add);
    None keeps the projection linear.

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
        activation_layer: ModuleFactory = ReLU6,
        attention_layer: ModuleFactory | None = None,
        attention_position: str = "residual",
        cnsn_layer: ModuleFactory | None = None,
        cnsn_position: str = "post",
        shortcut: str = "bottleneck",
        bottleneck_activation: ModuleFactory | None = None,
        expanded_input_channels: int | None = None,
    ) -> None:
        # Long on purpose: the block's layers in torchvision's order, then each option's module where the
        # forward reads it; helpers would scatter how the options (shortcut, attention, CNSN) interact.
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride: got {stride!r}; allowed values are (1, 2)")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut: got {shortcut!r}; allowed values are {SHORTCUTS}")
        norm_layer = norm_layer or nn.BatchNorm2d
        hidden_dim = int(round(inp * expand_ratio))
        if hidden_dim < 1:
            raise ValueError(f"expand_ratio: got {expand_ratio!r}, which leaves {inp} input channels "
                             f"{hidden_dim} hidden ones; allowed values are numbers > 0 with inp * t >= 0.5")
        self.stride = stride
        self.hidden_dim = hidden_dim
        self.has_expansion = expand_ratio != 1
        self.shortcut = shortcut
        self.use_res_connect = shortcut == "bottleneck" and stride == 1 and inp == oup
        # shortcut="expansion": send e (this block's expanded tensor) to the next block / add the
        # previous block's e to ours; the network builder clears `sends_expansion` when the next
        # block cannot take it (different width, or no next block).
        self.sends_expansion = shortcut == "expansion" and stride == 1 and inp == oup
        self.receives_expansion = (shortcut == "expansion" and expanded_input_channels is not None
                                   and expanded_input_channels == hidden_dim)
        self._sent: torch.Tensor | None = None

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
        # beside `conv`, so that the base weights keep their names and indices
        self.bottleneck_activation = bottleneck_activation() if bottleneck_activation is not None else None

        self.attention_position = attention_position
        # built for the channels of the tensor it attends to (timm's create_attn(type, channels))
        attention_channels = hidden_dim if attention_position == "after_depthwise" else oup
        self.attention = attention_layer(attention_channels) if attention_layer is not None else None
        self.cnsn_position = cnsn_position
        # "identity": CNSN on the shortcut: the block input (bottleneck shortcut) or the received
        # expanded tensor (expansion shortcut); blocks without an incoming shortcut get none.
        wants_cnsn = cnsn_layer is not None and (cnsn_position != "identity" or self.use_res_connect
                                                 or self.receives_expansion)
        if cnsn_position == "identity" and self.receives_expansion:
            cnsn_channels = hidden_dim
        else:
            cnsn_channels = inp if cnsn_position in ("pre", "identity") else oup
        self.cnsn = cnsn_layer(cnsn_channels) if wants_cnsn else None
        # The block owns the tensors it hands to the attention and to CNSN after the projection: let them be
        # overwritten in inference, as torchvision's blocks build nn.ReLU(inplace=True). CNSN "pre" and
        # "identity" see the block's input, which belongs to the caller.
        _allow_inplace(self.attention)
        if cnsn_position in ("post", "residual"):
            _allow_inplace(self.cnsn)

    def _residual_branch(self, x: torch.Tensor, expanded: torch.Tensor | None = None,
                         taps: list | None = None) -> torch.Tensor:
        """``taps``: a list that receives the expanded tensor (a feature extractor's SSDLite tap)."""
        after_depthwise = self.attention is not None and self.attention_position == "after_depthwise"
        if not (after_depthwise or self.sends_expansion or expanded is not None or taps is not None):
            return self.conv(x)
        start = 0
        if expanded is not None or self.sends_expansion or taps is not None:  # e: the expanded tensor
            if self.has_expansion:
                x, start = self.conv[0](x), 1
            if expanded is not None:
                identity = expanded
                if self.cnsn is not None and self.cnsn_position == "identity":
                    identity = self.cnsn(identity)
                x = x + identity
            if self.sends_expansion:
                self._sent = x
            if taps is not None:
                taps.append(x)
        for index in range(start, len(self.conv)):
            x = self.conv[index](x)
            if after_depthwise and index == self._depthwise_index:
                x = self.attention(x)
        return x

    def take_sent(self) -> torch.Tensor | None:
        """The expanded tensor of the last forward, for the next block (shortcut="expansion"); cleared."""
        sent, self._sent = self._sent, None
        return sent

    def forward(self, x: torch.Tensor, expanded: torch.Tensor | None = None,
                taps: list | None = None) -> torch.Tensor:
        """``expanded``: the previous block's expanded tensor, for a block that receives an
        expansion shortcut (``MobileNetV2.features`` passes it); ``taps``: a list that receives this
        block's expanded tensor (``models.features``)."""
        if self.receives_expansion and expanded is None:
            raise ValueError("expanded: got None; this block adds the previous block's expanded tensor "
                             "(shortcut='expansion'): run it inside MobileNetV2.features, which passes it")
        if expanded is not None and not self.receives_expansion:
            raise ValueError("expanded: got a tensor; allowed only for blocks that receive an expansion "
                             "shortcut (receives_expansion=True)")
        cnsn, cnsn_at = self.cnsn, self.cnsn_position
        if cnsn is not None and cnsn_at == "pre":
            x = cnsn(x)
        out = self._residual_branch(x, expanded, taps)
        if self.bottleneck_activation is not None:
            out = self.bottleneck_activation(out)
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


class Features(nn.Sequential):
    """``nn.Sequential`` (same names, same indexing) that also carries each sending block's
    expanded tensor to the next block, for ``shortcut="expansion"``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not any(getattr(m, "sends_expansion", False) for m in self):
            return super().forward(x)
        sent = None
        for module in self:
            if getattr(module, "receives_expansion", False):
                x = module(x, expanded=sent)
            else:
                x = module(x)
            sent = module.take_sent() if getattr(module, "sends_expansion", False) else None
        return x


class MobileNetV2(nn.Module):

    __prepare_scriptable__ = refuse_scripting
    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        inverted_residual_setting: list[list[int]] | None = None,
        round_nearest: int = 8,
        block: ModuleFactory | None = None,
        norm_layer: ModuleFactory | None = None,
        dropout: float = 0.2,
        activation_layer: ModuleFactory = ReLU6,
        in_channels: int = 3,
        stem: str = "imagenet",
        expand_ratio: float | None = None,
    ) -> None:
        """``stem="cifar"``: stride 1 in the stem conv and in the first stride-2 stage (for 32x32);
        ``stem="cifar_lite"``: stride 1 in the stem conv only (4x fewer activations than "cifar").
        ``expand_ratio``: t of every block, the first (t = 1 in the table) included; None: the table's."""
        super().__init__()
        block = block or InvertedResidual
        norm_layer = norm_layer or nn.BatchNorm2d
        setting = [list(row) for row in (inverted_residual_setting or INVERTED_RESIDUAL_SETTING)]
        if expand_ratio is not None:
            for row in setting:
                row[0] = expand_ratio
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
        previous = None
        for t, c, n, s in setting:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                sends = getattr(previous, "sends_expansion", False)
                extra = {"expanded_input_channels": previous.hidden_dim} if sends else {}
                current = block(input_channel, output_channel, s if i == 0 else 1, expand_ratio=t,
                                norm_layer=norm_layer, activation_layer=activation_layer, **extra)
                if sends and not current.receives_expansion:  # widths differ: identity shortcuts only
                    previous.sends_expansion = False
                features.append(current)
                previous = current
                input_channel = output_channel
        if getattr(previous, "sends_expansion", False):  # no expansion layer follows the last block
            previous.sends_expansion = False
        features.append(Conv2dNormActivation(input_channel, self.last_channel, kernel_size=1,
                                             norm_layer=norm_layer, activation_layer=activation_layer))
        self.features = Features(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        self.output_stride = output_stride(self.features)

        init_mobilenet_weights(self)

    @property
    def blocks(self) -> list[InvertedResidual]:
        return [m for m in self.features if isinstance(m, InvertedResidual)]

    def shortcuts(self) -> list[tuple[int, int, str]]:
        """Every residual connection as (from block, to block, tensor joined), blocks counted from 0:
        a bottleneck shortcut of block j is (j, j, "bottleneck"); an expansion shortcut from block j
        to block j + 1 is (j, j + 1, "expansion")."""
        blocks = self.blocks
        out = [(j, j, "bottleneck") for j, b in enumerate(blocks) if b.use_res_connect]
        out += [(j, j + 1, "expansion") for j, b in enumerate(blocks) if getattr(b, "sends_expansion", False)]
        return sorted(out)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_model_input(self, x, "MobileNetV2", self.classifier[-1].weight.dtype, self.output_stride)
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2_block(attention_layer=None, attention_position="residual", cnsn_layer=None,
                       cnsn_position="post", shortcut="bottleneck", bottleneck_activation=None) -> ModuleFactory:
    """An ``InvertedResidual`` factory with the options bound, for ``MobileNetV2(block=...)``."""
    return partial(InvertedResidual, attention_layer=attention_layer, attention_position=attention_position,
                   cnsn_layer=cnsn_layer, cnsn_position=cnsn_position, shortcut=shortcut,
                   bottleneck_activation=bottleneck_activation)

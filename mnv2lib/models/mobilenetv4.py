"""MobileNetV4 (Qin et al., "MobileNetV4: Universal Models for the Mobile Ecosystem", ECCV 2024).

Four kinds of block, each network a table of them (as timm's and the TensorFlow reference's
tables; the tables below are those of ``timm.models.mobilenetv3._gen_mobilenet_v4``):

- ``conv_bn``: a plain conv -> BN -> activation (the stem-like stages of conv-S, the last 1x1).
- ``fused_ib``: Fused Inverted Bottleneck, k x k expansion conv -> (SE) -> linear 1x1 projection.
- ``uib``: Universal Inverted Bottleneck, ``[start dw k_a] -> 1x1 expansion -> [middle dw k] -> (SE)
  -> linear 1x1 projection [-> layer scale]``, either depthwise conv optional (kernel 0: none):
  ExtraDW (a, k), IB (0, k: MobileNetV2's block), ConvNext-like (a, 0) and FFN (0, 0). The start
  depthwise conv has no activation, as in the reference; the stride sits on the middle depthwise
  conv (on the start one when there is no middle one).
- ``mqa``: Mobile MQA, ``x + layer_scale(MQA(BN(x)))``: multi-query attention, one query
  projection per head and a single key and value projection shared by all heads; with
  ``kv_stride`` > 1 the keys and values are computed from a map downsampled by a strided depthwise
  conv + BN (the paper's spatial reduction), so attention costs ``HW x HW / kv_stride^2``.

Residuals as in the paper / timm: FusedIB, UIB and Mobile MQA add their input when stride is 1
and the channel counts match; ``conv_bn`` blocks have none. Every projection is linear (no
activation after its BN). The hybrid models put a layer scale (init 1e-5) at the end of every
UIB and Mobile MQA block, residual or not, as timm does.

Head, as the paper's tables: global average pool -> 1x1 conv (``head_hidden``, 1280) -> BN ->
activation -> dropout -> linear. The BN sees one value per channel and image, so training needs
batches of at least 2 (evaluation works at any batch size).

Width: ``width_mult`` scales every block's channels (rounded to multiples of 8) as timm's
``channel_multiplier`` does: the stem is kept when ``width_mult < 1``, the head's 1280 and the
attention heads / key dimensions are never scaled. So ``mobilenet_v4_small(width_mult=0.5)`` is
timm's ``mobilenetv4_conv_small_050`` and ``mobilenet_v4_hybrid_medium(width_mult=0.75)`` its
``mobilenetv4_hybrid_medium_075``.

``stem`` (as MobileNetV1 and V2 here): "imagenet" (the paper's, output stride 32), "cifar"
(stride 1 in the stem conv and in the first stride-2 block: output stride 8, a 4x4 map for 32x32
inputs) or "cifar_lite" (stride 1 in the stem conv only: output stride 16).

Parameter counts (1000 classes) equal timm 1.0.31's, and :func:`convert_timm_state_dict` maps a
timm ``mobilenetv4_*`` state_dict (conv small/medium/large, hybrid medium/large and their width
variants: all have the same structure here) onto these modules, so its weights load strictly and
give the same outputs in eval mode. The anti-aliased timm variants (``conv_aa_*``,
``conv_blur_*``) are not built here.

``build_model(arch="mobilenet_v4_conv_small", ...)`` and the other registered names
(``mobilenet_v4_{conv_small,conv_medium,conv_large,hybrid_medium,hybrid_large,nano,custom}``)
default to the paper's activation (ReLU; GELU for hybrid-L), as the convenience constructors do.
torchinfo's multiply-adds (``mnv2lib.engine.summary``) count the convolutions and linear layers, not
the two attention matmuls of each Mobile MQA block (q k^T and attention x v).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models._utils import _make_divisible
from torchvision.ops.misc import Conv2dNormActivation, SqueezeExcitation

from ..utils.checks import check_int, check_number
from .config import STEMS
from .factory import _activation_factory, _reject, register_arch
from .inputs import check_model_input, refuse_scripting
from .mobilenetv2 import init_mobilenet_weights

ModuleFactory = Callable[..., nn.Module]
KINDS = ("conv_bn", "fused_ib", "uib", "mqa")


# ---------------------------------------------------------------------------------------------
# The tables
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    """One block of a table. Kernels of 0 mean "no such conv"; channels before ``width_mult``."""

    kind: str                   # one of KINDS
    out_channels: int
    stride: int = 1
    kernel_size: int = 3        # conv_bn, fused_ib
    expand_ratio: float = 1.0   # fused_ib, uib
    start_dw: int = 0           # uib: depthwise conv before the expansion
    middle_dw: int = 0          # uib: depthwise conv after the expansion
    num_heads: int = 0          # mqa
    key_dim: int = 0            # mqa: key and value dimension (per head for the queries)
    kv_stride: int = 1          # mqa: key/value downsampling


def conv_bn(k: int, s: int, c: int) -> list[Block]:
    return [Block("conv_bn", c, s, kernel_size=k)]


def fused_ib(k: int, s: int, e: float, c: int) -> list[Block]:
    return [Block("fused_ib", c, s, kernel_size=k, expand_ratio=e)]


def uib(a: int, k: int, s: int, e: float, c: int, n: int = 1) -> list[Block]:
    """``n`` UIBs (only the first strided): ExtraDW (a, k), IB (0, k), ConvNext (a, 0), FFN (0, 0)."""
    return [Block("uib", c, s if i == 0 else 1, expand_ratio=e, start_dw=a, middle_dw=k) for i in range(n)]


def mqa(h: int, d: int, v: int, c: int) -> list[Block]:
    """Mobile MQA with ``h`` heads, key/value dimension ``d`` and key/value stride ``v``."""
    return [Block("mqa", c, 1, num_heads=h, key_dim=d, kv_stride=v)]


@dataclass(frozen=True)
class Variant:
    stem_channels: int
    stages: tuple[tuple[Block, ...], ...]
    head_hidden: int = 1280
    layer_scale: float | None = None  # init value of the layer scales; None: no layer scale
    activation: str = "relu"          # the paper's


def _variant(stem: int, stages: list[list[Block]], **kwargs) -> Variant:
    return Variant(stem, tuple(tuple(stage) for stage in stages), **kwargs)


VARIANTS: dict[str, Variant] = {
    "conv_small": _variant(32, [
        conv_bn(3, 2, 32) + conv_bn(1, 1, 32),
        conv_bn(3, 2, 96) + conv_bn(1, 1, 64),
        uib(5, 5, 2, 3, 96) + uib(0, 3, 1, 2, 96, n=4) + uib(3, 0, 1, 4, 96),
        uib(3, 3, 2, 6, 128) + uib(5, 5, 1, 4, 128) + uib(0, 5, 1, 4, 128) + uib(0, 5, 1, 3, 128)
        + uib(0, 3, 1, 4, 128, n=2),
        conv_bn(1, 1, 960),
    ]),
    "conv_medium": _variant(32, [
        fused_ib(3, 2, 4, 48),
        uib(3, 5, 2, 4, 80) + uib(3, 3, 1, 2, 80),
        uib(3, 5, 2, 6, 160) + uib(3, 3, 1, 4, 160, n=2) + uib(3, 5, 1, 4, 160) + uib(3, 3, 1, 4, 160)
        + uib(3, 0, 1, 4, 160) + uib(0, 0, 1, 2, 160) + uib(3, 0, 1, 4, 160),
        uib(5, 5, 2, 6, 256) + uib(5, 5, 1, 4, 256) + uib(3, 5, 1, 4, 256, n=2) + uib(0, 0, 1, 4, 256)
        + uib(3, 0, 1, 4, 256) + uib(3, 5, 1, 2, 256) + uib(5, 5, 1, 4, 256) + uib(0, 0, 1, 4, 256, n=2)
        + uib(5, 0, 1, 2, 256),
        conv_bn(1, 1, 960),
    ]),
    "conv_large": _variant(24, [
        fused_ib(3, 2, 4, 48),
        uib(3, 5, 2, 4, 96) + uib(3, 3, 1, 4, 96),
        uib(3, 5, 2, 4, 192) + uib(3, 3, 1, 4, 192, n=3) + uib(3, 5, 1, 4, 192) + uib(5, 3, 1, 4, 192, n=5)
        + uib(3, 0, 1, 4, 192),
        uib(5, 5, 2, 4, 512, n=4) + uib(5, 0, 1, 4, 512) + uib(5, 3, 1, 4, 512) + uib(5, 0, 1, 4, 512, n=2)
        + uib(5, 3, 1, 4, 512) + uib(5, 5, 1, 4, 512) + uib(5, 0, 1, 4, 512, n=3),
        conv_bn(1, 1, 960),
    ]),
    "hybrid_medium": _variant(32, [
        fused_ib(3, 2, 4, 48),
        uib(3, 5, 2, 4, 80) + uib(3, 3, 1, 2, 80),
        uib(3, 5, 2, 6, 160) + uib(0, 0, 1, 2, 160) + uib(3, 3, 1, 4, 160) + uib(3, 5, 1, 4, 160)
        + mqa(4, 64, 2, 160) + uib(3, 3, 1, 4, 160) + mqa(4, 64, 2, 160) + uib(3, 0, 1, 4, 160)
        + mqa(4, 64, 2, 160) + uib(3, 3, 1, 4, 160) + mqa(4, 64, 2, 160) + uib(3, 0, 1, 4, 160),
        uib(5, 5, 2, 6, 256) + uib(5, 5, 1, 4, 256) + uib(3, 5, 1, 4, 256, n=2) + uib(0, 0, 1, 2, 256)
        + uib(3, 5, 1, 2, 256) + uib(0, 0, 1, 2, 256) + uib(0, 0, 1, 4, 256)
        + mqa(4, 64, 1, 256) + uib(3, 0, 1, 4, 256) + mqa(4, 64, 1, 256) + uib(5, 5, 1, 4, 256)
        + mqa(4, 64, 1, 256) + uib(5, 0, 1, 4, 256) + mqa(4, 64, 1, 256) + uib(5, 0, 1, 4, 256),
        conv_bn(1, 1, 960),
    ], layer_scale=1e-5),
    "hybrid_large": _variant(24, [
        fused_ib(3, 2, 4, 48),
        uib(3, 5, 2, 4, 96) + uib(3, 3, 1, 4, 96),
        uib(3, 5, 2, 4, 192) + uib(3, 3, 1, 4, 192, n=3) + uib(3, 5, 1, 4, 192) + uib(5, 3, 1, 4, 192, n=2)
        + mqa(8, 48, 2, 192) + uib(5, 3, 1, 4, 192) + mqa(8, 48, 2, 192) + uib(5, 3, 1, 4, 192)
        + mqa(8, 48, 2, 192) + uib(5, 3, 1, 4, 192) + mqa(8, 48, 2, 192) + uib(3, 0, 1, 4, 192),
        uib(5, 5, 2, 4, 512, n=4) + uib(5, 0, 1, 4, 512) + uib(5, 3, 1, 4, 512) + uib(5, 0, 1, 4, 512, n=2)
        + uib(5, 3, 1, 4, 512) + uib(5, 5, 1, 4, 512) + mqa(8, 64, 1, 512) + uib(5, 0, 1, 4, 512)
        + mqa(8, 64, 1, 512) + uib(5, 0, 1, 4, 512) + mqa(8, 64, 1, 512) + uib(5, 0, 1, 4, 512)
        + mqa(8, 64, 1, 512) + uib(5, 0, 1, 4, 512),
        conv_bn(1, 1, 960),
    ], layer_scale=1e-5, activation="gelu"),
    # Not from the paper: a conv-only network for 32x32 images (CIFAR), this library's design.
    # conv-M's block mix with 10 blocks instead of 22, 3/8 to 1/2 of its widths, and a 384 -> 512
    # head instead of 960 -> 1280 (which alone holds 2.5M of conv-S's 3.8M parameters). Its
    # pyramid is the others' (output stride 32 with the "imagenet" stem), so ``stem`` means the
    # same: with stem="cifar" (the default of ``mobilenet_v4_nano``) a 32x32 image keeps full
    # resolution through the FusedIB stage and ends on a 4x4 map: 544,794 parameters and 25M
    # multiply-adds for 10 classes (1.05M and 81M for 1000 classes at 224x224, "imagenet" stem).
    "nano": _variant(16, [
        fused_ib(3, 2, 3, 24),
        uib(3, 3, 2, 4, 40) + uib(0, 3, 1, 2, 40),
        uib(3, 5, 2, 4, 64) + uib(0, 3, 1, 3, 64) + uib(3, 0, 1, 3, 64),
        uib(5, 5, 2, 4, 96) + uib(0, 3, 1, 3, 96) + uib(5, 0, 1, 3, 96) + uib(0, 0, 1, 2, 96),
        conv_bn(1, 1, 384),
    ], head_hidden=512),
}


def custom_variant(base_channels: int = 32, expansion: float = 4.0, num_heads: int = 0, key_dim: int = 64,
                   head_hidden: int = 1280, block_counts: Sequence[int] = (1, 2, 6, 8),
                   layer_scale: float | None = None) -> Variant:
    """A MobileNetV4-style table from a few knobs (see :func:`mobilenet_v4_custom`).

    Stem ``base``; stage 1: ``block_counts[0]`` FusedIB (k3, first one stride 2), ``1.5 base``
    channels; stages 2-4: ``block_counts[1:]`` UIBs with ``2.5, 5, 8 x base`` channels, the first an
    ExtraDW (start 3x3, middle 5x5, stride 2), the others cycling ExtraDW (3, 3), ConvNext (3, 0),
    IB (0, 3), FFN (0, 0); every expansion ``expansion``; a last 1x1 conv to ``30 base`` channels
    (base 32: conv-M's 48, 80, 160, 256, 960). ``num_heads > 0`` makes it hybrid, as the paper's
    hybrids: in stages 3 and 4 a Mobile MQA block (``num_heads`` heads, ``key_dim``; key/value
    stride 2 in stage 3, 1 in stage 4) goes before every second UIB counted from the stage's last
    (never before its first), and layer scale (1e-5 unless ``layer_scale`` says otherwise) is on.
    """
    _check_int("base_channels", base_channels, 1)
    _check_positive("expansion", expansion)
    _check_int("num_heads", num_heads, 0)
    _check_int("key_dim", key_dim, 1)
    _check_int("head_hidden", head_hidden, 1)
    if (isinstance(block_counts, (str, bytes)) or not isinstance(block_counts, Sequence) or len(block_counts) != 4
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in block_counts)):
        raise ValueError(f"block_counts: got {block_counts!r}; allowed values are 4 integers >= 1 "
                         "(FusedIB blocks of stage 1, UIBs of stages 2, 3 and 4)")
    if layer_scale is not None:
        _check_positive("layer_scale", layer_scale)
    c = [_make_divisible(base_channels * m, 8) for m in (1.5, 2.5, 5, 8, 30)]
    cycle = [(3, 3), (3, 0), (0, 3), (0, 0)]
    stages = [sum((fused_ib(3, 2 if i == 0 else 1, expansion, c[0]) for i in range(block_counts[0])), [])]
    for stage, (n, channels) in enumerate(zip(block_counts[1:], c[1:4]), start=1):
        blocks = uib(3, 5, 2, expansion, channels)
        for i in range(1, n):
            if num_heads and stage >= 2 and (n - 1 - i) % 2 == 0:
                blocks += mqa(num_heads, key_dim, 2 if stage == 2 else 1, channels)
            blocks += uib(*cycle[(i - 1) % 4], 1, expansion, channels)
        stages.append(blocks)
    stages.append(conv_bn(1, 1, c[4]))
    if layer_scale is None and num_heads:
        layer_scale = 1e-5
    return _variant(_make_divisible(base_channels, 8), stages, head_hidden=head_hidden, layer_scale=layer_scale)


# ---------------------------------------------------------------------------------------------
# The blocks
# ---------------------------------------------------------------------------------------------

class LayerScale2d(nn.Module):
    """Per-channel learnable scale of an NCHW tensor (``gamma``, initialized to ``init_value``)."""

    def __init__(self, channels: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.view(1, -1, 1, 1)


def _squeeze_excitation(channels: int, se_ratio: float, activation_layer: ModuleFactory) -> nn.Module | None:
    if not se_ratio:
        return None
    return SqueezeExcitation(channels, _make_divisible(channels * se_ratio, 8), activation=activation_layer)


class FusedIB(nn.Module):
    """k x k expansion conv (strided) -> (SE) -> linear 1x1 projection, residual when shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: float, kernel_size: int = 3,
                 se_ratio: float = 0.0, activation_layer: ModuleFactory = nn.ReLU,
                 norm_layer: ModuleFactory = nn.BatchNorm2d) -> None:
        super().__init__()
        hidden = _make_divisible(inp * expand_ratio, 8)
        self.use_res_connect = stride == 1 and inp == oup
        self.expand = Conv2dNormActivation(inp, hidden, kernel_size, stride, norm_layer=norm_layer,
                                           activation_layer=activation_layer)
        self.se = _squeeze_excitation(hidden, se_ratio, activation_layer)
        self.project = Conv2dNormActivation(hidden, oup, 1, norm_layer=norm_layer, activation_layer=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(x)
        if self.se is not None:
            out = self.se(out)
        out = self.project(out)
        return x + out if self.use_res_connect else out


class UniversalInvertedBottleneck(nn.Module):
    """[start dw] -> 1x1 expansion -> [middle dw] -> (SE) -> linear 1x1 projection -> [layer scale].

    ``start_dw`` / ``middle_dw``: kernel sizes, 0 for none (ExtraDW: both, IB: middle only,
    ConvNext: start only, FFN: neither). The stride goes on the middle dw conv, or on the start
    one when there is no middle one; the start dw conv is linear (BN, no activation).
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: float, start_dw: int = 0,
                 middle_dw: int = 3, se_ratio: float = 0.0, layer_scale: float | None = None,
                 activation_layer: ModuleFactory = nn.ReLU, norm_layer: ModuleFactory = nn.BatchNorm2d) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride: got {stride!r}; allowed values are (1, 2)")
        if stride > 1 and not (start_dw or middle_dw):
            raise ValueError(f"stride: got {stride} for a UIB without depthwise convs (start_dw=0, middle_dw=0); "
                             "allowed: 1, or give the block a start or middle depthwise conv")
        hidden = _make_divisible(inp * expand_ratio, 8)
        self.use_res_connect = stride == 1 and inp == oup
        self.start_dw = (Conv2dNormActivation(inp, inp, start_dw, 1 if middle_dw else stride, groups=inp,
                                              norm_layer=norm_layer, activation_layer=None)
                         if start_dw else None)
        self.expand = Conv2dNormActivation(inp, hidden, 1, norm_layer=norm_layer, activation_layer=activation_layer)
        self.middle_dw = (Conv2dNormActivation(hidden, hidden, middle_dw, stride, groups=hidden,
                                               norm_layer=norm_layer, activation_layer=activation_layer)
                          if middle_dw else None)
        self.se = _squeeze_excitation(hidden, se_ratio, activation_layer)
        self.project = Conv2dNormActivation(hidden, oup, 1, norm_layer=norm_layer, activation_layer=None)
        self.layer_scale = LayerScale2d(oup, layer_scale) if layer_scale is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for module in (self.start_dw, self.expand, self.middle_dw, self.se, self.project, self.layer_scale):
            if module is not None:
                out = module(out)
        return x + out if self.use_res_connect else out


class MobileMQA(nn.Module):
    """Multi-query attention on an NCHW map: ``num_heads`` query heads, one key and one value head
    shared by all of them (dimension ``key_dim``), 1x1 convs as projections, no biases.

    ``kv_stride > 1``: keys and values are computed from the map downsampled by a strided
    ``dw_kernel_size`` depthwise conv + BN (one for keys, one for values), so each of the HW
    queries attends to about HW / kv_stride^2 positions. The output channels are head-major
    (head h, value channel d at ``h * key_dim + d``), as in timm.
    """

    is_attention = True  # its key/value downsampling is not the backbone's spatial path (models.features)

    def __init__(self, dim: int, num_heads: int, key_dim: int, kv_stride: int = 1, dw_kernel_size: int = 3,
                 out_dim: int | None = None, norm_layer: ModuleFactory = nn.BatchNorm2d) -> None:
        super().__init__()
        _check_int("num_heads", num_heads, 1)
        _check_int("key_dim", key_dim, 1)
        _check_int("kv_stride", kv_stride, 1)
        self.num_heads, self.key_dim, self.kv_stride = num_heads, key_dim, kv_stride
        self.query = nn.Conv2d(dim, num_heads * key_dim, 1, bias=False)

        def down() -> nn.Module | None:
            return (Conv2dNormActivation(dim, dim, dw_kernel_size, kv_stride, groups=dim, norm_layer=norm_layer,
                                         activation_layer=None) if kv_stride > 1 else None)

        self.key_down = down()
        self.key = nn.Conv2d(dim, key_dim, 1, bias=False)
        self.value_down = down()
        self.value = nn.Conv2d(dim, key_dim, 1, bias=False)
        self.out = nn.Conv2d(num_heads * key_dim, out_dim or dim, 1, bias=False)

    @staticmethod
    def _tokens(x: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, 1, h * w, D): one head, broadcast over the query heads."""
        return x.flatten(2).transpose(1, 2).unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        heads, d = self.num_heads, self.key_dim
        q = self.query(x).reshape(b, heads, d, h * w).transpose(-1, -2)              # (B, heads, HW, d)
        k = self._tokens(self.key(x if self.key_down is None else self.key_down(x)))  # (B, 1, P, d)
        v = self._tokens(self.value(x if self.value_down is None else self.value_down(x)))
        o = F.scaled_dot_product_attention(q, k.expand(-1, heads, -1, -1), v.expand(-1, heads, -1, -1))
        return self.out(o.transpose(-1, -2).reshape(b, heads * d, h, w))


class MobileMQABlock(nn.Module):
    """``x + layer_scale(MobileMQA(BN(x)))`` (the norm has no activation)."""

    def __init__(self, dim: int, num_heads: int, key_dim: int, kv_stride: int = 1, dw_kernel_size: int = 3,
                 layer_scale: float | None = None, norm_layer: ModuleFactory = nn.BatchNorm2d) -> None:
        super().__init__()
        self.norm = norm_layer(dim)
        self.attn = MobileMQA(dim, num_heads, key_dim, kv_stride, dw_kernel_size, norm_layer=norm_layer)
        self.layer_scale = LayerScale2d(dim, layer_scale) if layer_scale is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.attn(self.norm(x))
        if self.layer_scale is not None:
            out = self.layer_scale(out)
        return x + out


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------

def _check_int(name: str, value, minimum: int) -> None:
    check_int(name, value, minimum)


def _check_positive(name: str, value) -> None:
    check_number(name, value, 0, low_open=True)


def _resolve_activation(activation) -> ModuleFactory:
    """A name from the activation registry ("relu", "gelu", "mish", ...) or a module factory."""
    return _activation_factory(activation) if isinstance(activation, str) else activation


class MobileNetV4(nn.Module):
    """A MobileNetV4 built from a :class:`Variant` (``VARIANTS[name]`` or :func:`custom_variant`).

    ``features``: the stem (``features[0]``) and one ``nn.Sequential`` per stage of the table;
    then global pool -> ``head`` (1x1 conv, BN, activation) -> ``classifier`` (dropout, linear).
    ``activation``: None (the variant's: ReLU, GELU for hybrid-L), a registry name or a factory.
    ``expand_ratio``: the expansion of every FusedIB and UIB; None: the table's. ``se_ratio``:
    squeeze-and-excitation after the expansion (FusedIB) / middle depthwise conv (UIB) of every
    block, squeezing to ``se_ratio`` of its expanded channels; 0: none (the paper's).
    """

    __prepare_scriptable__ = refuse_scripting

    def __init__(self, variant: Variant, num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0,
                 dropout: float = 0.2, activation: str | ModuleFactory | None = None, stem: str = "imagenet",
                 expand_ratio: float | None = None, se_ratio: float = 0.0,
                 norm_layer: ModuleFactory = nn.BatchNorm2d) -> None:
        super().__init__()
        _check_int("num_classes", num_classes, 1)
        _check_int("in_channels", in_channels, 1)
        _check_positive("width_mult", width_mult)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: got {dropout!r}; allowed values are 0 <= dropout < 1")
        if stem not in STEMS:
            raise ValueError(f"stem: got {stem!r}; allowed values are {STEMS}")
        if expand_ratio is not None:
            _check_positive("expand_ratio", expand_ratio)
        if isinstance(se_ratio, bool) or not isinstance(se_ratio, (int, float)) or not 0.0 <= se_ratio <= 1.0:
            raise ValueError(f"se_ratio: got {se_ratio!r}; allowed values are 0 <= se_ratio <= 1 (0: no SE)")
        activation_layer = _resolve_activation(activation if activation is not None else variant.activation)
        self.in_channels = in_channels
        self.variant = variant

        stages = [list(stage) for stage in variant.stages]
        if expand_ratio is not None:
            stages = [[dataclasses.replace(b, expand_ratio=expand_ratio) if b.kind in ("fused_ib", "uib") else b
                       for b in stage] for stage in stages]
        first_strided = next(((i, j) for i, stage in enumerate(stages) for j, b in enumerate(stage) if b.stride == 2),
                             None)
        if stem == "cifar" and first_strided is not None:
            i, j = first_strided
            stages[i][j] = dataclasses.replace(stages[i][j], stride=1)

        def scale(c: int) -> int:
            return _make_divisible(c * width_mult, 8)

        channels = variant.stem_channels if width_mult < 1 else scale(variant.stem_channels)
        features: list[nn.Module] = [
            Conv2dNormActivation(in_channels, channels, 3, 1 if stem in ("cifar", "cifar_lite") else 2,
                                 norm_layer=norm_layer, activation_layer=activation_layer)]
        for stage in stages:
            blocks = []
            for b in stage:
                out = scale(b.out_channels)
                blocks.append(_make_block(b, channels, out, activation_layer, norm_layer, variant.layer_scale,
                                          se_ratio))
                channels = out
            features.append(nn.Sequential(*blocks))
        self.features = nn.Sequential(*features)
        self.num_features = channels
        self.last_channel = variant.head_hidden
        self.head = Conv2dNormActivation(channels, variant.head_hidden, 1, norm_layer=norm_layer,
                                         activation_layer=activation_layer)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(variant.head_hidden, num_classes))
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # None: the head's BatchNorm runs on the pooled features, one value per image and channel
        check_model_input(self, x, "MobileNetV4", self.classifier[-1].weight.dtype, None)
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.forward_features(x), 1)
        return self.classifier(torch.flatten(self.head(x), 1))


def _make_block(b: Block, inp: int, oup: int, activation_layer: ModuleFactory, norm_layer: ModuleFactory,
                layer_scale: float | None, se_ratio: float) -> nn.Module:
    if b.kind == "conv_bn":
        return Conv2dNormActivation(inp, oup, b.kernel_size, b.stride, norm_layer=norm_layer,
                                    activation_layer=activation_layer)
    if b.kind == "fused_ib":
        return FusedIB(inp, oup, b.stride, b.expand_ratio, b.kernel_size, se_ratio, activation_layer, norm_layer)
    if b.kind == "uib":
        return UniversalInvertedBottleneck(inp, oup, b.stride, b.expand_ratio, b.start_dw, b.middle_dw, se_ratio,
                                           layer_scale, activation_layer, norm_layer)
    if b.kind == "mqa":
        if inp != oup or b.stride != 1:
            raise ValueError(f"mqa block: got {inp} -> {oup} channels, stride {b.stride}; allowed: as many output "
                             "as input channels and stride 1 (put a UIB before it to change either)")
        return MobileMQABlock(inp, b.num_heads, b.key_dim, b.kv_stride, layer_scale=layer_scale,
                              norm_layer=norm_layer)
    raise ValueError(f"kind: got {b.kind!r}; allowed values are {KINDS}")


def _init_weights(model: nn.Module) -> None:
    """torchvision's MobileNet initialization; xavier-uniform attention projections (timm's choice
    for stability of the hybrids); layer scales keep their init value."""
    init_mobilenet_weights(model)
    for m in model.modules():
        if isinstance(m, MobileMQA):
            for conv in (m.query, m.key, m.value, m.out):
                nn.init.xavier_uniform_(conv.weight)


# ---------------------------------------------------------------------------------------------
# Convenience constructors
# ---------------------------------------------------------------------------------------------

def mobilenet_v4_small(in_channels: int = 3, num_classes: int = 1000, **kwargs) -> MobileNetV4:
    """MNv4-Conv-S (3.77M parameters for 1000 classes). ``kwargs``: see :class:`MobileNetV4`."""
    return MobileNetV4(VARIANTS["conv_small"], num_classes=num_classes, in_channels=in_channels, **kwargs)


def mobilenet_v4_medium(in_channels: int = 3, num_classes: int = 1000, **kwargs) -> MobileNetV4:
    """MNv4-Conv-M (9.72M parameters)."""
    return MobileNetV4(VARIANTS["conv_medium"], num_classes=num_classes, in_channels=in_channels, **kwargs)


def mobilenet_v4_large(in_channels: int = 3, num_classes: int = 1000, **kwargs) -> MobileNetV4:
    """MNv4-Conv-L (32.59M parameters)."""
    return MobileNetV4(VARIANTS["conv_large"], num_classes=num_classes, in_channels=in_channels, **kwargs)


def mobilenet_v4_hybrid_medium(in_channels: int = 3, num_classes: int = 1000, **kwargs) -> MobileNetV4:
    """MNv4-Hybrid-M (11.07M parameters): conv-M-like with 8 Mobile MQA blocks and layer scale."""
    return MobileNetV4(VARIANTS["hybrid_medium"], num_classes=num_classes, in_channels=in_channels, **kwargs)


def mobilenet_v4_hybrid_large(in_channels: int = 3, num_classes: int = 1000, **kwargs) -> MobileNetV4:
    """MNv4-Hybrid-L (37.76M parameters), GELU by default."""
    return MobileNetV4(VARIANTS["hybrid_large"], num_classes=num_classes, in_channels=in_channels, **kwargs)


def mobilenet_v4_nano(in_channels: int = 3, num_classes: int = 1000, stem: str = "cifar", **kwargs) -> MobileNetV4:
    """This library's small conv-only MobileNetV4 for 32x32 images (see ``VARIANTS["nano"]``): the
    "cifar" stem by default, so a 32x32 input ends on a 4x4 map; 544,794 parameters and 25M
    multiply-adds at 32x32 for 10 classes. (``build_model`` takes the stem from the config, whose
    default is "imagenet": pass stem="cifar" there for 32x32 images.)"""
    return MobileNetV4(VARIANTS["nano"], num_classes=num_classes, in_channels=in_channels, stem=stem, **kwargs)


def mobilenet_v4_custom(in_channels: int = 3, num_classes: int = 1000, *, base_channels: int = 32,
                        expansion: float = 4.0, se_ratio: float = 0.0, num_heads: int = 0, key_dim: int = 64,
                        head_hidden: int = 1280, dropout: float = 0.2, block_counts: Sequence[int] = (1, 2, 6, 8),
                        layer_scale: float | None = None, **kwargs) -> MobileNetV4:
    """A MobileNetV4 from knobs: ``base_channels`` (stem; the stages have 1.5, 2.5, 5, 8 and the
    last conv 30 times it), ``expansion`` (of every block), ``se_ratio`` (0: no SE), ``num_heads``
    (0: conv only; > 0: hybrid, Mobile MQA in the last two stages), ``key_dim``, ``head_hidden``
    (the 1x1 conv before the classifier), ``dropout`` and ``block_counts`` (blocks per stage, the
    attention blocks not counted). The table is :func:`custom_variant`'s; ``kwargs`` (width_mult,
    activation, stem, ...): see :class:`MobileNetV4`."""
    variant = custom_variant(base_channels, expansion, num_heads, key_dim, head_hidden, block_counts, layer_scale)
    return MobileNetV4(variant, num_classes=num_classes, in_channels=in_channels, dropout=dropout,
                       se_ratio=se_ratio, **kwargs)


# ---------------------------------------------------------------------------------------------
# build_model integration
# ---------------------------------------------------------------------------------------------

# ModelConfig fields these builders reject when they differ from their defaults
_UNSUPPORTED = ("attention", "cnsn", "bottleneck_activation", "shortcut", "pretrained")
CUSTOM_OPTIONS = ("base_channels", "expansion", "se_ratio", "num_heads", "key_dim", "head_hidden", "block_counts",
                  "layer_scale")


def _build(config, variant: Variant, se_ratio: float = 0.0) -> MobileNetV4:
    return MobileNetV4(variant, num_classes=config.num_classes, in_channels=config.in_channels,
                       width_mult=config.width_mult, dropout=config.dropout, activation=config.activation,
                       stem=config.stem, expand_ratio=config.expand_ratio, se_ratio=se_ratio)


def _build_variant(name: str, config) -> MobileNetV4:
    """``config.activation`` defaults to the variant's (the paper's: ReLU, GELU for hybrid-L)."""
    from .config import ModelConfig

    _reject(config, _UNSUPPORTED, ModelConfig())
    if config.extra:
        raise ValueError(f"extra: got {config.extra!r}; {config.arch} takes no extra options (allowed: {{}}; "
                         f"the custom options {CUSTOM_OPTIONS} are for mobilenet_v4_custom)")
    return _build(config, VARIANTS[name])


for _name in VARIANTS:
    register_arch(f"mobilenet_v4_{_name}", default_activation=VARIANTS[_name].activation)(
        partial(_build_variant, _name))


@register_arch("mobilenet_v4_custom", default_activation="relu")
def _build_custom(config) -> MobileNetV4:
    """:func:`mobilenet_v4_custom` from a ModelConfig: its knobs come from ``config.extra``
    (``CUSTOM_OPTIONS``; block_counts as a list, JSON-friendly); dropout, width_mult,
    activation, stem, in_channels and expand_ratio (overriding ``expansion``) from the config."""
    from .config import ModelConfig

    _reject(config, _UNSUPPORTED, ModelConfig())
    options: Mapping = config.extra
    unknown = sorted(set(options) - set(CUSTOM_OPTIONS))
    if unknown:
        raise ValueError(f"extra: got unknown option(s) {unknown}; allowed options are {CUSTOM_OPTIONS}")
    knobs = {k: v for k, v in options.items() if k != "se_ratio"}
    if "block_counts" in knobs and isinstance(knobs["block_counts"], list):
        knobs["block_counts"] = tuple(knobs["block_counts"])
    return _build(config, custom_variant(**knobs), se_ratio=options.get("se_ratio", 0.0))


def convert_timm_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm ``mobilenetv4_*`` state_dict with this module's key names, for ``load_state_dict``.

    timm's ``conv_stem``/``bn1`` become ``features.0``; ``blocks.{s}.{i}`` becomes
    ``features.{s + 1}.{i}`` with the block's own names renamed (``_TIMM_RENAMES``; the block kind
    is told by a key only that kind has); ``conv_head``/``norm_head`` become ``head`` and
    ``classifier`` ``classifier.1``. Tensors are passed through, not copied. Works for every timm
    MobileNetV4 without anti-aliasing (the structures are the same); a key it does not know raises
    ValueError.
    """
    out: dict[str, torch.Tensor] = {}
    blocks: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key.startswith("blocks."):
            _, s, i, rest = key.split(".", 3)
            blocks.setdefault(f"features.{int(s) + 1}.{int(i)}.", {})[rest] = value
            continue
        for old, new in _TIMM_TOP:
            if key.startswith(old):
                out[new + key[len(old):]] = value
                break
        else:
            raise ValueError(f"state_dict: got key {key!r}, not a timm MobileNetV4 key")
    for prefix, entries in blocks.items():
        kind = next((k for marker, k in _TIMM_MARKERS.items() if marker in entries), None)
        if kind is None:
            raise ValueError(f"state_dict: block {prefix!r} has keys {sorted(entries)}; not a timm MobileNetV4 block")
        for rest, value in entries.items():
            new = next((n + rest[len(o):] for o, n in _TIMM_RENAMES[kind] if rest.startswith(o)), None)
            if new is None:
                raise ValueError(f"state_dict: got key {prefix + rest!r} in a {kind} block; not known here")
            out[prefix + new] = value
    return out


_TIMM_TOP = (("conv_stem.", "features.0.0."), ("bn1.", "features.0.1."), ("conv_head.", "head.0."),
             ("norm_head.", "head.1."), ("classifier.", "classifier.1."))
_TIMM_MARKERS = {"conv_exp.weight": "fused_ib", "pw_exp.conv.weight": "uib", "attn.query.proj.weight": "mqa",
                 "conv.weight": "conv_bn"}
_SE = (("se.conv_reduce.", "se.fc1."), ("se.conv_expand.", "se.fc2."))
_TIMM_RENAMES = {
    "conv_bn": (("conv.", "0."), ("bn1.", "1.")),
    "fused_ib": (("conv_exp.", "expand.0."), ("bn1.", "expand.1."), *_SE, ("conv_pwl.", "project.0."),
                 ("bn2.", "project.1.")),
    "uib": (("dw_start.conv.", "start_dw.0."), ("dw_start.bn.", "start_dw.1."), ("pw_exp.conv.", "expand.0."),
            ("pw_exp.bn.", "expand.1."), ("dw_mid.conv.", "middle_dw.0."), ("dw_mid.bn.", "middle_dw.1."), *_SE,
            ("pw_proj.conv.", "project.0."), ("pw_proj.bn.", "project.1."), ("layer_scale.", "layer_scale.")),
    "mqa": (("norm.", "norm."), ("attn.query.proj.", "attn.query."), ("attn.key.down_conv.", "attn.key_down.0."),
            ("attn.key.norm.", "attn.key_down.1."), ("attn.key.proj.", "attn.key."),
            ("attn.value.down_conv.", "attn.value_down.0."), ("attn.value.norm.", "attn.value_down.1."),
            ("attn.value.proj.", "attn.value."), ("attn.output.proj.", "attn.out."), ("layer_scale.", "layer_scale.")),
}

"""Attention modules, created by name with the channel count, as timm's ``create_attn``:
``create_attention("triplet", channels, kernel_size=7)``, ``create_attention("se", channels)``.

Triplet Attention (Misra et al., "Rotate to Attend: Convolutional Triplet Attention Module",
WACV 2021). Each branch pools one axis away with ZPool (max and mean), convolves the two-channel
map with a k x k conv, normalizes with BatchNorm and gates with a sigmoid:

- channel-width  (pooled over height): gate of shape (B, C, 1, W)
- height-channel (pooled over width):  gate of shape (B, C, H, 1)
- spatial        (pooled over channels): gate of shape (B, 1, H, W)

The output is the mean of the three gated copies, x * (g_cw + g_hc + g_s) / 3. The official code
builds each gated copy from a permuted copy of the input; here the pooling reads the input in place
and the gates broadcast, so no full-size permuted copies are made. On float32 CPU tensors (NCHW or
channels_last) the whole module is one ``mnv2::triplet_attention`` operator (C kernels, see
:mod:`mnv2lib.ops`); elsewhere, and while exporting, the same broadcast-gate formulation runs as
PyTorch ops. Parameter names and conv orientations match the official layout (the height-channel
conv sees an (H, C) plane, the channel-width conv a (C, W) plane), and
:class:`TripletAttentionReference` is the permute-based form, for tests and benchmarks.

Squeeze-and-excitation as MobileNetV3 uses it (``attention="se"``): torchvision's
``SqueezeExcitation`` with a reduction to ``make_divisible(channels / 4, 8)``, ReLU and a
hard-sigmoid gate.
"""
from __future__ import annotations

import numbers
from typing import Callable

import torch
import torchvision
from torch import nn
from torchvision.models._utils import _make_divisible

from .. import ops
from .activations import pytorch_only

BRANCHES = ("channel_width", "height_channel", "spatial")
# ModelConfig's bound on attention_kernel (as width_mult has one): the studies use 3 to 7, and a typo such as 77
# makes every Triplet Attention call some hundred times slower; the module itself takes any odd size
MAX_ATTENTION_KERNEL = 31


def check_kernel_size(kernel_size: int, field: str = "attention_kernel", maximum: int | None = None) -> None:
    """An odd integer >= 1 (and <= ``maximum``); a bool is not a size (``True`` is not 1)."""
    ok = isinstance(kernel_size, numbers.Integral) and not isinstance(kernel_size, bool)
    if not ok or kernel_size < 1 or kernel_size % 2 == 0 or (maximum is not None and kernel_size > maximum):
        bound = f"from 1 to {maximum}" if maximum is not None else ">= 1"
        raise ValueError(f"{field}: got {kernel_size!r}; allowed values are odd integers {bound} (3, 5, 7, ...)")


def check_feature_map(x: torch.Tensor, module: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{module} input: got a {x.dim()}-D tensor of shape {list(x.shape)}; "
                         "allowed: a 4-D tensor (batch, channels, height, width)")


def zpool(x: torch.Tensor, dim: int) -> torch.Tensor:
    """ZPool: max and mean over ``dim``, stacked as two channels at dim 1 (max first)."""
    return torch.stack((x.amax(dim), x.mean(dim)), dim=1)


class AttentionGate(nn.Sequential):
    """ZPool output (B, 2, h, w) -> Conv(2->1, k) -> BN -> sigmoid: a (B, 1, h, w) gate."""

    fold_batchnorm = False  # the triplet operator reads this BatchNorm (TripletAttention._op_arguments)

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)
        self.sigmoid = nn.Sigmoid()


class TripletAttention(nn.Module):
    """Triplet Attention with broadcast gates; ``record=True`` keeps the last sigmoid maps.

    Same parameters, buffers and results as :class:`TripletAttentionReference` for finite inputs (an
    infinite element can give inf where the reference's per-branch products give NaN; see
    docs/native-operators.md). On float32 CPU tensors the module is the ``mnv2::triplet_attention``
    operator (``..._inference`` without autograd); elsewhere, while exporting, tracing or scripting, under
    ``torch.func`` transforms, with ``record=True`` or ``no_spatial=True``, the same broadcast-gate
    formulation runs as PyTorch ops. An empty input (a zero batch, channel, height or width) gives an
    empty result.

    ``inplace=True`` lets that inference operator write its result over x (like ``nn.ReLU(inplace=True)``);
    the network's blocks turn it on for the tensors they own. Training and autograd never overwrite x.
    """

    def __init__(self, kernel_size: int = 7, no_spatial: bool = False, inplace: bool = False) -> None:
        super().__init__()
        check_kernel_size(kernel_size, "TripletAttention kernel_size (ModelConfig's attention_kernel)")
        kernel_size = int(kernel_size)
        self.kernel_size = kernel_size
        self.no_spatial = no_spatial
        self.inplace = inplace
        self.channel_width = AttentionGate(kernel_size)
        self.height_channel = AttentionGate(kernel_size)
        self.spatial = None if no_spatial else AttentionGate(kernel_size)
        self.record = False
        self.recorded = {}  # name -> tensor (unannotated: a scripted module leaves it out, silently)

    def _branches(self) -> list[AttentionGate]:
        return [g for g in (self.channel_width, self.height_channel, self.spatial) if g is not None]

    def gates(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The branch gates, each shaped to broadcast against x (values in (0, 1)); PyTorch ops."""
        check_feature_map(x, "TripletAttention")
        gates = {
            # pooled over H: (B, 2, C, W) -> (B, 1, C, W) -> (B, C, 1, W)
            "channel_width": self.channel_width(zpool(x, 2)).transpose(1, 2),
            # pooled over W: (B, 2, C, H) -> (B, 2, H, C) -> (B, 1, H, C) -> (B, C, H, 1)
            "height_channel": self.height_channel(zpool(x, 3).transpose(2, 3)).permute(0, 3, 2, 1),
        }
        if self.spatial is not None:
            gates["spatial"] = self.spatial(zpool(x, 1))  # (B, 1, H, W)
        return gates

    def _forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.gates(x)
        if self.record:
            self.recorded = {name: g.detach() for name, g in gates.items()}
        return self._gate_input(x, gates)

    def _gate_input(self, x: torch.Tensor, gates: dict[str, torch.Tensor]) -> torch.Tensor:
        weight = 1.0 / len(gates)
        g = list(gates.values())
        # Scale the small gates, not the full-size product.
        scale = g[0] * weight + g[1] * weight
        if len(g) == 3:
            scale = scale + g[2] * weight
        return x * scale

    def _op_arguments(self, x: torch.Tensor):
        """(tensors for the ``mnv2::triplet_attention`` operators, the first BatchNorm) where they apply:
        float32 CPU x (NCHW or channels_last; non-empty: ``forward`` returns first for an empty x), all three
        branches, BatchNorms with running statistics, one eps and one momentum, and not exporting, tracing,
        under a transform (:func:`pytorch_only`) or recording; else None. (Submodules are
        read from ``_modules``: ``nn.Module.__getattr__`` would cost more than the kernel on small maps.)"""
        gates = self._modules
        spatial = gates.get("spatial")
        if spatial is None or self.record or not x.is_cpu or x.dtype != torch.float32 \
                or pytorch_only() or not ops.is_dense(x) or not ops.available("triplet_attention"):
            return None
        branches = (gates["channel_width"]._modules, gates["height_channel"]._modules, spatial._modules)
        bns = [b["bn"] for b in branches]
        first = bns[0]
        for bn in bns:
            if not (bn.affine and bn.track_running_stats and bn.momentum is not None and bn.eps == first.eps
                    and bn.momentum == first.momentum and bn.training == first.training):
                return None
        weights = [b["conv"]._parameters["weight"] for b in branches]
        if weights[0].dtype != torch.float32:
            return None
        params = [bn._parameters for bn in bns]
        buffers = [bn._buffers for bn in bns]
        tensors = (*weights, *[p["weight"] for p in params], *[p["bias"] for p in params],
                   *[b["running_mean"] for b in buffers], *[b["running_var"] for b in buffers])
        return tensors, bns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # (the branch TorchScript compiles: standard ops, nothing recorded)
            check_feature_map(x, "TripletAttention")
            if x.numel() == 0:
                return x.clone()
            return self._gate_input(x, self.gates(x))
        if x.dim() != 4:
            check_feature_map(x, "TripletAttention")
        if x.numel() == 0:  # an empty result, as the operators give (pooling and conv refuse empty maps)
            return x.clone()
        arguments = self._op_arguments(x)
        if arguments is None:
            return self._forward_torch(x)
        tensors, bns = arguments
        bn = bns[0]
        if not (bn.training or torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad
                                                                                   for t in tensors[:9]))):
            if self.inplace:
                torch.ops.mnv2.triplet_attention_inference_(x, *tensors, bn.eps)
                return x
            return torch.ops.mnv2.triplet_attention_inference(x, *tensors, bn.eps)
        counts = [b._buffers["num_batches_tracked"] for b in bns]  # (updated with the running statistics)
        return torch.ops.mnv2.triplet_attention(x, *tensors, *counts, bn.training, bn.eps, bn.momentum)[0]


class TripletAttentionReference(TripletAttention):
    """The official formulation: three permuted copies, each gated, then averaged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map(x, "TripletAttention")
        x_hcw = x.permute(0, 2, 1, 3).contiguous()          # (B, H, C, W)
        out_cw = x_hcw * self.channel_width(zpool(x_hcw, 1))
        out_cw = out_cw.permute(0, 2, 1, 3).contiguous()
        x_whc = x.permute(0, 3, 2, 1).contiguous()          # (B, W, H, C)
        out_hc = x_whc * self.height_channel(zpool(x_whc, 1))
        out_hc = out_hc.permute(0, 3, 2, 1).contiguous()
        if self.spatial is None:
            return 0.5 * (out_cw + out_hc)
        out_s = x * self.spatial(zpool(x, 1))
        return (1.0 / 3.0) * (out_s + out_cw + out_hc)


class SqueezeExcitation(torchvision.ops.SqueezeExcitation):
    """MobileNetV3's squeeze-and-excitation: global average pool, 1x1 conv to
    ``make_divisible(channels / 4, 8)`` channels, ReLU, 1x1 conv back, hard-sigmoid gate
    (torchvision's module, with MobileNetV3's sizes and gate)."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__(channels, _make_divisible(channels // reduction, 8), scale_activation=nn.Hardsigmoid)


def _triplet(channels: int, kernel_size: int = 7, **kwargs) -> nn.Module:
    return TripletAttention(kernel_size, **kwargs)  # independent of the channel count


def _triplet_reference(channels: int, kernel_size: int = 7, **kwargs) -> nn.Module:
    return TripletAttentionReference(kernel_size, **kwargs)


def _squeeze_excitation(channels: int, kernel_size: int | None = None, **kwargs) -> nn.Module:
    return SqueezeExcitation(channels, **kwargs)  # kernel_size: Triplet Attention's option, unused here


# name -> factory(channels, kernel_size=..., **kwargs) -> module (timm's create_attn convention)
_ATTENTIONS: dict[str, Callable[..., nn.Module]] = {
    "triplet": _triplet,
    "triplet_reference": _triplet_reference,
    "se": _squeeze_excitation,
}


def attention_names() -> tuple[str, ...]:
    return tuple(_ATTENTIONS)


def register_attention(name: str, factory: Callable[..., nn.Module]) -> None:
    _ATTENTIONS[name] = factory


def create_attention(name: str, channels: int, **kwargs) -> nn.Module:
    """An attention module by name for a feature map of ``channels`` channels."""
    if name not in _ATTENTIONS:
        raise ValueError(f"attention: got {name!r}; allowed values are {(None,) + attention_names()}")
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"attention channels: got {channels!r}; allowed values are integers >= 1")
    return _ATTENTIONS[name](channels, **kwargs)


class record_attention:
    """Context manager: record the sigmoid maps of every Triplet Attention module in ``model``.

    >>> with record_attention(model) as maps:
    ...     model(images)
    >>> maps["features.3.attention"]["spatial"].shape
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = {n: m for n, m in model.named_modules() if isinstance(m, TripletAttention)}
        self.maps: dict[str, dict[str, torch.Tensor]] = {}

    def __enter__(self) -> dict[str, dict[str, torch.Tensor]]:
        for module in self.modules.values():
            module.record = True
        return self.maps

    def __exit__(self, *exc) -> None:
        for name, module in self.modules.items():
            module.record = False
            if module.recorded:
                self.maps[name] = module.recorded
            module.recorded = {}

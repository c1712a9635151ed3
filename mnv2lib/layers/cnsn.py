"""CrossNorm and SelfNorm (Tang et al., "CrossNorm and SelfNorm for Generalization under
Distribution Shifts", ICCV 2021), following the paper and the official code.

- :class:`CrossNorm` exchanges channel-wise mean and std between instances (training
  only, and only on steps where it is switched on): x' = (x - mu_x) / sigma_x * sigma_y + mu_y.
- :class:`SelfNorm` recalibrates each channel with gates computed from its own mean and
  std by a per-channel fully connected layer (training and evaluation).
- :class:`CNSN` is CrossNorm followed by SelfNorm; :class:`CrossNormSchedule` switches
  CrossNorm on in ``active_num`` random modules with probability ``cn_prob`` per step.

Statistics are taken over H x W with the unbiased variance plus 1e-5 (1e-12 in
SelfNorm, as the official code), in float32 for half-precision inputs and in float64 for
float64 ones. A map with a single pixel has no spatial spread: its variance is taken as 0
(not NaN), so its std is sqrt(eps); an empty map (H x W = 0) has NaN mean and std, as
``torch.mean`` and ``torch.std`` of an empty set, and SelfNorm returns an empty result without
touching its running statistics. Every random draw comes from a ``torch.Generator`` that the
caller can seed.

On float32 CPU tensors (NCHW or channels_last) the statistics are the ``mnv2::channel_stats``
operator and SelfNorm the ``mnv2::selfnorm`` operator (``..._inference`` without autograd; C
kernels, see :mod:`mnv2lib.ops`); elsewhere (float64 included), while exporting, tracing or
scripting, under ``torch.func`` transforms, and for two gates in training, they run as PyTorch
ops. Scripted (``torch.jit.script``), CrossNorm is the identity (its random draws are Python; a
scripted CrossNorm switched on in training raises) and SelfNorm's gates are ``nn.BatchNorm1d``
calls (in training a batch of one raises, as BatchNorm does, where eager SelfNorm falls back to
the running statistics).

CrossNorm's random schedule never breaks a ``torch.compile`` graph: in eager mode the draws come
from the schedule's ``torch.Generator`` on the CPU (reproducible with ``schedule.seed``; CPU values,
so no device synchronization) and only the modules switched on compute; while compiling they are
drawn with tensor ops from torch's global generator (seed it with ``torch.manual_seed``; dynamo
cannot trace a ``torch.Generator``) and every module blends its result with ``torch.where``.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import nn

from .. import ops
from .activations import pytorch_only
from .attention import check_feature_map

CROSSNORM_MODES = ("2-instance", "1-instance")
CROSSNORM_CROPS = ("neither", "style", "content", "both")


def _native(x: torch.Tensor, name: str) -> bool:
    # (an empty x too: the operators give empty results and NaN statistics for empty maps, as the PyTorch path)
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and not pytorch_only() and ops.is_dense(x) and ops.available(name))


def _stats_dtype(x: torch.Tensor) -> torch.Tensor:
    """x in the precision its statistics take: float32, float64 for float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def channel_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and std over H x W, shaped (B, C, 1, 1), in float32 (float64 for a
    float64 x); NaN for an empty map (H x W = 0), as ``torch.mean`` and ``torch.std`` of an empty set."""
    if not torch.jit.is_scripting():
        if _native(x, "cnsn"):
            mean, std = torch.ops.mnv2.channel_stats(x, float(eps))
            return mean[..., None, None], std[..., None, None]
    n = x.shape[2] * x.shape[3]
    xf = _stats_dtype(x)
    if xf.numel() == 0:  # (global pooling refuses empty maps; the mean of one is NaN, and so is its std)
        mean = xf.mean((2, 3), keepdim=True)
        return mean, mean.clone()
    # Global average pooling rather than torch.mean/var over (H, W): the same statistics, and the reduction
    # mobile runtimes implement best (ExecuTorch 1.5.1's XNNPACK int8 mean over (H, W) returns a wrongly
    # shaped tensor at run time; its global average pooling is right).
    mean = nn.functional.adaptive_avg_pool2d(xf, 1)
    var = nn.functional.adaptive_avg_pool2d((xf - mean).square(), 1)
    if n > 1:
        var = var * (n / (n - 1))  # unbiased, as the official code's torch.var
    return mean, (var + eps).sqrt()


def _check_choice(field: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{field}: got {value!r}; allowed values are {allowed}")


def random_box(height: int, width: int, generator: torch.Generator, beta: float = 1.0,
               min_area: float = 0.1) -> tuple[int, int, int, int]:
    """A random box (top, left, bottom, right) whose area ratio is drawn from Beta(beta, beta)
    and redrawn until the clipped box covers more than ``min_area`` of the map (official
    ``cn_rand_bbox``). Sides are at least one pixel, so tiny maps terminate."""
    if height * width == 1:
        return 0, 0, 1, 1
    while True:
        if beta == 1.0:  # Beta(1, 1) is uniform: draw it from the torch generator directly
            ratio = float(torch.rand((), generator=generator))
        else:
            seed = int(torch.randint(0, 2**62, (), generator=generator))
            ratio = float(np.random.default_rng(seed).beta(beta, beta))
        cut_h = max(1, int(height * math.sqrt(ratio)))
        cut_w = max(1, int(width * math.sqrt(ratio)))
        cy = int(torch.randint(0, height, (), generator=generator))
        cx = int(torch.randint(0, width, (), generator=generator))
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2 + cut_h % 2, height)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2 + cut_w % 2, width)
        if (bottom - top) * (right - left) / (height * width) > min_area:
            return top, left, bottom, right


def _restyle(content: torch.Tensor, style_mean, style_std, eps: float, content_stats=None) -> torch.Tensor:
    # (x - mu_x) / sigma_x * sigma_y + mu_y as a single fused multiply-add on x.
    mean, std = content_stats if content_stats is not None else channel_stats(content, eps)
    scale = style_std / std
    shift = style_mean - mean * scale
    return torch.addcmul(shift.to(content.dtype), content, scale.to(content.dtype))


class CrossNorm(nn.Module):
    """Exchanges channel-wise statistics; the exact identity unless training and ``active``.

    ``mode="2-instance"``: each sample takes the statistics of another sample of the batch
    (a random permutation; with batch size 1 there is no partner and it is the identity).
    ``mode="1-instance"``: a sample's channels exchange statistics among themselves.
    ``crop``: "style" takes the statistics from a random box of the partner, "content"
    re-styles only a random box of the sample (the rest is unchanged), "both" does both.
    ``active`` switches off again after each forward, as in the official code.
    """

    def __init__(self, mode: str = "2-instance", crop: str = "neither", beta: float = 1.0,
                 min_area: float = 0.1, eps: float = 1e-5, generator: torch.Generator | None = None) -> None:
        super().__init__()
        _check_choice("crossnorm_mode", mode, CROSSNORM_MODES)
        _check_choice("crossnorm_crop", crop, CROSSNORM_CROPS)
        self.mode, self.crop, self.beta, self.min_area, self.eps = mode, crop, beta, min_area, eps
        self.generator = generator or torch.Generator().manual_seed(0)
        self.active = False

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, crop={self.crop!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # (the branch TorchScript compiles: the draws are Python)
            if self.training and self.active:
                raise RuntimeError("CrossNorm: a scripted module cannot exchange statistics (its random draws are "
                                   "Python); train the eager or torch.compile'd model")
            return x
        active, self.active = self.active, False
        if not self.training or active is False:
            return x
        check_feature_map(x, "CrossNorm")
        if isinstance(active, torch.Tensor):  # drawn by the schedule while compiling: blend, never branch
            return torch.where(active, self.exchange_traced(x), x)
        if torch.compiler.is_compiling():
            return self.exchange_traced(x) if active else x
        return self.exchange(x) if active else x

    def exchange(self, x: torch.Tensor) -> torch.Tensor:
        """The CrossNorm operation itself (no training/active check)."""
        batch, channels, height, width = x.shape
        if self.mode == "2-instance" and batch < 2:
            return x
        g = self.generator
        style = x
        if self.crop in ("style", "both"):
            top, left, bottom, right = random_box(height, width, g, self.beta, self.min_area)
            style = x[:, :, top:bottom, left:right]
        own_stats = channel_stats(style, self.eps)
        style_mean, style_std = own_stats
        perm = _to_device(torch.randperm(batch if self.mode == "2-instance" else channels, generator=g), x.device)
        if self.mode == "2-instance":
            style_mean, style_std = style_mean[perm], style_std[perm]
        else:
            style_mean, style_std = style_mean[:, perm], style_std[:, perm]
        if self.crop in ("content", "both"):
            top, left, bottom, right = random_box(height, width, g, self.beta, self.min_area)
            out = x.clone()
            out[:, :, top:bottom, left:right] = _restyle(x[:, :, top:bottom, left:right], style_mean,
                                                         style_std, self.eps)
            return out
        # without a style crop the content statistics are the ones just computed
        return _restyle(x, style_mean, style_std, self.eps, None if style is not x else own_stats)


    def exchange_traced(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`exchange` with tensor draws from torch's global generator and boxes as masks: no
        Python value depends on a random number, so ``torch.compile`` traces it without a break."""
        batch, channels, height, width = x.shape
        if self.mode == "2-instance" and batch < 2:
            return x
        style_box = content_box = None
        if self.crop in ("style", "both"):
            style_box = random_box_mask(height, width, x.device, self.beta, self.min_area)
        own_mean, own_std = _masked_stats(x, style_box, self.eps)
        perm = torch.randperm(batch if self.mode == "2-instance" else channels, device=x.device)
        if self.mode == "2-instance":
            style_mean, style_std = own_mean[perm], own_std[perm]
        else:
            style_mean, style_std = own_mean[:, perm], own_std[:, perm]
        if self.crop in ("content", "both"):
            content_box = random_box_mask(height, width, x.device, self.beta, self.min_area)
            restyled = _restyle(x, style_mean, style_std, self.eps, _masked_stats(x, content_box, self.eps))
            return torch.where(content_box, restyled, x)
        return _restyle(x, style_mean, style_std, self.eps, None if style_box is not None else (own_mean, own_std))


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU-drawn tensor on ``device``; to CUDA through pinned memory, without waiting for the copy."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _masked_stats(x: torch.Tensor, box: torch.Tensor | None, eps: float):
    """channel_stats of x inside ``box`` (an (H, W) bool mask; None: the whole map)."""
    if box is None:
        return channel_stats(x, eps)
    xf = _stats_dtype(x)
    weight = box.to(xf.dtype)
    n = weight.sum()
    mean = (xf * weight).sum((2, 3), keepdim=True) / n
    var = (((xf - mean) * weight) ** 2).sum((2, 3), keepdim=True) / (n - 1).clamp(min=1)
    return mean, (var + eps).sqrt()


def random_box_mask(height: int, width: int, device: torch.device, beta: float = 1.0, min_area: float = 0.1,
                    tries: int = 32) -> torch.Tensor:
    """:func:`random_box` as an (H, W) bool mask drawn with tensor ops (torch's global generator):
    ``tries`` candidate boxes at once, the first that covers more than ``min_area`` wins (the whole map
    where none does, which at the default 0.1 has a chance below 1e-30)."""
    if height * width == 1:
        return torch.ones(height, width, dtype=torch.bool, device=device)
    if beta == 1.0:
        ratio = torch.rand(tries, device=device)
    else:
        ratio = torch.distributions.Beta(torch.tensor(float(beta)), torch.tensor(float(beta))).sample((tries,))
        ratio = ratio.to(device)
    cut_h = (height * ratio.sqrt()).floor().clamp(min=1)
    cut_w = (width * ratio.sqrt()).floor().clamp(min=1)
    cy = torch.randint(0, height, (tries,), device=device)
    cx = torch.randint(0, width, (tries,), device=device)
    top = (cy - torch.div(cut_h, 2, rounding_mode="floor")).clamp(min=0)
    bottom = (cy + torch.div(cut_h, 2, rounding_mode="floor") + cut_h % 2).clamp(max=height)
    left = (cx - torch.div(cut_w, 2, rounding_mode="floor")).clamp(min=0)
    right = (cx + torch.div(cut_w, 2, rounding_mode="floor") + cut_w % 2).clamp(max=width)
    valid = (bottom - top) * (right - left) / (height * width) > min_area
    first = (valid & (valid.cumsum(0) == 1)).to(top.dtype)  # one-hot of the first valid candidate
    top, bottom, left, right = ((t * first).sum() for t in (top, bottom, left, right))  # (no indexing: no sync)
    rows = torch.arange(height, device=device).view(-1, 1)
    cols = torch.arange(width, device=device).view(1, -1)
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    return inside | ~valid.any()


class SelfNorm(nn.Module):
    """Per-channel gates from (mean, std): Conv1d(C, C, 2, groups=C) -> BN1d -> sigmoid.

    One gate (official default, 4C parameters): x * g. Two gates (paper, 8C parameters):
    g rescales the std and f the mean, g * (x - mu) + f * mu. With batch size 1 in
    training, BatchNorm1d has a single value per channel; the gates then use its running
    statistics instead of failing.

    ``inplace=True`` lets the CPU inference operator write its result over x (like
    ``nn.ReLU(inplace=True)``); the network's blocks turn it on for the tensors they own.
    """

    def __init__(self, channels: int, two_gates: bool = False, eps: float = 1e-12, inplace: bool = False) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, numbers.Integral) or channels < 1:
            raise ValueError(f"SelfNorm channels: got {channels!r}; allowed values are integers >= 1")
        channels = int(channels)
        self.channels, self.two_gates, self.eps, self.inplace = channels, two_gates, eps, inplace
        self.g_fc = nn.Conv1d(channels, channels, kernel_size=2, bias=False, groups=channels)
        self.g_bn = nn.BatchNorm1d(channels)
        if two_gates:
            self.f_fc = nn.Conv1d(channels, channels, kernel_size=2, bias=False, groups=channels)
            self.f_bn = nn.BatchNorm1d(channels)
        self.record = False
        self.recorded = {}  # name -> tensor (unannotated: a scripted module leaves it out, silently)

    def _gate(self, fc: nn.Conv1d, bn: nn.BatchNorm1d, stats: torch.Tensor) -> torch.Tensor:
        w = fc.weight
        two_taps = fc.bias is None and fc.groups == w.shape[0] and w.shape[1:] == (1, 2) and stats.shape[-1] == 2
        use_batch_stats = bn.training and stats.shape[0] > 1
        if two_taps and not use_batch_stats and bn.track_running_stats and bn.affine:
            # BatchNorm with running statistics is a per-channel affine map: folded into the two taps, so that
            # an exported graph holds no BatchNorm without a convolution before it (PT2E int8 export then has
            # no conv-BN pair to look for, a fixed ~50 s per ExecuTorch program)
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            y = torch.addcmul(stats[..., 0] * (w[:, 0, 0] * scale), stats[..., 1], w[:, 0, 1] * scale)
            return torch.sigmoid(y + (bn.bias - bn.running_mean * scale)).unsqueeze(-1).unsqueeze(-1)
        if two_taps:
            # the grouped two-tap Conv1d is w0 * mean + w1 * std per channel: two elementwise ops
            # instead of a oneDNN convolution call (about 0.1 ms forward and backward on the CPU)
            y = torch.addcmul(stats[..., 0] * w[:, 0, 0], stats[..., 1], w[:, 0, 1]).unsqueeze(-1)
        else:
            y = fc(stats)
        momentum = 0.0
        if use_batch_stats and bn.track_running_stats:  # the running averages as nn.BatchNorm1d keeps them
            bn.num_batches_tracked.add_(1)
            # momentum None: cumulative average (torch.optim.swa_utils.update_bn recalibrates this way)
            momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        y = nn.functional.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                     use_batch_stats, momentum, bn.eps)
        return torch.sigmoid(y).unsqueeze(-1)  # (B, C, 1, 1)

    def _gate_modules(self):
        return [(self.g_fc, self.g_bn)] + ([(self.f_fc, self.f_bn)] if self.two_gates else [])

    def _native_gates(self, x: torch.Tensor):
        """The gates' (conv, BN) pairs where the operator path applies, else None (submodules read from
        ``_modules``: ``nn.Module.__getattr__`` costs more than the kernel on small maps)."""
        if self.record or not _native(x, "cnsn"):
            return None
        modules = self._modules
        gates = [(modules["g_fc"], modules["g_bn"])]
        if self.two_gates:
            gates.append((modules["f_fc"], modules["f_bn"]))
        for fc, bn in gates:
            if not (fc._parameters["weight"].dtype == torch.float32 and fc._parameters.get("bias") is None
                    and bn.affine and bn.track_running_stats and bn.momentum is not None):
                return None
        return gates

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            check_feature_map(x, "SelfNorm")
        if x.shape[1] != self.channels:
            raise ValueError(f"SelfNorm input channels: got {x.shape[1]}; allowed: {self.channels}")

    def _forward_scripted(self, x: torch.Tensor) -> torch.Tensor:
        """What TorchScript compiles: the PyTorch path with the gates as module calls (Conv1d, BatchNorm1d)."""
        self._check_input(x)
        if x.numel() == 0:
            return x.clone()
        mean, std = channel_stats(x, self.eps)
        stats = torch.cat((mean, std), dim=-1).flatten(2)  # (B, C, 2)
        g = torch.sigmoid(self.g_bn(self.g_fc(stats.to(self.g_fc.weight.dtype)))).unsqueeze(-1)
        if not hasattr(self, "f_fc"):
            return x * g.to(x.dtype)
        f = torch.sigmoid(self.f_bn(self.f_fc(stats.to(self.f_fc.weight.dtype)))).unsqueeze(-1)
        return torch.addcmul((mean * (f - g)).to(x.dtype), x, g.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._forward_scripted(x)
        return self._forward_eager(x)

    def _forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        """The native operators where they apply, else the PyTorch path (outside TorchScript, whose frontend
        parses every line of a method it compiles)."""
        if x.dim() != 4:  # (_check_input inlined: this runs at every call)
            check_feature_map(x, "SelfNorm")
        if x.shape[1] != self.channels:
            raise ValueError(f"SelfNorm input channels: got {x.shape[1]}; allowed: {self.channels}")
        if x.numel() == 0:  # nothing to gate, and no statistics for the running averages (as aten's batch_norm)
            return x.clone()
        gates = self._native_gates(x)
        if gates is not None:
            tensors = [(fc._parameters["weight"], bn._parameters["weight"], bn._parameters["bias"],
                        bn._buffers["running_mean"], bn._buffers["running_var"]) for fc, bn in gates]
            bn = gates[0][1]
            if not (self.training or torch.is_grad_enabled() and (
                    x.requires_grad or any(t.requires_grad for g in tensors for t in g[:3]))):
                second = tensors[1] if len(tensors) == 2 else (None,) * 5
                f_eps = gates[1][1].eps if len(gates) == 2 else 0.0
                if self.inplace:
                    torch.ops.mnv2.selfnorm_inference_(x, *tensors[0], bn.eps, *second, f_eps, self.eps)
                    return x
                return torch.ops.mnv2.selfnorm_inference(x, *tensors[0], bn.eps, *second, f_eps, self.eps)
            if len(gates) == 1:
                use_batch_stats = bn.training and x.shape[0] > 1  # one value per channel: running statistics
                return torch.ops.mnv2.selfnorm(x, *tensors[0], bn._buffers["num_batches_tracked"], use_batch_stats,
                                               bn.eps, self.eps, bn.momentum)[0]
        mean, std = channel_stats(x, self.eps)
        stats = torch.cat((mean, std), dim=-1).flatten(2)  # (B, C, 2)
        g = self._gate(self.g_fc, self.g_bn, stats.to(self.g_fc.weight.dtype))
        if self.record:
            self.recorded = {"g": g.detach().flatten(1)}
        if not self.two_gates:
            return x * g.to(x.dtype)
        f = self._gate(self.f_fc, self.f_bn, stats.to(self.f_fc.weight.dtype))
        if self.record:
            self.recorded["f"] = f.detach().flatten(1)
        # g * (x - mu) + f * mu, fused
        return torch.addcmul((mean * (f - g)).to(x.dtype), x, g.to(x.dtype))


class CNSN(nn.Module):
    """CrossNorm then SelfNorm; either may be None ("cn" or "sn" alone).

    ``record=True`` keeps, for the distribution notebook, the per-channel means and stds
    of the input, after CrossNorm and after SelfNorm, and the SelfNorm gates.
    """

    __jit_unused_properties__ = ["inplace"]  # (a Python-side switch, not part of a scripted forward)

    def __init__(self, crossnorm: CrossNorm | None, selfnorm: SelfNorm | None) -> None:
        super().__init__()
        self.crossnorm = crossnorm
        self.selfnorm = selfnorm
        self.record = False
        self.recorded = {}  # name -> tensor (unannotated: a scripted module leaves it out, silently)

    @property
    def inplace(self) -> bool:
        """SelfNorm's ``inplace`` (CrossNorm, training only, always makes a new tensor)."""
        return self.selfnorm is not None and self.selfnorm.inplace

    @inplace.setter
    def inplace(self, value: bool) -> None:
        if self.selfnorm is not None:
            self.selfnorm.inplace = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # (the branch TorchScript compiles: nothing recorded)
            if self.crossnorm is not None:
                x = self.crossnorm(x)
            if self.selfnorm is not None:
                x = self.selfnorm(x)
            return x
        if not self.record:
            modules = self._modules
            crossnorm, selfnorm = modules.get("crossnorm"), modules.get("selfnorm")  # None: not submodules
            if crossnorm is not None:
                x = crossnorm(x)
            if selfnorm is None:
                return x
            if selfnorm.record:
                selfnorm.record = False
            return selfnorm(x)
        stages = {"input": x}
        if self.crossnorm is not None:
            x = self.crossnorm(x)
            stages["crossnorm"] = x
        if self.selfnorm is not None:
            self.selfnorm.record = self.record
            x = self.selfnorm(x)
            stages["selfnorm"] = x
        if self.record:
            self.recorded = {}
            for name, t in stages.items():
                mean, std = channel_stats(t.detach(), 1e-5)
                self.recorded[f"{name}_mean"] = mean.flatten(1)
                self.recorded[f"{name}_std"] = std.flatten(1)
            if self.selfnorm is not None:
                self.recorded.update({f"gate_{k}": v for k, v in self.selfnorm.recorded.items()})
        return x


class CrossNormSchedule:
    """Per training step: with probability ``cn_prob`` switch CrossNorm on in ``active_num``
    modules drawn at random (the official ``_enable_cross_norm``); the others stay identity.

    ``step()`` is called once per training forward (the model registers it as a pre-hook);
    ``history`` keeps, per step, the indices of the modules switched on.
    """

    def __init__(self, modules: list[CrossNorm], cn_prob: float = 0.25, active_num: int = 2,
                 generator: torch.Generator | None = None, keep_history: bool = False) -> None:
        if not 0.0 <= cn_prob <= 1.0:
            raise ValueError(f"cn_prob: got {cn_prob!r}; allowed values are 0 <= cn_prob <= 1")
        if not modules:
            raise ValueError("CrossNormSchedule: the model has no CrossNorm module to schedule")
        if not isinstance(active_num, int) or not 1 <= active_num <= len(modules):
            raise ValueError(f"active_num: got {active_num!r}; allowed values are 1..{len(modules)} "
                             f"(the model has {len(modules)} CrossNorm modules)")
        self.modules, self.cn_prob, self.active_num = modules, cn_prob, active_num
        self.generator = generator or torch.Generator().manual_seed(0)
        for module in modules:
            module.generator = self.generator
        self.keep_history = keep_history
        self.history: list[tuple[int, ...]] = []

    def seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def step_traced(self) -> None:
        """The draw of :meth:`step` with tensor ops (torch's global generator), for ``torch.compile``:
        each module gets a 0-d bool tensor and blends its result with it (no history is kept)."""
        n = len(self.modules)
        fire = torch.rand(()) < self.cn_prob
        order = torch.randperm(n)[: self.active_num]
        chosen = torch.zeros(n, dtype=torch.bool).index_fill(0, order, True) & fire
        for index, module in enumerate(self.modules):
            module.active = chosen[index]

    def step(self) -> tuple[int, ...]:
        chosen: tuple[int, ...] = ()
        if float(torch.rand((), generator=self.generator)) < self.cn_prob:
            order = torch.randperm(len(self.modules), generator=self.generator)[: self.active_num]
            chosen = tuple(sorted(order.tolist()))
        for index, module in enumerate(self.modules):
            module.active = index in chosen
        if self.keep_history:
            self.history.append(chosen)
        return chosen

    def __call__(self, model: nn.Module, args) -> None:  # forward pre-hook
        if model.training:
            self.step_traced() if torch.compiler.is_compiling() else self.step()


class record_cnsn:
    """Context manager: record the statistics of every CNSN module in ``model`` (see :class:`CNSN`)."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = {n: m for n, m in model.named_modules() if isinstance(m, CNSN)}
        self.stats: dict[str, dict[str, torch.Tensor]] = {}

    def __enter__(self) -> dict[str, dict[str, torch.Tensor]]:
        for module in self.modules.values():
            module.record = True
        return self.stats

    def __exit__(self, *exc) -> None:
        for name, module in self.modules.items():
            module.record = False
            if module.selfnorm is not None:
                module.selfnorm.record = False
            if module.recorded:
                self.stats[name] = module.recorded
            module.recorded = {}

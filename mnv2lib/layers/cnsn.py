"""CrossNorm and SelfNorm (Tang et al., "CrossNorm and SelfNorm for Generalization under
Distribution Shifts", ICCV 2021), following the paper and the official code.

- :class:`CrossNorm` exchanges channel-wise mean and std between instances (training
  only, and only on steps where it is switched on): x' = (x - mu_x) / sigma_x * sigma_y + mu_y.
- :class:`SelfNorm` recalibrates each channel with gates computed from its own mean and
  std by a per-channel fully connected layer (training and evaluation).
- :class:`CNSN` is CrossNorm followed by SelfNorm; :class:`CrossNormSchedule` switches
  CrossNorm on in ``active_num`` random modules with probability ``cn_prob`` per step.

Statistics are taken over H x W with the unbiased variance plus 1e-5 (1e-12 in
SelfNorm, as the official code), computed in one pass (``torch.var_mean``) and in
float32 for half-precision inputs. A map with a single pixel has no spatial spread:
its variance is taken as 0 (not NaN), so its std is sqrt(eps). Every random draw
comes from a ``torch.Generator`` that the caller can seed.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .attention import check_feature_map

CROSSNORM_MODES = ("2-instance", "1-instance")
CROSSNORM_CROPS = ("neither", "style", "content", "both")


def channel_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and std over H x W, shaped (B, C, 1, 1), in float32."""
    n = x.shape[2] * x.shape[3]
    var, mean = torch.var_mean(x.float(), dim=(2, 3), keepdim=True, correction=1 if n > 1 else 0)
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


def _restyle(content: torch.Tensor, style_mean, style_std, eps: float) -> torch.Tensor:
    # (x - mu_x) / sigma_x * sigma_y + mu_y as a single fused multiply-add on x.
    mean, std = channel_stats(content, eps)
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
        active, self.active = self.active, False
        if not (self.training and active):
            return x
        check_feature_map(x, "CrossNorm")
        return self.exchange(x)

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
        style_mean, style_std = channel_stats(style, self.eps)
        if self.mode == "2-instance":
            perm = torch.randperm(batch, generator=g).to(x.device)
            style_mean, style_std = style_mean[perm], style_std[perm]
        else:
            perm = torch.randperm(channels, generator=g).to(x.device)
            style_mean, style_std = style_mean[:, perm], style_std[:, perm]
        if self.crop in ("content", "both"):
            top, left, bottom, right = random_box(height, width, g, self.beta, self.min_area)
            out = x.clone()
            out[:, :, top:bottom, left:right] = _restyle(x[:, :, top:bottom, left:right], style_mean,
                                                         style_std, self.eps)
            return out
        return _restyle(x, style_mean, style_std, self.eps)


class SelfNorm(nn.Module):
    """Per-channel gates from (mean, std): Conv1d(C, C, 2, groups=C) -> BN1d -> sigmoid.

    One gate (official default, 4C parameters): x * g. Two gates (paper, 8C parameters):
    g rescales the std and f the mean, g * (x - mu) + f * mu. With batch size 1 in
    training, BatchNorm1d has a single value per channel; the gates then use its running
    statistics instead of failing.
    """

    def __init__(self, channels: int, two_gates: bool = False, eps: float = 1e-12) -> None:
        super().__init__()
        self.channels, self.two_gates, self.eps = channels, two_gates, eps
        self.g_fc = nn.Conv1d(channels, channels, kernel_size=2, bias=False, groups=channels)
        self.g_bn = nn.BatchNorm1d(channels)
        if two_gates:
            self.f_fc = nn.Conv1d(channels, channels, kernel_size=2, bias=False, groups=channels)
            self.f_bn = nn.BatchNorm1d(channels)
        self.record = False
        self.recorded: dict[str, torch.Tensor] = {}

    def _gate(self, fc: nn.Conv1d, bn: nn.BatchNorm1d, stats: torch.Tensor) -> torch.Tensor:
        y = fc(stats)
        use_batch_stats = bn.training and y.shape[0] > 1
        y = nn.functional.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                     use_batch_stats, bn.momentum if use_batch_stats else 0.0, bn.eps)
        return torch.sigmoid(y).unsqueeze(-1)  # (B, C, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map(x, "SelfNorm")
        if x.shape[1] != self.channels:
            raise ValueError(f"SelfNorm input channels: got {x.shape[1]}; allowed: {self.channels}")
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

    def __init__(self, crossnorm: CrossNorm | None, selfnorm: SelfNorm | None) -> None:
        super().__init__()
        self.crossnorm = crossnorm
        self.selfnorm = selfnorm
        self.record = False
        self.recorded: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
            self.step()


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

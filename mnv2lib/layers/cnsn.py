"""CrossNorm and SelfNorm (Tang et al., "CrossNorm and SelfNorm for Generalization under
Distribution Shifts", ICCV 2021), following the paper and the official code.

- :class:`CrossNorm` exchanges channel-wise mean and std between instances (training
  only, and only on steps where it is switched on): x' = (x - mu_x) / sigma_x * sigma_y + mu_y.
- :class:`SelfNorm` recalibrates each channel with gates computed from its own mean and
  std by a per-channel fully connected layer (training and evaluation).
- :class:`CNSN` is CrossNorm followed by SelfNorm; :class:`CrossNormSchedule` switches
  CrossNorm on in ``active_num`` random modules with probability ``cn_prob`` per step.

Statistics are taken over H x W with the unbiased variance plus 1e-5 (1e-12 in
SelfNorm, as the official code), and in float32 for half-precision inputs. A map with a
single pixel has no spatial spread: its variance is taken as 0 (not NaN), so its std is
sqrt(eps). Every random draw comes from a ``torch.Generator`` that the caller can seed.

On float32 CPU tensors the statistics (with their gradient) and SelfNorm (with its
gradient; in inference the whole module) run as C kernels, see the notes above
``_C_SOURCE``; elsewhere, and under export, as PyTorch ops (``torch.mean``, ``torch.var``: Core ATen).
"""
from __future__ import annotations

import ctypes
import math

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .activations import C_VEXPF, NativeLibrary, PointerCache, _bump_generation, exporting
from .attention import _is_channels_last, check_feature_map

CROSSNORM_MODES = ("2-instance", "1-instance")
CROSSNORM_CROPS = ("neither", "style", "content", "both")


# ---------------------------------------------------------------------------------------------
# Fast path (float32 CPU tensors): C kernels, see _C_SOURCE. torch.var_mean over (H, W) costs
# on this kind of CPU about a third of a whole convolution layer; the kernels read each
# (sample, channel) plane twice while it is in cache (mean, then the squared deviations, so
# the variance is as exact as the two-pass definition). SelfNorm's gates (a grouped Conv1d,
# BatchNorm1d and a sigmoid on (B, C, 2) statistics) stay PyTorch modules, differentiated
# inside the custom Function; in inference the whole module is one kernel. Elsewhere (CUDA,
# other dtypes, no C compiler) the same computations run as PyTorch ops.
# ---------------------------------------------------------------------------------------------

_C_SOURCE = r"""
/* CNSN kernels, float32: per-(sample, channel) plane statistics and the SelfNorm gating, for
 * contiguous (B, C, H, W) tensors (nhwc = 0: a plane of n = H * W values is read twice while it
 * is in cache) and channels_last ones (nhwc = 1: memory (B, H, W, C); a sample's n rows of C
 * values are read twice, vectorized over the channels). Per-plane arrays are (B, C) in both. */
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stdlib.h>

typedef int64_t i64;
#define INLINE static inline __attribute__((always_inline))

""" + C_VEXPF + r"""
/* mean and std = sqrt(var + eps) of a plane; var unbiased, 0 for a single value */
INLINE void plane_stats(const float* restrict p, i64 n, float eps, float* mean, float* std) {
    float s = 0.f;
#pragma omp simd reduction(+:s)
    for (i64 i = 0; i < n; i++) s += p[i];
    const float m = s / (float)n;
    float q = 0.f;
#pragma omp simd reduction(+:q)
    for (i64 i = 0; i < n; i++) { const float d = p[i] - m; q += d * d; }
    *mean = m;
    *std = sqrtf((n > 1 ? q / (float)(n - 1) : 0.f) + eps);
}

/* NHWC: mean and std of the C channels of one sample (n rows of C) */
static void sample_stats_nhwc(const float* restrict xb, i64 C, i64 n, float eps, float* restrict mean,
                              float* restrict std) {
    for (i64 c = 0; c < C; c++) { mean[c] = 0.f; std[c] = 0.f; }
    for (i64 i = 0; i < n; i++) {
        const float* row = xb + i * C;
#pragma omp simd
        for (i64 c = 0; c < C; c++) mean[c] += row[c];
    }
    for (i64 c = 0; c < C; c++) mean[c] /= (float)n;
    for (i64 i = 0; i < n; i++) {
        const float* row = xb + i * C;
#pragma omp simd
        for (i64 c = 0; c < C; c++) { const float d = row[c] - mean[c]; std[c] += d * d; }
    }
    for (i64 c = 0; c < C; c++) std[c] = sqrtf((n > 1 ? std[c] / (float)(n - 1) : 0.f) + eps);
}

void cn_stats(const float* x, i64 B, i64 C, i64 n, int nhwc, double eps, float* mean, float* std, int nthreads) {
    if (nhwc) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (i64 b = 0; b < B; b++) sample_stats_nhwc(x + b * n * C, C, n, (float)eps, mean + b * C, std + b * C);
        return;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (i64 k = 0; k < B * C; k++) plane_stats(x + k * n, n, (float)eps, mean + k, std + k);
}

/* out = x * g + h, per plane (h may be NULL) */
void sn_apply(const float* x, i64 B, i64 C, i64 n, int nhwc, const float* g, const float* h, float* out,
              int nthreads) {
    if (nhwc) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (i64 b = 0; b < B; b++) {
            const float *gb = g + b * C, *hb = h ? h + b * C : NULL;
            for (i64 i = 0; i < n; i++) {
                const float* xr = x + (b * n + i) * C;
                float* orow = out + (b * n + i) * C;
                if (hb) {
#pragma omp simd
                    for (i64 c = 0; c < C; c++) orow[c] = xr[c] * gb[c] + hb[c];
                } else {
#pragma omp simd
                    for (i64 c = 0; c < C; c++) orow[c] = xr[c] * gb[c];
                }
            }
        }
        return;
    }
    const i64 planes = B * C;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (i64 k = 0; k < planes; k++) {
        const float gk = g[k], hk = h ? h[k] : 0.f;
        const float* xp = x + k * n;
        float* op = out + k * n;
#pragma omp simd
        for (i64 i = 0; i < n; i++) op[i] = xp[i] * gk + hk;
    }
}

/* per plane: sgx = sum(grad * x), sg = sum(grad) (sg may be NULL) */
void sn_backward_reduce(const float* x, const float* go, i64 B, i64 C, i64 n, int nhwc, float* sgx, float* sg,
                        int nthreads) {
    if (nhwc) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (i64 b = 0; b < B; b++) {
            float *a = sgx + b * C, *s = sg ? sg + b * C : NULL;
            for (i64 c = 0; c < C; c++) a[c] = 0.f;
            if (s) for (i64 c = 0; c < C; c++) s[c] = 0.f;
            for (i64 i = 0; i < n; i++) {
                const float* xr = x + (b * n + i) * C;
                const float* gr = go + (b * n + i) * C;
#pragma omp simd
                for (i64 c = 0; c < C; c++) a[c] += gr[c] * xr[c];
                if (s) {
#pragma omp simd
                    for (i64 c = 0; c < C; c++) s[c] += gr[c];
                }
            }
        }
        return;
    }
    const i64 planes = B * C;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (i64 k = 0; k < planes; k++) {
        const float* xp = x + k * n;
        const float* gp = go + k * n;
        float a = 0.f, b = 0.f;
#pragma omp simd reduction(+:a, b)
        for (i64 i = 0; i < n; i++) { a += gp[i] * xp[i]; b += gp[i]; }
        sgx[k] = a;
        if (sg) sg[k] = b;
    }
}

/* dx = grad * g + alpha + beta * (x - mean), per plane (grad and g may be NULL). The deviation is
 * taken first: alpha + beta * x - beta * mean would cancel catastrophically when |mean| >> std. */
void sn_backward_dx(const float* x, const float* go, i64 B, i64 C, i64 n, int nhwc, const float* g,
                    const float* alpha, const float* beta, const float* mean, float* dx, int nthreads) {
    if (nhwc) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (i64 b = 0; b < B; b++) {
            const float *ab = alpha + b * C, *bb = beta + b * C, *mb = mean + b * C, *gk = go ? g + b * C : NULL;
            for (i64 i = 0; i < n; i++) {
                const float* xr = x + (b * n + i) * C;
                float* dr = dx + (b * n + i) * C;
                if (go) {
                    const float* gr = go + (b * n + i) * C;
#pragma omp simd
                    for (i64 c = 0; c < C; c++) dr[c] = gr[c] * gk[c] + ab[c] + bb[c] * (xr[c] - mb[c]);
                } else {
#pragma omp simd
                    for (i64 c = 0; c < C; c++) dr[c] = ab[c] + bb[c] * (xr[c] - mb[c]);
                }
            }
        }
        return;
    }
    const i64 planes = B * C;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (i64 k = 0; k < planes; k++) {
        const float* xp = x + k * n;
        float* dp = dx + k * n;
        const float a = alpha[k], b = beta[k], m = mean[k];
        if (go) {
            const float* gp = go + k * n;
            const float gk = g[k];
#pragma omp simd
            for (i64 i = 0; i < n; i++) dp[i] = gp[i] * gk + a + b * (xp[i] - m);
        } else {
#pragma omp simd
            for (i64 i = 0; i < n; i++) dp[i] = a + b * (xp[i] - m);
        }
    }
}

/* gates of channels c0 .. c0+m-1 from their statistics (mean, std indexed from 0): out = x * g + shift */
INLINE void gate_values(const float* restrict q, i64 C, i64 c0, i64 m, int two, const float* restrict mean,
                        const float* restrict std, float* restrict g, float* restrict shift) {
    const float *q0 = q + c0, *q1 = q + C + c0, *q2 = q + 2 * C + c0;
    const float *q3 = q + 3 * C + c0, *q4 = q + 4 * C + c0, *q5 = q + 5 * C + c0;
#pragma omp simd
    for (i64 c = 0; c < m; c++) {
        const float gv = 1.f / (1.f + vexpf(-(q0[c] * mean[c] + q1[c] * std[c] + q2[c])));
        float sh = 0.f;
        if (two) {
            const float fv = 1.f / (1.f + vexpf(-(q3[c] * mean[c] + q4[c] * std[c] + q5[c])));
            sh = (fv - gv) * mean[c];
        }
        g[c] = gv;
        shift[c] = sh;
    }
}

INLINE void sn_sample(const float* restrict xb, i64 C, const i64 n, float eps, const float* restrict q, int two,
                      float* restrict st, float* restrict ob) {
    const i64 chunk = n >= 4096 ? 1 : 4096 / n;
    for (i64 c0 = 0; c0 < C; c0 += chunk) {
        const i64 m = C - c0 < chunk ? C - c0 : chunk;
        float* mean = st;
        float* std = st + chunk;
        float* g = st + 2 * chunk;
        float* shift = st + 3 * chunk;
        for (i64 c = 0; c < m; c++) plane_stats(xb + (c0 + c) * n, n, eps, mean + c, std + c);
        gate_values(q, C, c0, m, two, mean, std, g, shift);
        for (i64 c = 0; c < m; c++) {
            const float* xp = xb + (c0 + c) * n;
            float* op = ob + (c0 + c) * n;
            const float gv = g[c], sh = shift[c];
#pragma omp simd
            for (i64 i = 0; i < n; i++) op[i] = xp[i] * gv + sh;
        }
    }
}

/* SelfNorm inference. Per channel c, gate(mean, std) = sigmoid(fc0 * mean + fc1 * std) through the BN
 * affine with running statistics; fc: (C, 2); bn: weight, bias, running mean, running var (C each).
 * One gate: out = x * g; two gates: out = g * (x - mean) + f * mean. f* may be NULL. */
void sn_eval(const float* x, i64 B, i64 C, i64 n, int nhwc, double eps,
             const float* gfc, const float* gw, const float* gb, const float* grm, const float* grv, double geps,
             const float* ffc, const float* fw, const float* fb, const float* frm, const float* frv, double feps,
             float* out, int nthreads) {
    const int two = ffc != NULL;
    /* per channel: gate input = q0 * mean + q1 * std + q2 (structure of arrays) */
    float* q = malloc(sizeof(float) * 6 * C);
    for (i64 c = 0; c < C; c++) {
        const double ga = gw[c] / sqrt((double)grv[c] + geps);
        q[c] = (float)(gfc[2 * c] * ga);
        q[C + c] = (float)(gfc[2 * c + 1] * ga);
        q[2 * C + c] = (float)(gb[c] - grm[c] * ga);
        if (two) {
            const double fa = fw[c] / sqrt((double)frv[c] + feps);
            q[3 * C + c] = (float)(ffc[2 * c] * fa);
            q[4 * C + c] = (float)(ffc[2 * c + 1] * fa);
            q[5 * C + c] = (float)(fb[c] - frm[c] * fa);
        }
    }
    if (nhwc) {
#pragma omp parallel num_threads(nthreads)
        {
            float* st = malloc(sizeof(float) * 4 * C);
            float *mean = st, *std = st + C, *g = st + 2 * C, *shift = st + 3 * C;
#pragma omp for schedule(static)
            for (i64 b = 0; b < B; b++) {
                sample_stats_nhwc(x + b * n * C, C, n, (float)eps, mean, std);
                gate_values(q, C, 0, C, two, mean, std, g, shift);
                for (i64 i = 0; i < n; i++) {
                    const float* xr = x + (b * n + i) * C;
                    float* orow = out + (b * n + i) * C;
#pragma omp simd
                    for (i64 c = 0; c < C; c++) orow[c] = xr[c] * g[c] + shift[c];
                }
            }
            free(st);
        }
        free(q);
        return;
    }
#pragma omp parallel num_threads(nthreads)
    {
        float* st = malloc(sizeof(float) * 4 * (n >= 4096 ? 1 : 4096 / n));
#pragma omp for schedule(static)
        for (i64 b = 0; b < B; b++) {
            const float* xb = x + b * C * n;
            float* ob = out + b * C * n;
            switch (n) {  /* constant plane sizes: unrolled reductions for the small maps */
                case 16: sn_sample(xb, C, 16, (float)eps, q, two, st, ob); break;
                case 64: sn_sample(xb, C, 64, (float)eps, q, two, st, ob); break;
                case 256: sn_sample(xb, C, 256, (float)eps, q, two, st, ob); break;
                case 1024: sn_sample(xb, C, 1024, (float)eps, q, two, st, ob); break;
                default: sn_sample(xb, C, n, (float)eps, q, two, st, ob);
            }
        }
        free(st);
    }
    free(q);
}
"""

_P, _I, _F, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
_native = NativeLibrary("cnsn", _C_SOURCE, {
    "cn_stats": [_P, _I, _I, _I, _F, _D, _P, _P, _F],
    "sn_apply": [_P, _I, _I, _I, _F, _P, _P, _P, _F],
    "sn_backward_reduce": [_P, _P, _I, _I, _I, _F, _P, _P, _F],
    "sn_backward_dx": [_P, _P, _I, _I, _I, _F, _P, _P, _P, _P, _P, _F],
    "sn_eval": [_P, _I, _I, _I, _F, _D, _P, _P, _P, _P, _P, _D, _P, _P, _P, _P, _P, _D, _P, _F],
})


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _use_native(x: torch.Tensor):
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4 or x.numel() == 0 \
            or not (x.is_contiguous() or _is_channels_last(x)):
        return None
    return _native.get()


def _layout(x: torch.Tensor) -> tuple[int, int, int, int]:
    """(B, C, n = H * W, nhwc) of a contiguous or channels_last tensor, as the C kernels take them."""
    batch, channels, height, width = x.shape
    return batch, channels, height * width, int(not x.is_contiguous())


class _ChannelStats(torch.autograd.Function):
    """(B, C, H, W) float32 CPU -> per-plane mean and std (B, C), with the C kernels."""

    @staticmethod
    def forward(ctx, x, eps):
        lib = _native.get()
        batch, channels, n, nhwc = _layout(x)
        mean, std = x.new_empty(batch, channels), x.new_empty(batch, channels)
        lib.cn_stats(x.data_ptr(), batch, channels, n, nhwc, eps, mean.data_ptr(), std.data_ptr(),
                     torch.get_num_threads())
        ctx.save_for_backward(x, mean, std)
        ctx.lib = lib
        return mean, std

    @staticmethod
    @once_differentiable
    def backward(ctx, d_mean, d_std):
        x, mean, std = ctx.saved_tensors
        return _stats_backward(ctx.lib, x, mean, std, d_mean, d_std), None


def _stats_backward(lib, x, mean, std, d_mean, d_std, grad=None, gate=None):
    """dx = grad * gate + d_mean / n + d_std * (x - mean) / ((n - 1) std), one pass (C kernel)."""
    batch, channels, n, nhwc = _layout(x)
    alpha = torch.zeros_like(mean) if d_mean is None else (d_mean / n).contiguous()
    beta = torch.zeros_like(std) if d_std is None or n == 1 else (d_std / ((n - 1) * std)).contiguous()
    dx = torch.empty_like(x)
    lib.sn_backward_dx(x.data_ptr(), _ptr(grad), batch, channels, n, nhwc, _ptr(gate), alpha.data_ptr(),
                       beta.data_ptr(), mean.data_ptr(), dx.data_ptr(), torch.get_num_threads())
    return dx


def channel_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and std over H x W, shaped (B, C, 1, 1), in float32."""
    if not exporting() and _use_native(x) is not None:
        mean, std = _ChannelStats.apply(x, float(eps))
        return mean[..., None, None], std[..., None, None]
    n = x.shape[2] * x.shape[3]
    xf = x.float()  # mean and var, not var_mean: both are Core ATen ops (ExecuTorch lowers them)
    mean = xf.mean(dim=(2, 3), keepdim=True)
    var = xf.var(dim=(2, 3), keepdim=True, correction=1 if n > 1 else 0)
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
        own_stats = channel_stats(style, self.eps)
        style_mean, style_std = own_stats
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
        # without a style crop the content statistics are the ones just computed
        return _restyle(x, style_mean, style_std, self.eps, None if style is not x else own_stats)


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
        w = fc.weight
        if fc.bias is None and fc.groups == w.shape[0] and w.shape[1:] == (1, 2) and stats.shape[-1] == 2:
            # the grouped two-tap Conv1d is w0 * mean + w1 * std per channel: two elementwise ops
            # instead of a oneDNN convolution call (about 0.1 ms forward and backward on the CPU)
            y = torch.addcmul(stats[..., 0] * w[:, 0, 0], stats[..., 1], w[:, 0, 1]).unsqueeze(-1)
        else:
            y = fc(stats)
        use_batch_stats = bn.training and y.shape[0] > 1
        y = nn.functional.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                     use_batch_stats, bn.momentum if use_batch_stats else 0.0, bn.eps)
        return torch.sigmoid(y).unsqueeze(-1)  # (B, C, 1, 1)

    def _gate_modules(self):
        return [(self.g_fc, self.g_bn)] + ([(self.f_fc, self.f_bn)] if self.two_gates else [])

    def _apply(self, *args, **kwargs):
        _bump_generation()  # tensors may be replaced without registration (buffers in .to(), ...)
        try:
            return super()._apply(*args, **kwargs)
        finally:
            _bump_generation()

    @staticmethod
    def _build_inference_arguments(module):
        """(tensors read, pointers and epsilons for the fused inference kernel or None where the
        parameters do not suit it, the attributes that value depends on)."""
        tensors, epsilons, attributes = [], [], []  # (the module's own eps is passed on every call)
        for fc, bn in module._gate_modules():
            tensors += (fc._parameters["weight"], bn._parameters.get("weight"), bn._parameters.get("bias"),
                        bn._buffers.get("running_mean"), bn._buffers.get("running_var"))
            epsilons.append(bn.eps)
            attributes.append((bn, "eps"))
        arguments = None
        if all(t is not None and t.dtype == torch.float32 and t.is_cpu and t.is_contiguous() for t in tensors):
            pointers = [t.data_ptr() for t in tensors]
            gates = [pointers[i:i + 5] + [epsilons[i // 5]] for i in range(0, len(pointers), 5)]
            if len(gates) == 1:
                gates.append([None] * 5 + [0.0])
            arguments = gates[0] + gates[1]
        return tensors, arguments, attributes

    def _inference_arguments(self):
        """Cached :meth:`_build_inference_arguments` (see ``PointerCache``)."""
        return _INFERENCE_CACHE.get(self, self._build_inference_arguments)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            check_feature_map(x, "SelfNorm")
        if x.shape[1] != self.channels:
            raise ValueError(f"SelfNorm input channels: got {x.shape[1]}; allowed: {self.channels}")
        # (few Python operations on the way to the kernel: see PointerCache)
        lib = _native.get() if x.is_cpu and x.dtype == torch.float32 and x.numel() and not exporting() else None
        if lib is not None and not (x.is_contiguous() or _is_channels_last(x)):
            lib = None
        if lib is not None:
            if not (self.training or self.record or torch.is_grad_enabled() and (
                    x.requires_grad or any(p.requires_grad for p in self.parameters()))):
                arguments = self._inference_arguments()
                if arguments is not None:  # inference: one kernel
                    batch, channels, n, nhwc = _layout(x)
                    out = torch.empty_like(x)
                    lib.sn_eval(x.data_ptr(), batch, channels, n, nhwc, self.eps, *arguments,
                                out.data_ptr(), torch.get_num_threads())
                    return out
            if all(p.dtype == torch.float32 for p in self.parameters()):
                return _SelfNormFunction.apply(x, self, *self.parameters())
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


class _SelfNormFunction(torch.autograd.Function):
    """SelfNorm with the C kernels: statistics, gating and, in backward, one reduction pass and one
    pass for grad x. The gates (Conv1d, BatchNorm1d, sigmoid on the (B, C, 2) statistics) are a
    small PyTorch graph recorded in forward and differentiated in backward. The inputs after the
    module are its parameters, so that autograd routes their gradients here."""

    @staticmethod
    def forward(ctx, x, module, *params):
        lib = _native.get()
        batch, channels, n, nhwc = _layout(x)
        threads = torch.get_num_threads()
        mean, std = x.new_empty(batch, channels), x.new_empty(batch, channels)
        lib.cn_stats(x.data_ptr(), batch, channels, n, nhwc, module.eps, mean.data_ptr(), std.data_ptr(), threads)
        leaves = (mean.detach().requires_grad_(), std.detach().requires_grad_())
        with torch.enable_grad():
            stats = torch.stack(leaves, dim=-1)  # (B, C, 2)
            gates = [module._gate(fc, bn, stats).view(batch, channels) for fc, bn in module._gate_modules()]
        g = gates[0].detach()
        shift = (gates[1].detach() - g) * mean if module.two_gates else None
        out = torch.empty_like(x)
        lib.sn_apply(x.data_ptr(), batch, channels, n, nhwc, g.data_ptr(), _ptr(shift), out.data_ptr(), threads)
        if module.record:
            module.recorded = {name: t.detach().clone() for name, t in zip("gf", gates)}
        ctx.save_for_backward(x, mean, std)
        ctx.inner = (leaves, gates)
        ctx.module, ctx.lib = module, lib
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        lib = ctx.lib
        x, mean, std = ctx.saved_tensors
        leaves, gates = ctx.inner
        del ctx.inner
        module = ctx.module
        batch, channels, n, nhwc = _layout(x)
        grad = grad.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        threads = torch.get_num_threads()
        sgx = x.new_empty(batch, channels)
        sg = x.new_empty(batch, channels) if module.two_gates else None
        lib.sn_backward_reduce(x.data_ptr(), grad.data_ptr(), batch, channels, n, nhwc, sgx.data_ptr(), _ptr(sg),
                               threads)
        g = gates[0].detach()
        if module.two_gates:  # out = g * x + (f - g) * mean
            d_gates, d_mean_direct = [sgx - mean * sg, mean * sg], (gates[1].detach() - g) * sg
        else:  # out = g * x
            d_gates, d_mean_direct = [sgx], None
        params = [p for p in module.parameters() if p.requires_grad]
        grads = torch.autograd.grad(gates, [*leaves, *params], d_gates, allow_unused=True)
        d_mean, d_std = grads[0], grads[1]
        if d_mean_direct is not None:
            d_mean = d_mean_direct if d_mean is None else d_mean + d_mean_direct
        grad_x = _stats_backward(lib, x, mean, std, d_mean, d_std, grad, g) if ctx.needs_input_grad[0] else None
        by_id = {id(p): dp for p, dp in zip(params, grads[2:])}
        return (grad_x, None, *[by_id.get(id(p)) for p in module.parameters()])


_INFERENCE_CACHE = PointerCache()


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

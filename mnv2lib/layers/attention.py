"""Triplet Attention (Misra et al., "Rotate to Attend: Convolutional Triplet Attention
Module", WACV 2021), created by name: ``create_attention("triplet", kernel_size=7)``.

Each branch pools one axis away with ZPool (max and mean), convolves the two-channel
map with a k x k conv, normalizes with BatchNorm and gates with a sigmoid:

- channel-width  (pooled over height): gate of shape (B, C, 1, W)
- height-channel (pooled over width):  gate of shape (B, C, H, 1)
- spatial        (pooled over channels): gate of shape (B, 1, H, W)

The output is the mean of the three gated copies, x * (g_cw + g_hc + g_s) / 3. The
official code builds each gated copy from a permuted copy of the input; here the
pooling reads the input in place and the gates broadcast, so no full-size permuted
copies are made. On float32 CPU tensors pooling, the three small convolutions and the
gating run as C kernels (a custom autograd Function in training, one fused kernel in
inference; see the notes above ``_C_SOURCE``). Parameter names and conv orientations
match the official layout (the height-channel conv sees an (H, C) plane, the
channel-width conv a (C, W) plane), and :class:`TripletAttentionReference` is the
permute-based form, for tests and benchmarks.
"""
from __future__ import annotations

import ctypes
from typing import Callable

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .activations import C_VEXPF, NativeLibrary, PointerCache, _bump_generation, exporting

BRANCHES = ("channel_width", "height_channel", "spatial")


def check_kernel_size(kernel_size: int, field: str = "attention_kernel") -> None:
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"{field}: got {kernel_size!r}; allowed values are odd integers >= 1 (3, 5, 7, ...)")


def check_feature_map(x: torch.Tensor, module: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{module} input: got a {x.dim()}-D tensor of shape {tuple(x.shape)}; "
                         "allowed: a 4-D tensor (batch, channels, height, width)")


def zpool(x: torch.Tensor, dim: int) -> torch.Tensor:
    """ZPool: max and mean over ``dim``, stacked as two channels at dim 1 (max first)."""
    return torch.stack((x.amax(dim), x.mean(dim)), dim=1)


class AttentionGate(nn.Sequential):
    """ZPool output (B, 2, h, w) -> Conv(2->1, k) -> BN -> sigmoid: a (B, 1, h, w) gate."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)
        self.sigmoid = nn.Sigmoid()


# ---------------------------------------------------------------------------------------------
# Fast path (float32 CPU tensors): C kernels, see _C_SOURCE. The branch convolutions have a
# single output channel, which oneDNN computes, and above all differentiates, at a small
# fraction of the machine's speed; here they are direct stencils vectorized along the longer
# side of each plane (a plane is stored transposed when that makes its longer side contiguous;
# the weights are transposed with it, so the result is the same). Pooling reads x once for all
# three branches, gating once more; backward reads (x, grad) twice. In inference a sample's
# pooling, convolutions and gating run back to back while it is in cache. BatchNorm and the
# sigmoid of the small conv outputs stay PyTorch modules (running statistics, momentum and
# their gradients exactly as nn.BatchNorm2d), differentiated inside the custom Function.
# Elsewhere (CUDA, other dtypes, no C compiler) the same formulation runs as PyTorch ops.
# ---------------------------------------------------------------------------------------------

_C_SOURCE = r"""
/* Triplet Attention kernels, float32, contiguous (B, C, H, W) input.
 *
 * Planes. Each branch has a natural pooled layout and an official plane:
 *   channel-width  natural (C, W) [max/mean over H], official (C, W)
 *   height-channel natural (C, H) [over W],          official (H, C)
 *   spatial        natural (H, W) [over C],          official (H, W)
 * A plane is stored (R rows, Q cols) as its official orientation or the transpose (flag t),
 * whichever puts the longer side in the contiguous columns; `tr` says whether the stored plane
 * is the transpose of the natural layout (cw: t, hc: !t, s: t).
 * Pooled maps: zero-padded stored planes (2, R+k-1, Q+k-1) per sample (max, mean), followed by
 * SLACK zero floats at the end of the whole buffer (the vector tiles read past a row's end).
 * Convolution weights are given in the official orientation (2, k, k).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>

typedef int64_t i64;
#define TQ 16   /* columns per register tile */
#define RB 4    /* rows per register tile */
#define SLACK 32
#define INLINE static inline __attribute__((always_inline))
/* per-sample loops are compiled for the common square planes with constant H = W (unrolled,
 * no per-row loop overhead on 4x4 or 8x8 maps), for common narrow rows with constant W, and
 * generically for every other size */
#define HW_DISPATCH(CALL) \
    if (H == W) { \
        switch (W) { \
            case 4: CALL(4, 4); break; \
            case 7: CALL(7, 7); break; \
            case 8: CALL(8, 8); break; \
            case 14: CALL(14, 14); break; \
            case 16: CALL(16, 16); break; \
            case 28: CALL(28, 28); break; \
            case 32: CALL(32, 32); break; \
            default: CALL(H, W); \
        } \
    } else { \
        switch (W) {  /* NHWC input read as (B, H, W, C): W here is a channel count */ \
            case 8: CALL(H, 8); break; \
            case 16: CALL(H, 16); break; \
            case 24: CALL(H, 24); break; \
            case 32: CALL(H, 32); break; \
            default: CALL(H, W); \
        } \
    }

""" + C_VEXPF + r"""
/* natural (A x N) <-> stored plane with row stride ld, first element at off */
static void gather(const float* src, i64 off, i64 ld, int tr, i64 A, i64 N, float* dst) {
    if (tr) { for (i64 a = 0; a < A; a++) for (i64 n = 0; n < N; n++) dst[a * N + n] = src[off + n * ld + a]; }
    else { for (i64 a = 0; a < A; a++) for (i64 n = 0; n < N; n++) dst[a * N + n] = src[off + a * ld + n]; }
}
static void scatter(const float* src, i64 A, i64 N, float scale, float* dst, i64 off, i64 ld, int tr) {
    if (tr) { for (i64 a = 0; a < A; a++) for (i64 n = 0; n < N; n++) dst[off + n * ld + a] = src[a * N + n] * scale; }
    else { for (i64 a = 0; a < A; a++) for (i64 n = 0; n < N; n++) dst[off + a * ld + n] = src[a * N + n] * scale; }
}
/* natural pooled (max, sum) -> one sample's padded stored map; mean = sum / n */
static void store_map(const float* mx, const float* sm, i64 A, i64 N, float n, int tr, i64 p, float* dst) {
    const i64 R = tr ? N : A, Q = tr ? A : N, Qp = Q + 2 * p, Rp = R + 2 * p, off = p * Qp + p;
    for (i64 a = 0; a < A; a++)
        for (i64 m = 0; m < N; m++) {
            const i64 at = tr ? off + m * Qp + a : off + a * Qp + m;
            dst[at] = mx[a * N + m];
            dst[Rp * Qp + at] = sm[a * N + m] / n;
        }
}

static void dims(i64 C, i64 H, i64 W, int br, int t, i64* A, i64* N, int* tr, i64* R, i64* Q) {
    if (br == 0) { *A = C; *N = W; *tr = t; }
    else if (br == 1) { *A = C; *N = H; *tr = !t; }
    else { *A = H; *N = W; *tr = t; }
    *R = *tr ? *N : *A;
    *Q = *tr ? *A : *N;
}

/* ---- one pass over one sample: natural max/sum of every branch (W specialised by the caller) ---- */
/* row reductions (max and sum over w) of rows h0 .. h0+n-1 of a plane; for narrow rows four rows
 * at a time, so that the dependency chains interleave */
INLINE void row_reduce(const float* xc, i64 H, const i64 W, float* rmax, float* rsum) {
    i64 h = 0;
    if (W < 16) {
        for (; h + 4 <= H; h += 4) {
            const float *r0 = xc + h * W, *r1 = r0 + W, *r2 = r1 + W, *r3 = r2 + W;
            float m0 = r0[0], m1 = r1[0], m2 = r2[0], m3 = r3[0], s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
            for (i64 w = 0; w < W; w++) {
                m0 = r0[w] > m0 ? r0[w] : m0; s0 += r0[w];
                m1 = r1[w] > m1 ? r1[w] : m1; s1 += r1[w];
                m2 = r2[w] > m2 ? r2[w] : m2; s2 += r2[w];
                m3 = r3[w] > m3 ? r3[w] : m3; s3 += r3[w];
            }
            rmax[h] = m0; rmax[h + 1] = m1; rmax[h + 2] = m2; rmax[h + 3] = m3;
            rsum[h] = s0; rsum[h + 1] = s1; rsum[h + 2] = s2; rsum[h + 3] = s3;
        }
    }
    for (; h < H; h++) {
        const float* row = xc + h * W;
        float rm = row[0], rs = 0.f;
#pragma omp simd reduction(max:rm) reduction(+:rs)
        for (i64 w = 0; w < W; w++) { const float v = row[w]; rm = v > rm ? v : rm; rs += v; }
        rmax[h] = rm;
        rsum[h] = rs;
    }
}

INLINE void pool_impl(const float* restrict xb, i64 C, const i64 H, const i64 W, int spatial,
                      float* restrict cwm, float* restrict cws, float* restrict hcm, float* restrict hcs,
                      float* restrict sm, float* restrict ss) {
    for (i64 c = 0; c < C; c++) {
        const float* xc = xb + c * H * W;
        float* cm = cwm + c * W;
        float* cs = cws + c * W;
        if (H <= 16 && W <= 16) {
            /* small planes: row reductions four rows at a time; column reductions with the (unrolled)
             * loop over rows inside, vectorised over the columns */
            row_reduce(xc, H, W, hcm + c * H, hcs + c * H);
            for (i64 w = 0; w < W; w++) {
                float m = xc[w], a = xc[w];
                for (i64 h = 1; h < H; h++) { const float v = xc[h * W + w]; m = v > m ? v : m; a += v; }
                cm[w] = m;
                cs[w] = a;
            }
        } else {
            for (i64 w = 0; w < W; w++) { cm[w] = xc[w]; cs[w] = 0.f; }
            for (i64 h = 0; h < H; h++) {
                const float* row = xc + h * W;
                float rm = row[0], rs = 0.f;
#pragma omp simd reduction(max:rm) reduction(+:rs)
                for (i64 w = 0; w < W; w++) {
                    const float v = row[w];
                    rm = v > rm ? v : rm;
                    rs += v;
                    cm[w] = v > cm[w] ? v : cm[w];
                    cs[w] += v;
                }
                hcm[c * H + h] = rm;
                hcs[c * H + h] = rs;
            }
        }
    }
    if (spatial) {  /* over channels, two at a time */
        const i64 n = H * W;
        for (i64 i = 0; i < n; i++) { sm[i] = xb[i]; ss[i] = xb[i]; }
        i64 c = 1;
        for (; c + 1 < C; c += 2) {
            const float* x0 = xb + c * n;
            const float* x1 = x0 + n;
#pragma omp simd
            for (i64 i = 0; i < n; i++) {
                const float v0 = x0[i], v1 = x1[i], m = v0 > v1 ? v0 : v1;
                sm[i] = m > sm[i] ? m : sm[i];
                ss[i] += v0 + v1;
            }
        }
        for (; c < C; c++) {
            const float* x0 = xb + c * n;
#pragma omp simd
            for (i64 i = 0; i < n; i++) { const float v = x0[i]; sm[i] = v > sm[i] ? v : sm[i]; ss[i] += v; }
        }
    }
}

static void pool_sample(const float* xb, i64 C, i64 H, i64 W, int spatial,
                        float* cwm, float* cws, float* hcm, float* hcs, float* sm, float* ss) {
    #define POOL_CALL(HH, WW) pool_impl(xb, C, HH, WW, spatial, cwm, cws, hcm, hcs, sm, ss)
    HW_DISPATCH(POOL_CALL)
    #undef POOL_CALL
}

/* ---- out = x * (cw + hc + s) * weight for one sample; gates natural and contiguous ---- */
INLINE void gate_impl(const float* xb, i64 C, const i64 H, const i64 W, const float* cw, const float* hc,
                      const float* s, float weight, float* ob) {
    for (i64 c = 0; c < C; c++)
        for (i64 h = 0; h < H; h++) {
            const float* xr = xb + (c * H + h) * W;
            float* orow = ob + (c * H + h) * W;
            const float* cwr = cw + c * W;
            const float* sr = s + h * W;
            const float hv = hc[c * H + h];
#pragma omp simd
            for (i64 w = 0; w < W; w++) orow[w] = xr[w] * ((cwr[w] + hv + sr[w]) * weight);
        }
}
static void gate_sample(const float* xb, i64 C, i64 H, i64 W, const float* cw, const float* hc,
                        const float* s, float weight, float* ob) {
    #define GATE_CALL(HH, WW) gate_impl(xb, C, HH, WW, cw, hc, s, weight, ob)
    HW_DISPATCH(GATE_CALL)
    #undef GATE_CALL
}

/* ---- correlation in register tiles:
 * out[co][r][q] = sum_{ci, i, j} wt[((co * CI + ci) * K + i) * K + j] * in[ci][r + i][q + j]
 * in: CI zero-padded planes (plane stride psi, row stride ldi) whose data rows are ulo .. uhi-1
 * (uhi + K/2 rows in all); rows past the plane are clamped (their outputs are discarded). Columns are
 * read up to TQ - 1 past Q + K - 1 (finite values required: the caller's slack). */
INLINE void corr_impl(const float* in, i64 psi, i64 ldi, i64 ulo, i64 uhi, const int CI, const int CO, const int K,
                      const float* wt, float* out, i64 pso, i64 ldo, i64 R, i64 Q) {
    (void)ulo;  /* rows before ulo are read (zero padding); rows from uhi on only for discarded outputs */
    for (i64 r0 = 0; r0 < R; r0 += RB)
        for (i64 q0 = 0; q0 < Q; q0 += TQ)
            for (int co = 0; co < CO; co++) {
                float acc[RB][TQ];
                for (int rb = 0; rb < RB; rb++)
                    for (int q = 0; q < TQ; q++) acc[rb][q] = 0.f;
                for (int ci = 0; ci < CI; ci++)
                    for (int i = 0; i < K; i++) {
                        const float* src[RB];
                        for (int rb = 0; rb < RB; rb++) {
                            i64 row = r0 + rb + i;
                            row = row < uhi + K / 2 ? row : uhi + K / 2 - 1;  /* last row of the padded plane */
                            src[rb] = in + ci * psi + row * ldi + q0;
                        }
                        const float* wr = wt + ((co * CI + ci) * K + i) * K;
                        for (int j = 0; j < K; j++) {
                            const float wv = wr[j];
                            for (int rb = 0; rb < RB; rb++) {
                                const float* sp = src[rb] + j;
#pragma omp simd
                                for (int q = 0; q < TQ; q++) acc[rb][q] += wv * sp[q];
                            }
                        }
                    }
                const i64 nr = R - r0 < RB ? R - r0 : RB, nq = Q - q0 < TQ ? Q - q0 : TQ;
                for (i64 rb = 0; rb < nr; rb++)
                    for (i64 q = 0; q < nq; q++) out[co * pso + (r0 + rb) * ldo + q0 + q] = acc[rb][q];
            }
}
#define CORR_K(CI, CO) \
    switch (K) { \
        case 3: corr_impl(in, psi, ldi, ulo, uhi, CI, CO, 3, wt, out, pso, ldo, R, Q); break; \
        case 5: corr_impl(in, psi, ldi, ulo, uhi, CI, CO, 5, wt, out, pso, ldo, R, Q); break; \
        case 7: corr_impl(in, psi, ldi, ulo, uhi, CI, CO, 7, wt, out, pso, ldo, R, Q); break; \
        default: corr_impl(in, psi, ldi, ulo, uhi, CI, CO, K, wt, out, pso, ldo, R, Q); \
    }
static void corr21(const float* in, i64 psi, i64 ldi, i64 ulo, i64 uhi, int K, const float* wt, float* out, i64 pso, i64 ldo, i64 R, i64 Q) { CORR_K(2, 1) }
static void corr12(const float* in, i64 psi, i64 ldi, i64 ulo, i64 uhi, int K, const float* wt, float* out, i64 pso, i64 ldo, i64 R, i64 Q) { CORR_K(1, 2) }

/* ---- weight gradient of one sample: gw[c][i][j] += sum_{y, x} g[y][x] * P[c][y + i][x + j]
 * g: rows zero-padded to QT (a multiple of TQ); P: padded stored map (row stride ldi, slack after). */
INLINE void gradw_impl(const float* P, i64 psi, i64 ldi, const float* g, i64 QT, i64 R, const int K, float* gw) {
    const i64 p = K / 2;  /* rows of P outside p .. p+R-1 are zero padding */
    for (int c = 0; c < 2; c++)
        for (int i = 0; i < K; i++) {
            float acc[K][TQ];
            for (int j = 0; j < K; j++)
                for (int q = 0; q < TQ; q++) acc[j][q] = 0.f;
            const i64 ylo = p - i > 0 ? p - i : 0, yhi = p + R - i < R ? p + R - i : R;
            for (i64 y = ylo; y < yhi; y++) {
                const float* prow = P + c * psi + (y + i) * ldi;
                const float* grow = g + y * QT;
                for (i64 q0 = 0; q0 < QT; q0 += TQ)
                    for (int j = 0; j < K; j++) {
                        const float* pp = prow + q0 + j;
                        const float* gg = grow + q0;
#pragma omp simd
                        for (int q = 0; q < TQ; q++) acc[j][q] += gg[q] * pp[q];
                    }
            }
            for (int j = 0; j < K; j++) {
                float s = 0.f;
                for (int q = 0; q < TQ; q++) s += acc[j][q];
                gw[(c * K + i) * K + j] += s;
            }
        }
}
static void gradw(const float* P, i64 psi, i64 ldi, const float* g, i64 QT, i64 R, int K, float* gw) {
    switch (K) {
        case 3: gradw_impl(P, psi, ldi, g, QT, R, 3, gw); break;
        case 5: gradw_impl(P, psi, ldi, g, QT, R, 5, gw); break;
        case 7: gradw_impl(P, psi, ldi, g, QT, R, 7, gw); break;
        default: {  /* larger kernels: one tap at a time */
            for (int c = 0; c < 2; c++)
                for (int i = 0; i < K; i++)
                    for (int j = 0; j < K; j++) {
                        float acc[TQ];
                        for (int q = 0; q < TQ; q++) acc[q] = 0.f;
                        for (i64 y = 0; y < R; y++)
                            for (i64 q0 = 0; q0 < QT; q0 += TQ) {
                                const float* pp = P + c * psi + (y + i) * ldi + q0 + j;
                                const float* gg = g + y * QT + q0;
                                for (int q = 0; q < TQ; q++) acc[q] += gg[q] * pp[q];
                            }
                        float s = 0.f;
                        for (int q = 0; q < TQ; q++) s += acc[q];
                        gw[(c * K + i) * K + j] += s;
                    }
        }
    }
}

static void local_weight(const float* w, i64 k, int t, float* wl) {
    for (i64 c = 0; c < 2; c++)
        for (i64 i = 0; i < k; i++)
            for (i64 j = 0; j < k; j++)
                wl[(c * k + i) * k + j] = t ? w[(c * k + j) * k + i] : w[(c * k + i) * k + j];
}

/* ---------------- training forward ---------------- */

/* pooled maps of all branches into zero-initialised padded buffers; ms NULL without spatial */
void ta_pool(const float* x, i64 B, i64 C, i64 H, i64 W, i64 p,
             float* mcw, int tcw, float* mhc, int thc, float* ms, int ts, int nthreads) {
    const int spatial = ms != NULL;
    i64 A[3], N[3], R[3], Q[3]; int tr[3];
    dims(C, H, W, 0, tcw, &A[0], &N[0], &tr[0], &R[0], &Q[0]);
    dims(C, H, W, 1, thc, &A[1], &N[1], &tr[1], &R[1], &Q[1]);
    dims(C, H, W, 2, ts, &A[2], &N[2], &tr[2], &R[2], &Q[2]);
#pragma omp parallel num_threads(nthreads)
    {
        float* buf = malloc(sizeof(float) * 2 * (C * W + C * H + H * W));
        float *cwm = buf, *cws = cwm + C * W, *hcm = cws + C * W, *hcs = hcm + C * H, *sm = hcs + C * H, *ss = sm + H * W;
#pragma omp for schedule(static)
        for (i64 b = 0; b < B; b++) {
            pool_sample(x + b * C * H * W, C, H, W, spatial, cwm, cws, hcm, hcs, sm, ss);
            store_map(cwm, cws, A[0], N[0], (float)H, tr[0], p, mcw + b * 2 * (R[0] + 2 * p) * (Q[0] + 2 * p));
            store_map(hcm, hcs, A[1], N[1], (float)W, tr[1], p, mhc + b * 2 * (R[1] + 2 * p) * (Q[1] + 2 * p));
            if (spatial)
                store_map(sm, ss, A[2], N[2], (float)C, tr[2], p, ms + b * 2 * (R[2] + 2 * p) * (Q[2] + 2 * p));
        }
        free(buf);
    }
}

/* conv outputs of one branch: maps (B, 2, R+k-1, Q+k-1) [+ slack] -> z (B, R, Q) */
void ta_conv(const float* maps, i64 B, i64 R, i64 Q, i64 k, const float* w, int t, float* z, int nthreads) {
    float wl[2 * k * k];
    local_weight(w, k, t, wl);
    const i64 Rp = R + k - 1, Qp = Q + k - 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (i64 b = 0; b < B; b++)
        corr21(maps + b * 2 * Rp * Qp, Rp * Qp, Qp, k / 2, k / 2 + R, (int)k, wl, z + b * R * Q, R * Q, Q, R, Q);
}

/* out = x * (g_cw + g_hc [+ g_s]) * weight; gates: stored planes (B, R, Q); gs NULL without spatial */
void ta_combine(const float* x, i64 B, i64 C, i64 H, i64 W, const float* gcw, int tcw, const float* ghc, int thc,
                const float* gs, int ts, float* out, int nthreads) {
    const int spatial = gs != NULL;
    const float weight = spatial ? 1.f / 3.f : 0.5f;
#pragma omp parallel num_threads(nthreads)
    {
        float* buf = malloc(sizeof(float) * (C * W + C * H + H * W));
        float *cw = buf, *hc = cw + C * W, *s = hc + C * H;
#pragma omp for schedule(static)
        for (i64 b = 0; b < B; b++) {
            gather(gcw, b * C * W, tcw ? C : W, tcw, C, W, cw);
            gather(ghc, b * C * H, thc ? H : C, !thc, C, H, hc);
            if (spatial) gather(gs, b * H * W, ts ? H : W, ts, H, W, s);
            else for (i64 i = 0; i < H * W; i++) s[i] = 0.f;
            gate_sample(x + b * C * H * W, C, H, W, cw, hc, s, weight, out + b * C * H * W);
        }
        free(buf);
    }
}

/* ---------------- inference: one sample at a time, while it is in cache ---------------- */

/* bn: per branch (weight, bias, running mean, running var); ws NULL without spatial; bit br of wt:
 * branch br's weight is given transposed (the layout trick for channels_last input, see Python) */
void ta_eval(const float* x, i64 B, i64 C, i64 H, i64 W, i64 k, const float* wcw, const float* whc, const float* ws,
             const float* const* bn, double eps, int tcw, int thc, int ts, int wt, float* out, int nthreads) {
    const int spatial = ws != NULL;
    const int nb = spatial ? 3 : 2;
    const i64 p = k / 2;
    const int tf[3] = {tcw, thc, ts};
    const float* wsrc[3] = {wcw, whc, ws};
    i64 A[3], N[3], R[3], Q[3], moff[3], goff[3]; int tr[3];
    float wl[3][2 * k * k], scale[3], shift[3];
    i64 mapsize = 0, gatesize = 0;
    for (int br = 0; br < nb; br++) {
        dims(C, H, W, br, tf[br], &A[br], &N[br], &tr[br], &R[br], &Q[br]);
        local_weight(wsrc[br], k, tf[br] ^ ((wt >> br) & 1), wl[br]);
        const float* const* q = bn + 4 * br;
        scale[br] = (float)(q[0][0] / sqrt((double)q[3][0] + eps));
        shift[br] = q[1][0] - q[2][0] * scale[br];
        moff[br] = mapsize;
        goff[br] = gatesize;
        mapsize += 2 * (R[br] + 2 * p) * (Q[br] + 2 * p);
        gatesize += R[br] * Q[br];
    }
    const float weight = spatial ? 1.f / 3.f : 0.5f;
    const i64 pooled = 2 * (C * W + C * H + H * W), natural = C * W + C * H + H * W;
#pragma omp parallel num_threads(nthreads)
    {
        float* buf = calloc((size_t)(pooled + mapsize + SLACK + gatesize + natural), sizeof(float));
        float *cwm = buf, *cws = cwm + C * W, *hcm = cws + C * W, *hcs = hcm + C * H, *sm = hcs + C * H, *ss = sm + H * W;
        float* maps = buf + pooled;  /* borders and slack stay zero */
        float* gates = maps + mapsize + SLACK;
        float *ncw = gates + gatesize, *nhc = ncw + C * W, *ns = nhc + C * H;
        const float* mx[3] = {cwm, hcm, sm};
        const float* su[3] = {cws, hcs, ss};
        const float nn[3] = {(float)H, (float)W, (float)C};
        float* nat[3] = {ncw, nhc, ns};
#pragma omp for schedule(static)
        for (i64 b = 0; b < B; b++) {
            const float* xb = x + b * C * H * W;
            pool_sample(xb, C, H, W, spatial, cwm, cws, hcm, hcs, sm, ss);
            for (int br = 0; br < nb; br++) {
                const i64 Rp = R[br] + 2 * p, Qp = Q[br] + 2 * p, n = R[br] * Q[br];
                float* m = maps + moff[br];
                float* g = gates + goff[br];
                store_map(mx[br], su[br], A[br], N[br], nn[br], tr[br], p, m);
                corr21(m, Rp * Qp, Qp, p, p + R[br], (int)k, wl[br], g, n, Q[br], R[br], Q[br]);
                const float a = scale[br], c = shift[br];
#pragma omp simd
                for (i64 i = 0; i < n; i++) g[i] = 1.f / (1.f + vexpf(-(g[i] * a + c)));
                gather(g, 0, Q[br], tr[br], A[br], N[br], nat[br]);
            }
            if (!spatial) for (i64 i = 0; i < H * W; i++) ns[i] = 0.f;
            gate_sample(xb, C, H, W, ncw, nhc, ns, weight, out + b * C * H * W);
        }
        free(buf);
    }
}

/* ---------------- training backward ---------------- */

/* Pass 1 over (x, grad): gate gradients (stored planes, like the gates) and the number of maximal
 * elements of every max-pooled cell (natural layouts cw (B,C,W), hc (B,C,H), s (B,H,W)). */
INLINE void reduce_impl(const float* xb, const float* gb, i64 C, const i64 H, const i64 W, int spatial,
                        const float* xcw, const float* xhc, const float* xs,
                        float* gcw, float* ghc, float* gsp, float* n_cw, float* n_hc, float* n_s, float* tmp) {
    for (i64 i = 0; i < C * W; i++) { gcw[i] = 0.f; n_cw[i] = 0.f; }
    for (i64 i = 0; i < H * W; i++) gsp[i] = 0.f;
    if (spatial) for (i64 i = 0; i < H * W; i++) n_s[i] = 0.f;
    float* prod = tmp;          /* grad * x of one plane */
    float* hit = tmp + H * W;   /* x == max over w, as 0/1 */
    for (i64 c = 0; c < C; c++) {
        const float* xc = xb + c * H * W;
        const float* gc = gb + c * H * W;
        const float* mc = xcw + c * W;
        float* a = gcw + c * W;
        float* nc = n_cw + c * W;
        if (W < 16) {  /* narrow rows: products first, row sums four rows at a time */
            for (i64 h = 0; h < H; h++) {
                const float* xr = xc + h * W;
                const float* gr = gc + h * W;
                float* pr = prod + h * W;
                float* hr = hit + h * W;
                const float mh = xhc[c * H + h];
#pragma omp simd
                for (i64 w = 0; w < W; w++) {
                    const float v = xr[w], t = gr[w] * v;
                    pr[w] = t;
                    hr[w] = v == mh ? 1.f : 0.f;
                    a[w] += t;
                    nc[w] += v == mc[w] ? 1.f : 0.f;
                }
            }
            float unused[H];
            row_reduce(prod, H, W, unused, ghc + c * H);   /* sums of grad * x over w */
            row_reduce(hit, H, W, unused, n_hc + c * H);   /* tie counts over w */
        } else {
            for (i64 h = 0; h < H; h++) {
                const float* xr = xc + h * W;
                const float* gr = gc + h * W;
                float* pr = prod + h * W;
                const float mh = xhc[c * H + h];
                float acc = 0.f, cnt = 0.f;
#pragma omp simd reduction(+:acc, cnt)
                for (i64 w = 0; w < W; w++) {
                    const float v = xr[w], t = gr[w] * v;
                    pr[w] = t;
                    acc += t;
                    a[w] += t;
                    cnt += v == mh ? 1.f : 0.f;
                    nc[w] += v == mc[w] ? 1.f : 0.f;
                }
                ghc[c * H + h] = acc;
                n_hc[c * H + h] = cnt;
            }
        }
        if (spatial) {
#pragma omp simd
            for (i64 i = 0; i < H * W; i++) {
                const float v = xc[i];
                gsp[i] += prod[i];
                n_s[i] += v == xs[i] ? 1.f : 0.f;
            }
        }
    }
}

void ta_backward_reduce(const float* x, const float* go, i64 B, i64 C, i64 H, i64 W, i64 p,
                        const float* mcw, int tcw, const float* mhc, int thc, const float* ms, int ts,
                        float* dcw, float* dhc, float* ds, float* ncw, float* nhc, float* ns, int nthreads) {
    const int spatial = ms != NULL;
    const float weight = spatial ? 1.f / 3.f : 0.5f;
    i64 A[3], N[3], R[3], Q[3]; int tr[3];
    dims(C, H, W, 0, tcw, &A[0], &N[0], &tr[0], &R[0], &Q[0]);
    dims(C, H, W, 1, thc, &A[1], &N[1], &tr[1], &R[1], &Q[1]);
    dims(C, H, W, 2, ts, &A[2], &N[2], &tr[2], &R[2], &Q[2]);
#pragma omp parallel num_threads(nthreads)
    {
        float* buf = malloc(sizeof(float) * (2 * (C * W + C * H + H * W) + 3 * H * W));
        float *gcw = buf, *ghc = gcw + C * W, *gsp = ghc + C * H, *xcw = gsp + H * W, *xhc = xcw + C * W, *xs = xhc + C * H;
        float* nsd = xs + H * W;  /* dummy counts without spatial */
        float* tmp = nsd + H * W;
#pragma omp for schedule(static)
        for (i64 b = 0; b < B; b++) {
            const i64 Qp0 = Q[0] + 2 * p, Qp1 = Q[1] + 2 * p, Qp2 = Q[2] + 2 * p;
            gather(mcw + b * 2 * (R[0] + 2 * p) * Qp0, p * Qp0 + p, Qp0, tr[0], A[0], N[0], xcw);
            gather(mhc + b * 2 * (R[1] + 2 * p) * Qp1, p * Qp1 + p, Qp1, tr[1], A[1], N[1], xhc);
            if (spatial) gather(ms + b * 2 * (R[2] + 2 * p) * Qp2, p * Qp2 + p, Qp2, tr[2], A[2], N[2], xs);
            float* n_s = spatial ? ns + b * H * W : nsd;
            const float* xb = x + b * C * H * W;
            const float* gb = go + b * C * H * W;
            float* n_cw = ncw + b * C * W;
            float* n_hc = nhc + b * C * H;
            #define REDUCE_CALL(HH, WW) reduce_impl(xb, gb, C, HH, WW, spatial, xcw, xhc, xs, gcw, ghc, gsp, n_cw, n_hc, n_s, tmp)
            HW_DISPATCH(REDUCE_CALL)
            #undef REDUCE_CALL
            scatter(gcw, A[0], N[0], weight, dcw + b * R[0] * Q[0], 0, Q[0], tr[0]);
            scatter(ghc, A[1], N[1], weight, dhc + b * R[1] * Q[1], 0, Q[1], tr[1]);
            if (spatial) scatter(gsp, A[2], N[2], weight, ds + b * R[2] * Q[2], 0, Q[2], tr[2]);
        }
        free(buf);
    }
}

/* Gradients of one branch's convolution: for the (unpadded) pooled map, stored plane (B, 2, R, Q),
 * and for the weight, official orientation (2, k, k), summed over the batch. */
void ta_conv_backward(const float* maps, const float* gz, i64 B, i64 R, i64 Q, i64 k, const float* w, int t,
                      float* gmap, float* gw, int nthreads) {
    const i64 p = k / 2, Rp = R + k - 1, Qp = Q + k - 1, kk = 2 * k * k;
    const i64 QT = (Q + TQ - 1) / TQ * TQ;
    float wl[kk], wf[kk];
    local_weight(w, k, t, wl);
    for (i64 c = 0; c < 2; c++)  /* flipped: the gradient is a correlation with the rotated kernel */
        for (i64 i = 0; i < k; i++)
            for (i64 j = 0; j < k; j++) wf[(c * k + i) * k + j] = wl[(c * k + (k - 1 - i)) * k + (k - 1 - j)];
    float* partial = calloc((size_t)nthreads * kk, sizeof(float));
#pragma omp parallel num_threads(nthreads)
    {
        float* acc = partial + (i64)omp_get_thread_num() * kk;
        float* gzp = calloc((size_t)(Rp * Qp + SLACK), sizeof(float));   /* zero-padded gradient */
        float* gzt = calloc((size_t)(R * QT), sizeof(float));            /* rows zero-padded to QT */
#pragma omp for schedule(static)
        for (i64 b = 0; b < B; b++) {
            const float* g = gz + b * R * Q;
            for (i64 r = 0; r < R; r++) {
                memcpy(gzp + (r + p) * Qp + p, g + r * Q, sizeof(float) * Q);
                memcpy(gzt + r * QT, g + r * Q, sizeof(float) * Q);
            }
            corr12(gzp, 0, Qp, p, p + R, (int)k, wf, gmap + b * 2 * R * Q, R * Q, Q, R, Q);
            gradw(maps + b * 2 * Rp * Qp, Rp * Qp, Qp, gzt, QT, R, (int)k, acc);
        }
        free(gzp);
        free(gzt);
    }
    for (i64 c = 0; c < 2; c++)
        for (i64 i = 0; i < k; i++)
            for (i64 j = 0; j < k; j++) {
                float s = 0.f;
                for (int th = 0; th < nthreads; th++) s += partial[th * kk + (c * k + i) * k + j];
                if (t) gw[(c * k + j) * k + i] = s; else gw[(c * k + i) * k + j] = s;
            }
    free(partial);
}

/* Pass 2: grad x = grad * mean(gates) + the ZPool backward of every branch (the max part shared
 * equally by tied maxima, as amax does; the mean part spread evenly). */
INLINE void dx_impl(const float* xb, const float* gb, float* db, i64 C, const i64 H, const i64 W, float weight,
                    float* const* gate, float* const* peak, float* const* share, float* const* even) {
    for (i64 c = 0; c < C; c++)
        for (i64 h = 0; h < H; h++) {
            const i64 row = (c * H + h) * W;
            const float *xr = xb + row, *gr = gb + row;
            float* dr = db + row;
            const float *g0 = gate[0] + c * W, *p0 = peak[0] + c * W, *a0 = share[0] + c * W, *e0 = even[0] + c * W;
            const float g1 = gate[1][c * H + h], p1 = peak[1][c * H + h], a1 = share[1][c * H + h], e1 = even[1][c * H + h];
            const float *g2 = gate[2] + h * W, *p2 = peak[2] + h * W, *a2 = share[2] + h * W, *e2 = even[2] + h * W;
#pragma omp simd
            for (i64 w = 0; w < W; w++) {
                const float v = xr[w];
                float d = gr[w] * ((g0[w] + g1 + g2[w]) * weight);
                d += (v == p0[w] ? a0[w] : 0.f) + e0[w];
                d += (v == p1 ? a1 : 0.f) + e1;
                d += (v == p2[w] ? a2[w] : 0.f) + e2[w];
                dr[w] = d;
            }
        }
}

void ta_backward_dx(const float* x, const float* go, i64 B, i64 C, i64 H, i64 W, i64 p,
                    const float* gcw, const float* ghc, const float* gs,
                    const float* mcw, const float* mhc, const float* ms, int tcw, int thc, int ts,
                    const float* dcw, const float* dhc, const float* dsp,
                    const float* ncw, const float* nhc, const float* ns, float* dx, int nthreads) {
    const int spatial = gs != NULL;
    const float weight = spatial ? 1.f / 3.f : 0.5f;
    i64 A[3], N[3], R[3], Q[3]; int tr[3];
    dims(C, H, W, 0, tcw, &A[0], &N[0], &tr[0], &R[0], &Q[0]);
    dims(C, H, W, 1, thc, &A[1], &N[1], &tr[1], &R[1], &Q[1]);
    dims(C, H, W, 2, ts, &A[2], &N[2], &tr[2], &R[2], &Q[2]);
    const i64 sz[3] = {C * W, C * H, H * W};
#pragma omp parallel num_threads(nthreads)
    {
        float* buf = malloc(sizeof(float) * 4 * (C * W + C * H + H * W));
        float* gate[3]; float* peak[3]; float* share[3]; float* even[3];
        float* cur = buf;
        for (int br = 0; br < 3; br++) {
            gate[br] = cur; cur += sz[br]; peak[br] = cur; cur += sz[br];
            share[br] = cur; cur += sz[br]; even[br] = cur; cur += sz[br];
        }
        const float* gsrc[3] = {gcw, ghc, gs};
        const float* msrc[3] = {mcw, mhc, ms};
        const float* dsrc[3] = {dcw, dhc, dsp};
        const float* nsrc[3] = {ncw, nhc, ns};
        const float nn[3] = {(float)H, (float)W, (float)C};
#pragma omp for schedule(static)
        for (i64 b = 0; b < B; b++) {
            for (int br = 0; br < 3; br++) {
                if (br == 2 && !spatial) {
                    for (i64 i = 0; i < sz[2]; i++) { gate[2][i] = 0.f; share[2][i] = 0.f; even[2][i] = 0.f; peak[2][i] = NAN; }
                    continue;
                }
                const i64 Qp = Q[br] + 2 * p, msize = 2 * (R[br] + 2 * p) * Qp;
                gather(gsrc[br], b * R[br] * Q[br], Q[br], tr[br], A[br], N[br], gate[br]);
                gather(msrc[br], b * msize + p * Qp + p, Qp, tr[br], A[br], N[br], peak[br]);
                gather(dsrc[br], b * 2 * R[br] * Q[br], Q[br], tr[br], A[br], N[br], share[br]);
                gather(dsrc[br], (b * 2 + 1) * R[br] * Q[br], Q[br], tr[br], A[br], N[br], even[br]);
                const float* cnt = nsrc[br] + b * sz[br];
                for (i64 i = 0; i < sz[br]; i++) { share[br][i] /= cnt[i]; even[br][i] /= nn[br]; }
            }
            const float* xb = x + b * C * H * W;
            const float* gb = go + b * C * H * W;
            float* db = dx + b * C * H * W;
            #define DX_CALL(HH, WW) dx_impl(xb, gb, db, C, HH, WW, weight, gate, peak, share, even)
            HW_DISPATCH(DX_CALL)
            #undef DX_CALL
        }
        free(buf);
    }
}
"""

_P, _I, _F, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
_native = NativeLibrary("triplet_attention", _C_SOURCE, {
    "ta_pool": [_P, _I, _I, _I, _I, _I, _P, _F, _P, _F, _P, _F, _F],
    "ta_conv": [_P, _I, _I, _I, _I, _P, _F, _P, _F],
    "ta_combine": [_P, _I, _I, _I, _I, _P, _F, _P, _F, _P, _F, _P, _F],
    "ta_eval": [_P, _I, _I, _I, _I, _I, _P, _P, _P, _P, _D, _F, _F, _F, _F, _P, _F],
    "ta_backward_reduce": [_P, _P, _I, _I, _I, _I, _I, _P, _F, _P, _F, _P, _F, _P, _P, _P, _P, _P, _P, _F],
    "ta_conv_backward": [_P, _P, _I, _I, _I, _I, _P, _F, _P, _P, _F],
    "ta_backward_dx": [_P, _P, _I, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _F, _F, _F, _P, _P, _P, _P, _P, _P,
                       _P, _F],
})


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _stored_transposed(channels: int, height: int, width: int) -> tuple[bool, bool, bool]:
    """Per branch (channel-width (C, W), height-channel (H, C), spatial (H, W)): is the plane
    stored transposed, so that its longer side is contiguous?"""
    return channels > width, height > channels, height > width


def _stored_shapes(channels: int, height: int, width: int, flags) -> list[tuple[int, int]]:
    official = ((channels, width), (height, channels), (height, width))
    return [(q, r) if t else (r, q) for (r, q), t in zip(official, flags)]


def _broadcast_gates(gates, flags):
    """Stored-plane gates (B, R, Q) -> views that broadcast against (B, C, H, W)."""
    t_cw, t_hc, t_s = flags
    views = [(gates[0].transpose(1, 2) if t_cw else gates[0]).unsqueeze(2),     # (B, C, 1, W)
             (gates[1] if t_hc else gates[1].transpose(1, 2)).unsqueeze(3)]     # (B, C, H, 1)
    if len(gates) == 3:
        views.append((gates[2].transpose(1, 2) if t_s else gates[2]).unsqueeze(1))  # (B, 1, H, W)
    return views


_SLACK = 32  # zero floats after the maps: the C vector tiles read past a row's end


def _padded_maps(x: torch.Tensor, batch: int, rows: int, cols: int) -> torch.Tensor:
    n = batch * 2 * rows * cols
    return x.new_zeros(n + _SLACK)[:n].view(batch, 2, rows, cols)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


# The C kernels read a contiguous (B, C, H, W) tensor. A channels_last x is a contiguous (B, H, W, C)
# tensor y = x.permute(0, 2, 3, 1), and Triplet Attention of y is Triplet Attention of x with its
# branches rotated: y's channel-width plane (pooled over y's height, x's W) is x's height-channel
# plane (H, C); y's height-channel plane (pooled over x's C) is x's spatial plane transposed, (W, H);
# y's spatial plane (pooled over x's H) is x's channel-width plane transposed, (W, C). So the same
# kernels run on NHWC memory without a copy, given the branches in that order and the transposed
# branches' weights read transposed. A lane: (branch name of x, its weight is read transposed).
_NCHW_LANES = (("channel_width", False), ("height_channel", False), ("spatial", False))
_NHWC_LANES = (("height_channel", False), ("spatial", True), ("channel_width", True))
_INFERENCE_CACHES = {_NCHW_LANES: PointerCache(), _NHWC_LANES: PointerCache()}


class _TripletFunction(torch.autograd.Function):
    """Training (or any autograd) forward of :class:`TripletAttention` with the C kernels.

    Inputs after the module: x, then the parameters (conv weights, BN weights and biases) so
    that autograd routes their gradients here. The BN + sigmoid of the conv outputs is a small
    PyTorch graph recorded in forward and differentiated in backward.
    """

    @staticmethod
    def forward(ctx, x, module, lanes, *params):
        lib = _native.get()
        batch, channels, height, width = x.shape
        branches = [module._modules[name] for name, _ in lanes]
        wts = [int(transposed) for _, transposed in lanes]
        k = module.kernel_size
        pad, threads = k // 2, torch.get_num_threads()
        flags = _stored_transposed(channels, height, width)
        shapes = _stored_shapes(channels, height, width, flags)[: len(branches)]
        maps = [_padded_maps(x, batch, r + 2 * pad, q + 2 * pad) for r, q in shapes]
        lib.ta_pool(x.data_ptr(), batch, channels, height, width, pad, maps[0].data_ptr(), flags[0],
                    maps[1].data_ptr(), flags[1], _ptr(maps[2]) if len(maps) == 3 else None, flags[2], threads)
        logits = []
        for branch, m, (r, q), t, wt in zip(branches, maps, shapes, flags, wts):
            z = x.new_empty(batch, r, q)
            weight = branch.conv.weight.detach().contiguous()  # held: C reads it
            lib.ta_conv(m.data_ptr(), batch, r, q, k, weight.data_ptr(), t ^ wt, z.data_ptr(), threads)
            logits.append(z.requires_grad_())
        with torch.enable_grad():
            gates = [branch.sigmoid(branch.bn(z.unsqueeze(1))).squeeze(1) for branch, z in zip(branches, logits)]
        out = torch.empty_like(x)
        g = gates + [None] * (3 - len(gates))
        lib.ta_combine(x.data_ptr(), batch, channels, height, width, g[0].data_ptr(), flags[0], g[1].data_ptr(),
                       flags[1], _ptr(g[2]), flags[2], out.data_ptr(), threads)
        if module.record:
            views = _broadcast_gates(gates, flags)
            if lanes == _NHWC_LANES:  # views broadcast against (B, H, W, C): back to (B, C, H, W)
                views = [v.permute(0, 3, 1, 2) for v in views]
            recorded = {name: v.detach() for (name, _), v in zip(lanes, views)}
            module.recorded = {name: recorded[name] for name in BRANCHES if name in recorded}
        ctx.save_for_backward(x, *maps)
        ctx.inner = (logits, gates)
        ctx.module, ctx.lanes, ctx.flags, ctx.shapes, ctx.lib = module, lanes, flags, shapes, lib
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        lib = ctx.lib
        x, *maps = ctx.saved_tensors
        logits, gates = ctx.inner
        del ctx.inner
        module, lanes, flags, shapes = ctx.module, ctx.lanes, ctx.flags, ctx.shapes
        branches = [module._modules[name] for name, _ in lanes]
        batch, channels, height, width = x.shape
        k = module.kernel_size
        pad, threads = k // 2, torch.get_num_threads()
        grad = grad.contiguous()
        spatial = len(branches) == 3
        d_gates = [torch.empty_like(g) for g in gates]
        counts = [x.new_empty(batch, channels, width), x.new_empty(batch, channels, height),
                  x.new_empty(batch, height, width) if spatial else None]
        m = maps + [None] * (3 - len(maps))
        dg = d_gates + [None] * (3 - len(d_gates))
        lib.ta_backward_reduce(x.data_ptr(), grad.data_ptr(), batch, channels, height, width, pad,
                               m[0].data_ptr(), flags[0], m[1].data_ptr(), flags[1], _ptr(m[2]), flags[2],
                               dg[0].data_ptr(), dg[1].data_ptr(), _ptr(dg[2]),
                               counts[0].data_ptr(), counts[1].data_ptr(), _ptr(counts[2]), threads)
        bn_params = [p for b in branches for p in (b.bn.weight, b.bn.bias)]
        wanted = [p for p in bn_params if p is not None and p.requires_grad]
        grads = torch.autograd.grad(gates, [*logits, *wanted], d_gates, allow_unused=True)
        d_logits, d_wanted = grads[: len(logits)], dict(zip(map(id, wanted), grads[len(logits):]))
        grad_maps, grad_weights = [], []
        for branch, mp, dz, (r, q), t, (_, wt) in zip(branches, maps, d_logits, shapes, flags, lanes):
            # every tensor C reads or writes is held by a name for the duration of the call
            dz = dz.contiguous()
            weight = branch.conv.weight.detach().contiguous()
            gm = x.new_empty(batch, 2, r, q)
            gw = weight.new_empty(weight.shape)
            lib.ta_conv_backward(mp.data_ptr(), dz.data_ptr(), batch, r, q, k, weight.data_ptr(), t ^ wt,
                                 gm.data_ptr(), gw.data_ptr(), threads)
            grad_maps.append(gm)
            grad_weights.append(gw)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x)
            gm = grad_maps + [None] * (3 - len(grad_maps))
            g = gates + [None] * (3 - len(gates))
            lib.ta_backward_dx(x.data_ptr(), grad.data_ptr(), batch, channels, height, width, pad,
                               g[0].data_ptr(), g[1].data_ptr(), _ptr(g[2]),
                               m[0].data_ptr(), m[1].data_ptr(), _ptr(m[2]), *flags,
                               gm[0].data_ptr(), gm[1].data_ptr(), _ptr(gm[2]),
                               counts[0].data_ptr(), counts[1].data_ptr(), _ptr(counts[2]),
                               grad_x.data_ptr(), threads)
        conv_grads = {id(b.conv.weight): gw for b, gw in zip(branches, grad_weights)}
        param_grads = [conv_grads.get(id(p), d_wanted.get(id(p))) for p in _function_params(module)]
        return (grad_x, None, None, *param_grads)


def _function_params(module) -> list[torch.Tensor]:
    """The parameters passed to :class:`_TripletFunction`, in order: conv weights, BN affine."""
    branches = module._branches()
    return [b.conv.weight for b in branches] + [p for b in branches for p in (b.bn.weight, b.bn.bias)
                                                if p is not None]


class TripletAttention(nn.Module):
    """Triplet Attention with broadcast gates; ``record=True`` keeps the last sigmoid maps.

    Same parameters, buffers and results as :class:`TripletAttentionReference`. On float32 CPU
    tensors the pooling, the three 2->1 channel convolutions and the gating are C kernels (a
    custom autograd Function in training, one fused kernel in inference); elsewhere the same
    broadcast-gate formulation runs as PyTorch ops.
    """

    def __init__(self, kernel_size: int = 7, no_spatial: bool = False) -> None:
        super().__init__()
        check_kernel_size(kernel_size)
        self.kernel_size = kernel_size
        self.no_spatial = no_spatial
        self.channel_width = AttentionGate(kernel_size)
        self.height_channel = AttentionGate(kernel_size)
        self.spatial = None if no_spatial else AttentionGate(kernel_size)
        self.record = False
        self.recorded: dict[str, torch.Tensor] = {}

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
        weight = 1.0 / len(gates)
        g = list(gates.values())
        # Scale the small gates, not the full-size product.
        scale = g[0] * weight + g[1] * weight
        if len(g) == 3:
            scale = scale + g[2] * weight
        return x * scale

    def _apply(self, *args, **kwargs):
        _bump_generation()  # tensors may be replaced without registration (buffers in .to(), ...)
        try:
            result = super()._apply(*args, **kwargs)
            # model.to(memory_format=torch.channels_last) converts the (1, 2, k, k) conv weights too;
            # the C kernels read them contiguous (and gain nothing from NHWC weights): keep them so
            for gate in self._branches():
                weight = gate.conv.weight
                if weight.dim() == 4 and not weight.is_contiguous():
                    weight.data = weight.data.contiguous()
            return result
        finally:
            _bump_generation()

    @staticmethod
    def _build_inference_arguments(module, lanes):
        """(tensors read, (weight pointers, BN parameter pointers, eps, weight-transposed mask) or None
        where the parameters do not suit the fused inference kernel, the attributes that value depends on)."""
        tensors, eps, attributes, mask = [], set(), [], 0
        for i, (name, transposed) in enumerate(lanes):
            gate = module._modules.get(name)  # no_spatial: `spatial` is None, not a submodule
            if gate is None:
                continue
            bn = gate._modules["bn"]
            attributes.append((bn, "eps"))
            params, buffers = bn._parameters, bn._buffers
            tensors += (gate._modules["conv"]._parameters["weight"], params.get("weight"), params.get("bias"),
                        buffers.get("running_mean"), buffers.get("running_var"))
            eps.add(bn.eps)
            mask |= int(transposed) << i
        arguments = None
        if len(eps) == 1 and all(t is not None and t.dtype == torch.float32 and t.is_cpu and t.is_contiguous()
                                 for t in tensors):
            weights = [t.data_ptr() for t in tensors[0::5]]
            bn_pointers = [t.data_ptr() for i, t in enumerate(tensors) if i % 5]
            arguments = (weights + [None] * (3 - len(weights)),
                         (ctypes.c_void_p * 12)(*bn_pointers, *[None] * (12 - len(bn_pointers))), eps.pop(), mask)
        return tensors, arguments, attributes

    def _inference_arguments(self, lanes):
        """Cached :meth:`_build_inference_arguments` (module lookups cost more than the kernel on
        small maps, the more so in a network run, where they meet cold caches)."""
        cache = _INFERENCE_CACHES[lanes]
        return cache.get(self, lambda module: self._build_inference_arguments(module, lanes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            check_feature_map(x, "TripletAttention")
        lib = _native.get() if x.is_cpu and x.dtype == torch.float32 and x.numel() and not exporting() else None
        if lib is None:
            return self._forward_torch(x)
        if x.is_contiguous():
            return self._forward_native(x, lib, _NCHW_LANES)
        if _is_channels_last(x):
            if self.spatial is not None:  # NHWC memory read in place (see _NHWC_LANES)
                return self._forward_native(x.permute(0, 2, 3, 1), lib, _NHWC_LANES).permute(0, 3, 1, 2)
            # without the spatial branch the rotation has no slot for x's channel-width branch:
            # convert to NCHW and back (two copies, still far cheaper than the ops path)
            return self._forward_native(x.contiguous(), lib, _NCHW_LANES).contiguous(
                memory_format=torch.channels_last)
        return self._forward_torch(x)

    def _forward_native(self, x: torch.Tensor, lib, lanes) -> torch.Tensor:
        """The C kernels on a contiguous x whose branches are ``lanes``."""
        if not (self.training or self.record or torch.is_grad_enabled() and (
                x.requires_grad or any(p.requires_grad for p in self.parameters()))):
            arguments = self._inference_arguments(lanes)
            if arguments is not None:  # inference: one fused kernel
                weights, pointers, eps, mask = arguments
                batch, channels, height, width = x.shape
                out = torch.empty_like(x)
                lib.ta_eval(x.data_ptr(), batch, channels, height, width, self.kernel_size, *weights, pointers,
                            eps, *_stored_transposed(channels, height, width), mask, out.data_ptr(),
                            torch.get_num_threads())
                return out
        params = _function_params(self)
        if all(p.dtype == torch.float32 and p.is_cpu for p in params):
            # without the spatial branch its lane is left out (NHWC lanes always have all three)
            return _TripletFunction.apply(x, self, lanes if self.spatial is not None else lanes[:2], *params)
        return self._forward_torch(x) if lanes is _NCHW_LANES else self._forward_torch(
            x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


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


# name -> factory(kernel_size=..., **kwargs) -> module
_ATTENTIONS: dict[str, Callable[..., nn.Module]] = {
    "triplet": TripletAttention,
    "triplet_reference": TripletAttentionReference,
}


def attention_names() -> tuple[str, ...]:
    return tuple(_ATTENTIONS)


def register_attention(name: str, factory: Callable[..., nn.Module]) -> None:
    _ATTENTIONS[name] = factory


def create_attention(name: str, **kwargs) -> nn.Module:
    if name not in _ATTENTIONS:
        raise ValueError(f"attention: got {name!r}; allowed values are {(None,) + attention_names()}")
    return _ATTENTIONS[name](**kwargs)


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

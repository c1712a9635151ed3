/* Triplet Attention kernels, float32, contiguous (B, C, H, W) input.
 *
 * Planes. Each branch has a natural pooled layout and an official plane:
 *   channel-width  natural (C, W) [max/mean over H], official (C, W)
 *   height-channel natural (C, H) [over W],          official (H, C)
 *   spatial        natural (H, W) [over C],          official (H, W)
 * A plane is stored (R rows, Q cols) as its official orientation or the transpose (flag t, chosen by
 * the caller: the fewer tile positions, else no transposing); `tr` says whether the stored plane
 * is the transpose of the natural layout (cw: t, hc: !t, s: t).
 * Pooled maps: stored planes (2, R, Q) per sample (max, mean). The convolutions copy a sample's maps
 * into a zero-padded (2, R+k-1, Q+k-1) buffer followed by SLACK zero floats (the vector tiles read past
 * a row's end): the batch's maps, kept for backward, are not padded.
 * Convolution weights are given in the official orientation (2, k, k).
 * Every buffer whose size depends on the input or k is on the heap (a stack array sized by k or a plane
 * overflowed the stack from k ~ 600), allocated once per call before the threads start (one slice per
 * thread): the exported functions return 0, or 1 where an allocation failed. Empty inputs never reach
 * them (the operators return early).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>

typedef int64_t i64;

/* nthreads work buffers of n floats each (64-byte aligned slices: no cache line shared between threads);
 * NULL when they cannot be allocated. Thread t's slice: buf + t * *stride, zeroed by thread t where needed
 * (in parallel, and first touched by the thread that uses it). */
static float* thread_buffers(i64 n, int nthreads, i64* stride) {
    *stride = (n + 15) / 16 * 16;
    const size_t bytes = (size_t)(*stride * nthreads) * sizeof(float);
    return aligned_alloc(64, bytes ? bytes : 64);
}

/* columns per register tile: one vector register, 16 floats with AVX-512 (32 registers), 8 otherwise (AVX2's
 * 16 registers hold 8). 16-float tiles on an AVX2 CPU took two registers a row and spilled: the kernels took
 * 3-4x as long */
#if defined(__AVX512F__)
#define TQ 16
#else
#define TQ 8
#endif
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


#include "vexpf.h"

typedef float vtile __attribute__((vector_size(TQ * sizeof(float))));  /* a register tile's row */
/* a statement expression, not a function: GCC warns at every call (-Wpsabi) when a vector wider than the
 * enabled vector registers is returned by value, although every call is inlined */
#define LOAD_TILE(p) ({ vtile tile_; memcpy(&tile_, (p), sizeof tile_); tile_; })

/* rows reduced 8 floats at a time, the 8 partials then as a tree (a loop's own reduction adds its lanes
 * one after another: a chain of dependent additions per row) */
typedef float v8 __attribute__((vector_size(8 * sizeof(float))));
typedef int32_t v8i __attribute__((vector_size(8 * sizeof(int32_t))));
INLINE v8 load8(const float* p) { v8 v; memcpy(&v, p, sizeof v); return v; }
INLINE void store8(float* p, v8 v) { memcpy(p, &v, sizeof v); }
INLINE v8 max8(v8 a, v8 b) { const v8i m = a > b; return (v8)(((v8i)a & m) | ((v8i)b & ~m)); }
INLINE float sum8(v8 v) {
    v = v + __builtin_shuffle(v, (v8i){4, 5, 6, 7, 0, 1, 2, 3});
    v = v + __builtin_shuffle(v, (v8i){2, 3, 0, 1, 6, 7, 4, 5});
    return v[0] + v[1];
}
INLINE float fold_max8(v8 v) {
    v = max8(v, __builtin_shuffle(v, (v8i){4, 5, 6, 7, 0, 1, 2, 3}));
    v = max8(v, __builtin_shuffle(v, (v8i){2, 3, 0, 1, 6, 7, 4, 5}));
    return v[0] > v[1] ? v[0] : v[1];
}

/* natural (A x N) <-> stored plane with row stride ld, first element at off */
static void gather(const float* src, i64 off, i64 ld, int tr, i64 A, i64 N, float* dst) {
    if (tr) { for (i64 a = 0; a < A; a++) for (i64 n = 0; n < N; n++) dst[a * N + n] = src[off + n * ld + a]; }
    else { for (i64 a = 0; a < A; a++) for (i64 n = 0; n < N; n++) dst[a * N + n] = src[off + a * ld + n]; }
}
/* a stored plane (rows of ld = N floats) as its natural layout: in place unless transposed (then gathered into dst) */
static const float* as_natural(const float* src, i64 off, i64 ld, int tr, i64 A, i64 N, float* dst) {
    if (!tr && ld == N) return src + off;
    gather(src, off, ld, tr, A, N, dst);
    return dst;
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
        } else if (W % 8 == 0) {
            for (i64 w = 0; w < W; w++) { cm[w] = xc[w]; cs[w] = 0.f; }
            for (i64 h = 0; h < H; h++) {
                const float* row = xc + h * W;
                v8 rm = load8(row), rs = (v8){0};
                for (i64 w = 0; w < W; w += 8) {
                    const v8 v = load8(row + w);
                    rm = max8(rm, v);
                    rs += v;
                    store8(cm + w, max8(load8(cm + w), v));
                    store8(cs + w, load8(cs + w) + v);
                }
                hcm[c * H + h] = fold_max8(rm);
                hcs[c * H + h] = sum8(rs);
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
 * in: CI zero-padded planes (plane stride psi, row stride ldi), data rows K/2 .. K/2 + R - 1. A tile is
 * RT output rows x TQ columns: for each input channel and kernel column j, the K weights of that column
 * are held in registers and each input row of the tile's window is loaded once for every output row it
 * reaches (a load per K multiply-adds instead of one per multiply-add). With FULL (RT == R, small planes)
 * the padding rows are not visited at all; otherwise rows past the padded plane are clamped to its last
 * row (their outputs are discarded). Columns are read up to TQ - 1 past Q + K - 1 (finite values
 * required: the caller's slack). Every loop over a constant bound is unrolled, so the accumulators
 * stay in registers (the results are copied out, never addressed). CO, K and RT are constants at every call
 * (K = 3, 5, 7: other sizes go to corr_any), so its arrays have a fixed size. */
INLINE void corr_impl(const float* in, i64 psi, i64 ldi, const int CI, const int CO, const int K, const int RT,
                      const int FULL, const float* wt, float* out, i64 pso, i64 ldo, i64 R, i64 Q) {
    const i64 last = R + K - 2;  /* the last row of the padded plane */
    for (i64 r0 = 0; r0 < R; r0 += RT)
        for (i64 q0 = 0; q0 < Q; q0 += TQ) {
            vtile acc[CO][RT];
#pragma GCC unroll 2
            for (int co = 0; co < CO; co++)
#pragma GCC unroll 16
                for (int rb = 0; rb < RT; rb++) acc[co][rb] = (vtile){0};
            for (int ci = 0; ci < CI; ci++)
                for (int j = 0; j < K; j++) {
                    float w[CO][K];
#pragma GCC unroll 2
                    for (int co = 0; co < CO; co++)
#pragma GCC unroll 16
                        for (int i = 0; i < K; i++) w[co][i] = wt[((co * CI + ci) * K + i) * K + j];
                    const float* col = in + ci * psi + q0 + j;
#pragma GCC unroll 32
                    for (int u = 0; u < RT + K - 1; u++) {
                        if (FULL && (u < K / 2 || u >= K / 2 + RT)) continue;  /* zero padding */
                        i64 row = r0 + u;
                        row = row < last ? row : last;
                        const vtile v = LOAD_TILE(col + row * ldi);
#pragma GCC unroll 16
                        for (int rb = 0; rb < RT; rb++) {
                            const int i = u - rb;
                            if (i >= 0 && i < K)
#pragma GCC unroll 2
                                for (int co = 0; co < CO; co++) acc[co][rb] += w[co][i] * v;
                        }
                    }
                }
            const i64 nr = R - r0 < RT ? R - r0 : RT, nq = Q - q0 < TQ ? Q - q0 : TQ;
            for (int co = 0; co < CO; co++)
                for (i64 rb = 0; rb < nr; rb++) {
                    float* o = out + co * pso + (r0 + rb) * ldo + q0;
                    const vtile t = acc[co][rb];
                    if (nq == TQ) memcpy(o, &t, sizeof t);
                    else for (i64 q = 0; q < nq; q++) o[q] = t[q];
                }
        }
}
/* tiles: whole planes of 4 or 8 rows (no padding rows visited), else 8 rows. With AVX-512, two output
 * channels in 4-row tiles; otherwise (AVX2: 16 registers) the K weights of a column, 8 accumulators and the
 * loaded row fill the registers, so two output channels are two passes over the input (measured on AVX2: a
 * 2-row tile of both was slower) */
#if defined(__AVX512F__)
#define CORR_ROWS(CO) ((CO) == 1 ? 8 : 4)
#define CORR_CHANNELS_APART 0
#else
#define CORR_ROWS(CO) 8
#define CORR_CHANNELS_APART 1
#endif
#define CORR_FULL(CI, CO, KK) \
    if (R == 4) corr_impl(in, psi, ldi, CI, CO, KK, 4, 1, wt, out, pso, ldo, R, Q); \
    else if (R == 8) corr_impl(in, psi, ldi, CI, CO, KK, 8, 1, wt, out, pso, ldo, R, Q); \
    else corr_impl(in, psi, ldi, CI, CO, KK, CORR_ROWS(CO), 0, wt, out, pso, ldo, R, Q);
/* any other K: one output row per tile, the weights read where they are (corr_impl holds a column's K
 * weights in an array sized by K); the same products in the same order as corr_impl with RT = 1 */
static void corr_any(const float* in, i64 psi, i64 ldi, int CI, int CO, i64 K, const float* wt, float* out,
                     i64 pso, i64 ldo, i64 R, i64 Q) {
    for (i64 r = 0; r < R; r++)
        for (i64 q0 = 0; q0 < Q; q0 += TQ) {
            vtile acc[2] = {{0}, {0}};  /* CO <= 2 */
            for (int ci = 0; ci < CI; ci++)
                for (i64 j = 0; j < K; j++) {
                    const float* col = in + ci * psi + q0 + j;
                    for (i64 i = 0; i < K; i++) {
                        const vtile v = LOAD_TILE(col + (r + i) * ldi);
                        for (int co = 0; co < CO; co++) acc[co] += wt[((co * CI + ci) * K + i) * K + j] * v;
                    }
                }
            const i64 nq = Q - q0 < TQ ? Q - q0 : TQ;
            for (int co = 0; co < CO; co++) {
                float* o = out + co * pso + r * ldo + q0;
                const vtile t = acc[co];
                if (nq == TQ) memcpy(o, &t, sizeof t);
                else for (i64 q = 0; q < nq; q++) o[q] = t[q];
            }
        }
}
#define CORR_K(CI, CO) \
    switch (K) { \
        case 3: CORR_FULL(CI, CO, 3) break; \
        case 5: CORR_FULL(CI, CO, 5) break; \
        case 7: CORR_FULL(CI, CO, 7) break; \
        default: corr_any(in, psi, ldi, CI, CO, K, wt, out, pso, ldo, R, Q); \
    }
static void corr21(const float* in, i64 psi, i64 ldi, int K, const float* wt, float* out, i64 pso, i64 ldo, i64 R, i64 Q) { CORR_K(2, 1) }
#if CORR_CHANNELS_APART
static void corr11(const float* in, i64 psi, i64 ldi, int K, const float* wt, float* out, i64 pso, i64 ldo, i64 R, i64 Q) { CORR_K(1, 1) }
static void corr12(const float* in, i64 psi, i64 ldi, int K, const float* wt, float* out, i64 pso, i64 ldo, i64 R, i64 Q) {
    corr11(in, psi, ldi, K, wt, out, pso, ldo, R, Q);
    corr11(in, psi, ldi, K, wt + K * K, out + pso, pso, ldo, R, Q);
}
#else
static void corr12(const float* in, i64 psi, i64 ldi, int K, const float* wt, float* out, i64 pso, i64 ldo, i64 R, i64 Q) { CORR_K(1, 2) }
#endif

/* ---- weight gradient of one sample, as vectors (summed once at the end):
 * gv[c][i][j] += sum_{y, x'} G[y][x' - j] * P[c][y + i][x'] (x' = x + j), whose lane sum is
 * gw[c][i][j] = sum_{y, x} g[y][x] * P[c][y + i][x + j].
 * G: the gradient rows at column K - 1 of rows of ldg floats, zeros around (so x' runs over whole tiles);
 * P: padded stored map (row stride ldi, finite values up to TQ past its end). P's vectors are read
 * unshifted and G's shifted: per gradient row and column tile the K shifted G vectors are loaded once
 * for a block of IB kernel rows (IB * K multiply-adds per P vector, instead of one load per multiply-add). */
#if defined(__AVX512F__)
#define GRADW_ROWS 3   /* IB * K accumulators + K shifted vectors within 32 registers for K <= 7 */
#else
#define GRADW_ROWS 1
#endif
/* gradw_impl keeps 4 arrays of K vectors on the stack: used up to this K (8 KB with AVX-512), gradw_rows above */
#define GRADW_MAX_K 31
INLINE void gradw_impl(const float* P, i64 psi, i64 ldi, const float* G, i64 ldg, i64 R, i64 Qp, const int K,
                       const int IB, vtile* gv) {
    const int p = K / 2;
    for (int c = 0; c < 2; c++)
#pragma GCC unroll 8
        for (int i0 = 0; i0 < K; i0 += IB) {
            /* one accumulator array per kernel row (small arrays stay in registers) */
            vtile a0[K], a1[K], a2[K];
            const int n = K - i0 < IB ? K - i0 : IB;  /* kernel rows in this block (<= 3) */
#pragma GCC unroll 16
            for (int j = 0; j < K; j++) a0[j] = a1[j] = a2[j] = (vtile){0};
            /* gradient rows y for which some P row y + i of the block is a data row */
            const i64 ylo = p - (i0 + n - 1) > 0 ? p - (i0 + n - 1) : 0, yhi = p + R - i0 < R ? p + R - i0 : R;
            for (i64 y = ylo; y < yhi; y++) {
                const float* grow = G + y * ldg + (K - 1);
                const float* prow = P + c * psi + (y + i0) * ldi;
                for (i64 x0 = 0; x0 < Qp; x0 += TQ) {
                    vtile gs[K];
#pragma GCC unroll 16
                    for (int j = 0; j < K; j++) gs[j] = LOAD_TILE(grow + x0 - j);
                    const vtile p0 = LOAD_TILE(prow + x0);
#pragma GCC unroll 16
                    for (int j = 0; j < K; j++) a0[j] += gs[j] * p0;
                    if (n > 1) {
                        const vtile p1 = LOAD_TILE(prow + ldi + x0);
#pragma GCC unroll 16
                        for (int j = 0; j < K; j++) a1[j] += gs[j] * p1;
                    }
                    if (n > 2) {
                        const vtile p2 = LOAD_TILE(prow + 2 * ldi + x0);
#pragma GCC unroll 16
                        for (int j = 0; j < K; j++) a2[j] += gs[j] * p2;
                    }
                }
            }
#pragma GCC unroll 16
            for (int j = 0; j < K; j++) {
                gv[(c * K + i0) * K + j] += a0[j];
                if (n > 1) gv[(c * K + i0 + 1) * K + j] += a1[j];
                if (n > 2) gv[(c * K + i0 + 2) * K + j] += a2[j];
            }
        }
}
static void gradw(const float* P, i64 psi, i64 ldi, const float* G, i64 ldg, i64 R, i64 Qp, int K, vtile* gv) {
    switch (K) {
        case 3: gradw_impl(P, psi, ldi, G, ldg, R, Qp, 3, GRADW_ROWS, gv); break;
        case 5: gradw_impl(P, psi, ldi, G, ldg, R, Qp, 5, GRADW_ROWS, gv); break;
        case 7: gradw_impl(P, psi, ldi, G, ldg, R, Qp, 7, GRADW_ROWS, gv); break;
        default: gradw_impl(P, psi, ldi, G, ldg, R, Qp, K, 1, gv);  /* (ta_conv_backward: K <= GRADW_MAX_K) */
    }
}

/* ---- weight gradient of one sample, P's vectors shifted: gw[c][i][j] += sum_{y, x} g[y][x] * P[c][y + i][x + j]
 * (lane sums added to gw[c][i][j]); g: rows of QT floats (a multiple of TQ), zeros after Q. One load per
 * multiply-add, but over Q columns rather than Q + K - 1: cheaper where that saves a column tile. */
INLINE void gradw_rows_impl(const float* P, i64 psi, i64 ldi, const float* g, i64 ldg, i64 QT, i64 R, const int K,
                            float* gw) {
    const i64 p = K / 2;  /* rows of P outside p .. p+R-1 are zero padding */
    for (int i = 0; i < K; i++) {  /* both channels at once: each gradient vector loaded once for 2K products */
        float acc[2][K][TQ];
        for (int c = 0; c < 2; c++)
            for (int j = 0; j < K; j++)
                for (int q = 0; q < TQ; q++) acc[c][j][q] = 0.f;
        const i64 ylo = p - i > 0 ? p - i : 0, yhi = p + R - i < R ? p + R - i : R;
        for (i64 y = ylo; y < yhi; y++) {
            const float* p0 = P + (y + i) * ldi;
            const float* p1 = p0 + psi;
            const float* grow = g + y * ldg;
            for (i64 q0 = 0; q0 < QT; q0 += TQ) {
                const float* gg = grow + q0;
                for (int j = 0; j < K; j++) {
                    const float* a = p0 + q0 + j;
                    const float* b = p1 + q0 + j;
#pragma omp simd
                    for (int q = 0; q < TQ; q++) {
                        acc[0][j][q] += gg[q] * a[q];
                        acc[1][j][q] += gg[q] * b[q];
                    }
                }
            }
        }
        for (int c = 0; c < 2; c++)
            for (int j = 0; j < K; j++) {
                float s = 0.f;
                for (int q = 0; q < TQ; q++) s += acc[c][j][q];
                gw[(c * K + i) * K + j] += s;
            }
    }
}
static void gradw_rows(const float* P, i64 psi, i64 ldi, const float* g, i64 ldg, i64 QT, i64 R, int K, float* gw) {
    switch (K) {
        case 3: gradw_rows_impl(P, psi, ldi, g, ldg, QT, R, 3, gw); break;
        case 5: gradw_rows_impl(P, psi, ldi, g, ldg, QT, R, 5, gw); break;
        case 7: gradw_rows_impl(P, psi, ldi, g, ldg, QT, R, 7, gw); break;
        default: {  /* larger kernels: one tap at a time */
            for (i64 c = 0; c < 2; c++)
                for (i64 i = 0; i < K; i++)
                    for (i64 j = 0; j < K; j++) {
                        float acc[TQ];
                        for (int q = 0; q < TQ; q++) acc[q] = 0.f;
                        for (i64 y = 0; y < R; y++)
                            for (i64 q0 = 0; q0 < QT; q0 += TQ) {
                                const float* pp = P + c * psi + (y + i) * ldi + q0 + j;
                                const float* gg = g + y * ldg + q0;
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

/* one sample's stored maps (2, R, Q) into the interior of a zero-padded (2, R+k-1, Q+k-1) buffer */
static void pad_maps(const float* maps, i64 R, i64 Q, i64 k, float* padded) {
    const i64 p = k / 2, Rp = R + k - 1, Qp = Q + k - 1;
    for (i64 c = 0; c < 2; c++)
        for (i64 r = 0; r < R; r++)
            memcpy(padded + c * Rp * Qp + (r + p) * Qp + p, maps + (c * R + r) * Q, sizeof(float) * Q);
}

/* ---------------- training forward ---------------- */

/* pooled maps of all branches (B, 2, R, Q) each; ms NULL without spatial */
int ta_pool(const float* x, i64 B, i64 C, i64 H, i64 W,
            float* mcw, int tcw, float* mhc, int thc, float* ms, int ts, int nthreads) {
    const int spatial = ms != NULL;
    i64 A[3], N[3], R[3], Q[3]; int tr[3];
    dims(C, H, W, 0, tcw, &A[0], &N[0], &tr[0], &R[0], &Q[0]);
    dims(C, H, W, 1, thc, &A[1], &N[1], &tr[1], &R[1], &Q[1]);
    dims(C, H, W, 2, ts, &A[2], &N[2], &tr[2], &R[2], &Q[2]);
    i64 stride;
    float* all = thread_buffers(2 * (C * W + C * H + H * W), nthreads, &stride);
    if (!all) return 1;
#pragma omp parallel num_threads(nthreads)
    {
        float* buf = all + omp_get_thread_num() * stride;
        float *cwm = buf, *cws = cwm + C * W, *hcm = cws + C * W, *hcs = hcm + C * H, *sm = hcs + C * H, *ss = sm + H * W;
#pragma omp for schedule(static)
        for (i64 b = 0; b < B; b++) {
            pool_sample(x + b * C * H * W, C, H, W, spatial, cwm, cws, hcm, hcs, sm, ss);
            store_map(cwm, cws, A[0], N[0], (float)H, tr[0], 0, mcw + b * 2 * R[0] * Q[0]);
            store_map(hcm, hcs, A[1], N[1], (float)W, tr[1], 0, mhc + b * 2 * R[1] * Q[1]);
            if (spatial)
                store_map(sm, ss, A[2], N[2], (float)C, tr[2], 0, ms + b * 2 * R[2] * Q[2]);
        }
    }
    free(all);
    return 0;
}

/* conv outputs of one branch: maps (B, 2, R, Q) -> z (B, R, Q) */
int ta_conv(const float* maps, i64 B, i64 R, i64 Q, i64 k, const float* w, int t, float* z, int nthreads) {
    const i64 Rp = R + k - 1, Qp = Q + k - 1;
    i64 stride;
    float* wl = malloc(sizeof(float) * 2 * k * k);
    float* all = thread_buffers(2 * Rp * Qp + SLACK, nthreads, &stride);
    if (!wl || !all) {
        free(wl);
        free(all);
        return 1;
    }
    local_weight(w, k, t, wl);
#pragma omp parallel num_threads(nthreads)
    {
        float* padded = all + omp_get_thread_num() * stride;
        memset(padded, 0, sizeof(float) * (2 * Rp * Qp + SLACK));  /* borders and slack stay zero */
#pragma omp for schedule(static)
        for (i64 b = 0; b < B; b++) {
            pad_maps(maps + b * 2 * R * Q, R, Q, k, padded);
            corr21(padded, Rp * Qp, Qp, (int)k, wl, z + b * R * Q, R * Q, Q, R, Q);
        }
    }
    free(wl);
    free(all);
    return 0;
}

/* out = x * (g_cw + g_hc [+ g_s]) * weight; gates: stored planes (B, R, Q); gs NULL without spatial */
int ta_combine(const float* x, i64 B, i64 C, i64 H, i64 W, const float* gcw, int tcw, const float* ghc, int thc,
               const float* gs, int ts, float* out, int nthreads) {
    const int spatial = gs != NULL;
    const float weight = spatial ? 1.f / 3.f : 0.5f;
    i64 stride;
    float* all = thread_buffers(C * W + C * H + H * W, nthreads, &stride);
    if (!all) return 1;
#pragma omp parallel num_threads(nthreads)
    {
        float* buf = all + omp_get_thread_num() * stride;
        float *cw = buf, *hc = cw + C * W, *s = hc + C * H;
#pragma omp for schedule(static)
        for (i64 b = 0; b < B; b++) {
            const float* gate_cw = as_natural(gcw, b * C * W, tcw ? C : W, tcw, C, W, cw);
            const float* gate_hc = as_natural(ghc, b * C * H, thc ? H : C, !thc, C, H, hc);
            const float* gate_s = s;
            if (spatial) gate_s = as_natural(gs, b * H * W, ts ? H : W, ts, H, W, s);
            else for (i64 i = 0; i < H * W; i++) s[i] = 0.f;
            gate_sample(x + b * C * H * W, C, H, W, gate_cw, gate_hc, gate_s, weight, out + b * C * H * W);
        }
    }
    free(all);
    return 0;
}

/* ---------------- inference: one sample at a time, while it is in cache ---------------- */

/* bn: per branch (weight, bias, running mean, running var); ws NULL without spatial; bit br of wt:
 * branch br's weight is given transposed (the layout trick for channels_last input, see Python) */
int ta_eval(const float* x, i64 B, i64 C, i64 H, i64 W, i64 k, const float* wcw, const float* whc, const float* ws,
            const float* const* bn, double eps, int tcw, int thc, int ts, int wt, float* out, int nthreads) {
    const int spatial = ws != NULL;
    const int nb = spatial ? 3 : 2;
    const i64 p = k / 2;
    const int tf[3] = {tcw, thc, ts};
    const float* wsrc[3] = {wcw, whc, ws};
    i64 A[3], N[3], R[3], Q[3], moff[3], goff[3]; int tr[3];
    float scale[3], shift[3];
    float* wl = malloc(sizeof(float) * 3 * 2 * k * k);  /* branch br's weights at wl + br * 2 k k */
    if (!wl) return 1;
    i64 mapsize = 0, gatesize = 0;
    for (int br = 0; br < nb; br++) {
        dims(C, H, W, br, tf[br], &A[br], &N[br], &tr[br], &R[br], &Q[br]);
        local_weight(wsrc[br], k, tf[br] ^ ((wt >> br) & 1), wl + br * 2 * k * k);
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
    i64 stride;
    const i64 per_thread = pooled + mapsize + SLACK + gatesize + natural;
    float* all = thread_buffers(per_thread, nthreads, &stride);
    if (!all) {
        free(wl);
        return 1;
    }
#pragma omp parallel num_threads(nthreads)
    {
        float* buf = all + omp_get_thread_num() * stride;
        memset(buf, 0, sizeof(float) * per_thread);
        float *cwm = buf, *cws = cwm + C * W, *hcm = cws + C * W, *hcs = hcm + C * H, *sm = hcs + C * H, *ss = sm + H * W;
        float* maps = buf + pooled;  /* borders and slack stay zero */
        float* gates = maps + mapsize + SLACK;
        float *ncw = gates + gatesize, *nhc = ncw + C * W, *ns = nhc + C * H;
        const float* mx[3] = {cwm, hcm, sm};
        const float* su[3] = {cws, hcs, ss};
        const float nn[3] = {(float)H, (float)W, (float)C};
        float* nat[3] = {ncw, nhc, ns};
        const float* gate[3] = {ncw, nhc, ns};
#pragma omp for schedule(static)
        for (i64 b = 0; b < B; b++) {
            const float* xb = x + b * C * H * W;
            pool_sample(xb, C, H, W, spatial, cwm, cws, hcm, hcs, sm, ss);
            for (int br = 0; br < nb; br++) {
                const i64 Rp = R[br] + 2 * p, Qp = Q[br] + 2 * p, n = R[br] * Q[br];
                float* m = maps + moff[br];
                float* g = gates + goff[br];
                store_map(mx[br], su[br], A[br], N[br], nn[br], tr[br], p, m);
                corr21(m, Rp * Qp, Qp, (int)k, wl + br * 2 * k * k, g, n, Q[br], R[br], Q[br]);
                const float a = scale[br], c = shift[br];
#pragma omp simd
                for (i64 i = 0; i < n; i++) g[i] = 1.f / (1.f + vexpf(-(g[i] * a + c)));
                gate[br] = as_natural(g, 0, Q[br], tr[br], A[br], N[br], nat[br]);
            }
            if (!spatial) for (i64 i = 0; i < H * W; i++) ns[i] = 0.f;
            gate_sample(xb, C, H, W, gate[0], gate[1], gate[2], weight, out + b * C * H * W);
        }
    }
    free(all);
    free(wl);
    return 0;
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
    float* unused = hit + H * W;  /* row_reduce's maxima, not needed (H floats) */
    for (i64 c = 0; c < C; c++) {
        const float* xc = xb + c * H * W;
        const float* gc = gb + c * H * W;
        const float* mc = xcw + c * W;
        float* a = gcw + c * W;
        float* nc = n_cw + c * W;
        if (W % 8 == 0) {  /* rows of 8k floats (channels_last: the channels): 8 at a time, then a tree */
            const v8 one = {1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f};
            for (i64 h = 0; h < H; h++) {
                const float* xr = xc + h * W;
                const float* gr = gc + h * W;
                float* pr = prod + h * W;
                const float mh = xhc[c * H + h];
                v8 acc = {0}, cnt = {0};
                for (i64 w = 0; w < W; w += 8) {
                    const v8 v = load8(xr + w), t = load8(gr + w) * v;
                    store8(pr + w, t);
                    acc += t;
                    store8(a + w, load8(a + w) + t);
                    cnt += (v8)((v8i)one & (v == mh));
                    store8(nc + w, load8(nc + w) + (v8)((v8i)one & (v == load8(mc + w))));
                }
                ghc[c * H + h] = sum8(acc);
                n_hc[c * H + h] = sum8(cnt);
            }
        } else if (W < 16) {  /* narrow rows: products first, row sums four rows at a time */
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

int ta_backward_reduce(const float* x, const float* go, i64 B, i64 C, i64 H, i64 W,
                       const float* mcw, int tcw, const float* mhc, int thc, const float* ms, int ts,
                       float* dcw, float* dhc, float* ds, float* ncw, float* nhc, float* ns, int nthreads) {
    const int spatial = ms != NULL;
    const float weight = spatial ? 1.f / 3.f : 0.5f;
    i64 A[3], N[3], R[3], Q[3]; int tr[3];
    dims(C, H, W, 0, tcw, &A[0], &N[0], &tr[0], &R[0], &Q[0]);
    dims(C, H, W, 1, thc, &A[1], &N[1], &tr[1], &R[1], &Q[1]);
    dims(C, H, W, 2, ts, &A[2], &N[2], &tr[2], &R[2], &Q[2]);
    i64 stride;  /* per thread: the gate gradients and max maps of a sample, then reduce_impl's 2 H W + H */
    float* all = thread_buffers(2 * (C * W + C * H + H * W) + 3 * H * W + H, nthreads, &stride);
    if (!all) return 1;
#pragma omp parallel num_threads(nthreads)
    {
        float* buf = all + omp_get_thread_num() * stride;
        float *gcw = buf, *ghc = gcw + C * W, *gsp = ghc + C * H, *xcw = gsp + H * W, *xhc = xcw + C * W, *xs = xhc + C * H;
        float* nsd = xs + H * W;  /* dummy counts without spatial */
        float* tmp = nsd + H * W;
#pragma omp for schedule(static)
        for (i64 b = 0; b < B; b++) {
            /* the max maps */
            const float* mx_cw = as_natural(mcw, b * 2 * R[0] * Q[0], Q[0], tr[0], A[0], N[0], xcw);
            const float* mx_hc = as_natural(mhc, b * 2 * R[1] * Q[1], Q[1], tr[1], A[1], N[1], xhc);
            const float* mx_s = spatial ? as_natural(ms, b * 2 * R[2] * Q[2], Q[2], tr[2], A[2], N[2], xs) : xs;
            float* n_s = spatial ? ns + b * H * W : nsd;
            const float* xb = x + b * C * H * W;
            const float* gb = go + b * C * H * W;
            float* n_cw = ncw + b * C * W;
            float* n_hc = nhc + b * C * H;
            #define REDUCE_CALL(HH, WW) reduce_impl(xb, gb, C, HH, WW, spatial, mx_cw, mx_hc, mx_s, gcw, ghc, gsp, n_cw, n_hc, n_s, tmp)
            HW_DISPATCH(REDUCE_CALL)
            #undef REDUCE_CALL
            scatter(gcw, A[0], N[0], weight, dcw + b * R[0] * Q[0], 0, Q[0], tr[0]);
            scatter(ghc, A[1], N[1], weight, dhc + b * R[1] * Q[1], 0, Q[1], tr[1]);
            if (spatial) scatter(gsp, A[2], N[2], weight, ds + b * R[2] * Q[2], 0, Q[2], tr[2]);
        }
    }
    free(all);
    return 0;
}

/* Gradients of one branch's convolution, from its maps (B, 2, R, Q): for the maps (stored planes (B, 2, R, Q)),
 * and for the weight, official orientation (2, k, k), summed over the batch. */
int ta_conv_backward(const float* maps, const float* gz, i64 B, i64 R, i64 Q, i64 k, const float* w, int t,
                     float* gmap, float* gw, int nthreads) {
    const i64 p = k / 2, Rp = R + k - 1, Qp = Q + k - 1, kk = 2 * k * k;
    /* the gradient of one sample, zero-padded: rows of ldg floats, data at column k - 1 of rows p .. p+R-1
     * (corr12 reads it from column k - 1 - p, gradw from column 0 of row p) */
    const i64 ldg = k - 1 + (Qp + TQ - 1) / TQ * TQ + TQ;
    /* weight gradient with G's vectors shifted (a third of a load per multiply-add) unless reading P
     * unshifted, over Q + k - 1 columns, takes one more column tile than over Q (or k is large: gradw keeps
     * arrays of k vectors on the stack) */
    const i64 QT = (Q + TQ - 1) / TQ * TQ;
    const int shift_g = (Qp + TQ - 1) / TQ * TQ == QT && k <= GRADW_MAX_K;
    i64 stride;
    float* wl = malloc(sizeof(float) * 2 * kk);  /* the weights, then flipped at wl + kk */
    vtile* partial = shift_g ? aligned_alloc(sizeof(vtile), (size_t)nthreads * kk * sizeof(vtile)) : NULL;
    float* partial_rows = shift_g ? NULL : calloc((size_t)nthreads * kk, sizeof(float));
    /* per thread: the padded gradient of a sample, then its padded maps (zero borders and slack) */
    const i64 per_thread = (Rp + 1) * ldg + SLACK + 2 * Rp * Qp + SLACK;
    float* all = thread_buffers(per_thread, nthreads, &stride);
    if (!wl || !all || (shift_g ? !partial : !partial_rows)) {
        free(wl);
        free(partial);
        free(partial_rows);
        free(all);
        return 1;
    }
    float* wf = wl + kk;
    local_weight(w, k, t, wl);
    for (i64 c = 0; c < 2; c++)  /* flipped: the gradient is a correlation with the rotated kernel */
        for (i64 i = 0; i < k; i++)
            for (i64 j = 0; j < k; j++) wf[(c * k + i) * k + j] = wl[(c * k + (k - 1 - i)) * k + (k - 1 - j)];
    if (shift_g) memset(partial, 0, (size_t)nthreads * kk * sizeof(vtile));
#pragma omp parallel num_threads(nthreads)
    {
        vtile* acc = shift_g ? partial + (i64)omp_get_thread_num() * kk : NULL;
        float* acc_rows = shift_g ? NULL : partial_rows + (i64)omp_get_thread_num() * kk;
        float* gpad = all + omp_get_thread_num() * stride;
        float* padded = gpad + (Rp + 1) * ldg + SLACK;  /* the sample's maps */
        memset(gpad, 0, sizeof(float) * per_thread);
#pragma omp for schedule(static)
        for (i64 b = 0; b < B; b++) {
            const float* g = gz + b * R * Q;
            for (i64 r = 0; r < R; r++) memcpy(gpad + (r + p) * ldg + k - 1, g + r * Q, sizeof(float) * Q);
            corr12(gpad + k - 1 - p, 0, ldg, (int)k, wf, gmap + b * 2 * R * Q, R * Q, Q, R, Q);
            pad_maps(maps + b * 2 * R * Q, R, Q, k, padded);
            if (shift_g) gradw(padded, Rp * Qp, Qp, gpad + p * ldg, ldg, R, Qp, (int)k, acc);
            else gradw_rows(padded, Rp * Qp, Qp, gpad + p * ldg + k - 1, ldg, QT, R, (int)k, acc_rows);
        }
    }
    for (i64 c = 0; c < 2; c++)
        for (i64 i = 0; i < k; i++)
            for (i64 j = 0; j < k; j++) {
                float s = 0.f;
                for (int th = 0; th < nthreads; th++) {
                    if (shift_g) for (int q = 0; q < TQ; q++) s += partial[th * kk + (c * k + i) * k + j][q];
                    else s += partial_rows[th * kk + (c * k + i) * k + j];
                }
                if (t) gw[(c * k + j) * k + i] = s; else gw[(c * k + i) * k + j] = s;
            }
    free(wl);
    free(partial);
    free(partial_rows);
    free(all);
    return 0;
}

/* Pass 2: grad x = grad * mean(gates) + the ZPool backward of every branch (the max part shared
 * equally by tied maxima, as amax does; the mean part spread evenly). */
INLINE void dx_impl(const float* xb, const float* gb, float* db, i64 C, const i64 H, const i64 W, float weight,
                    const float* const* gate, const float* const* peak, float* const* share, float* const* even) {
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

int ta_backward_dx(const float* x, const float* go, i64 B, i64 C, i64 H, i64 W,
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
    i64 stride;
    float* all = thread_buffers(4 * (C * W + C * H + H * W), nthreads, &stride);
    if (!all) return 1;
#pragma omp parallel num_threads(nthreads)
    {
        float* buf = all + omp_get_thread_num() * stride;
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
        const float* gate_in[3] = {gate[0], gate[1], gate[2]};
        const float* peak_in[3] = {peak[0], peak[1], peak[2]};
#pragma omp for schedule(static)
        for (i64 b = 0; b < B; b++) {
            for (int br = 0; br < 3; br++) {
                if (br == 2 && !spatial) {
                    for (i64 i = 0; i < sz[2]; i++) { gate[2][i] = 0.f; share[2][i] = 0.f; even[2][i] = 0.f; peak[2][i] = NAN; }
                    continue;
                }
                gate_in[br] = as_natural(gsrc[br], b * R[br] * Q[br], Q[br], tr[br], A[br], N[br], gate[br]);
                peak_in[br] = as_natural(msrc[br], b * 2 * R[br] * Q[br], Q[br], tr[br], A[br], N[br], peak[br]);
                gather(dsrc[br], b * 2 * R[br] * Q[br], Q[br], tr[br], A[br], N[br], share[br]);
                gather(dsrc[br], (b * 2 + 1) * R[br] * Q[br], Q[br], tr[br], A[br], N[br], even[br]);
                const float* cnt = nsrc[br] + b * sz[br];
                for (i64 i = 0; i < sz[br]; i++) { share[br][i] /= cnt[i]; even[br][i] /= nn[br]; }
            }
            const float* xb = x + b * C * H * W;
            const float* gb = go + b * C * H * W;
            float* db = dx + b * C * H * W;
            #define DX_CALL(HH, WW) dx_impl(xb, gb, db, C, HH, WW, weight, gate_in, peak_in, share, even)
            HW_DISPATCH(DX_CALL)
            #undef DX_CALL
        }
    }
    free(all);
    return 0;
}

#include "bn_sigmoid.h"

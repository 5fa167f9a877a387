/* CPU kernels for the vote-sized work of EM routing (see cpu_kernels.py, which compiles this
 * file with the system C compiler and calls it through ctypes).
 *
 * Every kernel reads the votes once and keeps a routing problem's working set in cache; the
 * PyTorch path needs separate passes (and a stored v²) for the same quantities. The kernels
 * cover one range of their outer loop and split it over OpenMP threads: PyTorch's own
 * OpenMP runtime (same soname, already loaded), so they share its thread pool and thread count.
 *
 * Layouts (all C-contiguous, H = 16 pose entries):
 *   poses  (B, S, 16)       child pose in slot s of block b = (image, parent position)
 *   tiled  (S, J, Q, 16)    tiled[s, j, k, h] = W[s, j, k, h % Q]: W of slot s, parent type j,
 *                           each row repeated so that a whole vote is 16-wide arithmetic
 *   votes  (B, J, S, 16)    votes v[b, j, s] = pose[b, s] @ W[s, j] (+ offset[s])
 *   shift  (B, J, 16)       c[b, j] = mean over s of v[b, j, s]; every routing pass works on the
 *                           centred votes v − c, formed as it reads them (bit for bit the values a
 *                           stored centred copy would hold, without the extra pass to store it)
 *   rows   (B * J)          one routing row = (block, parent type) with S slots
 *
 * A pose is (16 / Q) rows of Q: Q = 4 for matrix poses, Q = 16 for vector poses. With
 * pk[k][h] = pose[(h / Q) * Q + k], a vote is v[h] = Σ_k pk[k][h] · tiled[k][h].
 *
 * This file is compiled once per element type: it includes itself with REAL = float (suffix
 * _f32) and REAL = double (_f64).
 */
#ifndef REAL

#include <stdint.h>
#include <string.h>

#define H 16
#define SLOT_TILE 16

/* Two-input lane shuffle with constant indices (0-15 pick from a, 16-31 from b). */
#ifdef __clang__
#define SHUFFLE2(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE2(a, b, ...) __builtin_shuffle(a, b, (IVEC){__VA_ARGS__})
#endif

#define REAL float
#define IREAL int32_t
#define NAME(x) x##_f32
#include __FILE__
#undef REAL
#undef IREAL
#undef NAME

#define REAL double
#define IREAL int64_t
#define NAME(x) x##_f64
#include __FILE__
#undef REAL
#undef IREAL
#undef NAME

#else

/* 16 entries of a pose, vote or vote gradient as one vector (GCC/Clang vector extension: one
 * AVX-512 register for float, two AVX2 registers or four NEON registers otherwise). */
typedef REAL NAME(vec) __attribute__((vector_size(H * sizeof(REAL))));
typedef IREAL NAME(ivec) __attribute__((vector_size(H * sizeof(IREAL))));
#define VEC NAME(vec)
#define IVEC NAME(ivec)

static inline VEC NAME(load)(const REAL *p)
{
    VEC v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void NAME(store)(REAL *p, VEC v) { memcpy(p, &v, sizeof v); }

static inline REAL NAME(hsum)(VEC v)
{
    REAL t[H];
    memcpy(t, &v, sizeof t);
    for (int h = 0; h < 8; ++h)
        t[h] += t[h + 8];
    for (int h = 0; h < 4; ++h)
        t[h] += t[h + 4];
    return (t[0] + t[2]) + (t[1] + t[3]);
}

/* The 16 lane sums of 16 vectors, as one vector: lane i of the result is the sum of t[i].
 * A tree of pairwise half-sums (4 levels, 15 adds in all); fed in bit-reversed order, the sums
 * come out in order. */
static inline VEC NAME(hsum16)(const VEC *t)
{
    static const int rev[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
    VEC u[8], w[4], y[2];
    for (int i = 0; i < 8; ++i) {
        const VEC a = t[rev[2 * i]], b = t[rev[2 * i + 1]];
        u[i] = SHUFFLE2(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               SHUFFLE2(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    }
    for (int i = 0; i < 4; ++i) {
        const VEC a = u[2 * i], b = u[2 * i + 1];
        w[i] = SHUFFLE2(a, b, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
               SHUFFLE2(a, b, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    }
    for (int i = 0; i < 2; ++i) {
        const VEC a = w[2 * i], b = w[2 * i + 1];
        y[i] = SHUFFLE2(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
               SHUFFLE2(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    }
    return SHUFFLE2(y[0], y[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
           SHUFFLE2(y[0], y[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}

/* pk[k][h] = pose[(h / Q) * Q + k] for k < Q: the pose entries each vote entry multiplies. */
static inline __attribute__((always_inline)) void NAME(spread_pose)(const REAL *pose, VEC *pk,
                                                                    const int Q)
{
    for (int k = 0; k < Q; ++k) {
        REAL t[H];
        for (int h = 0; h < H; ++h)
            t[h] = pose[(h / Q) * Q + k];
        pk[k] = NAME(load)(t);
    }
}

#define VOTE_GROUP 8 /* blocks sharing one sweep over the slots' W (kept in L1 meanwhile) */

static inline __attribute__((always_inline)) void NAME(votes_group)(
    const REAL *poses, const REAL *tiled, const REAL *offset, int64_t S, int64_t J,
    int64_t g0, int64_t g1, const int Q, REAL *votes, REAL *shift)
{
    memset(shift + g0 * J * H, 0, sizeof(REAL) * (g1 - g0) * J * H);
    for (int64_t s = 0; s < S; ++s) {
        const REAL *ts = tiled + s * J * Q * H;
        const VEC off = offset ? NAME(load)(offset + s * H) : (VEC){0};
        for (int64_t b = g0; b < g1; ++b) {
            VEC pk[H];
            NAME(spread_pose)(poses + (b * S + s) * H, pk, Q);
            REAL *c = shift + b * J * H;
            for (int64_t j = 0; j < J; ++j) {
                VEC acc = off;
                for (int k = 0; k < Q; ++k)
                    acc += pk[k] * NAME(load)(ts + (j * Q + k) * H);
                NAME(store)(votes + ((b * J + j) * S + s) * H, acc);
                NAME(store)(c + j * H, NAME(load)(c + j * H) + acc);
            }
        }
    }
    const REAL inv = (REAL)1 / (REAL)S;
    for (int64_t i = g0 * J; i < g1 * J; ++i)
        NAME(store)(shift + i * H, NAME(load)(shift + i * H) * inv);
}

/* Votes of blocks [b0, b1) and their unweighted mean per (block, parent type).
 * offset (S, 16) may be NULL. */
void NAME(votes)(const REAL *poses, const REAL *tiled, const REAL *offset, int64_t S, int64_t J,
                 int64_t Q, int64_t b0, int64_t b1, REAL *votes, REAL *shift)
{
#pragma omp parallel for schedule(static)
    for (int64_t g0 = b0; g0 < b1; g0 += VOTE_GROUP) {
        const int64_t g1 = g0 + VOTE_GROUP < b1 ? g0 + VOTE_GROUP : b1;
        if (Q == 4)
            NAME(votes_group)(poses, tiled, offset, S, J, g0, g1, 4, votes, shift);
        else
            NAME(votes_group)(poses, tiled, offset, S, J, g0, g1, 16, votes, shift);
    }
}

/* M-step moments of rows [r0, r1) on the centred votes x = v − c:
 * sum[r] = Σ_s w[r, s] x[r, s], sumsq[r] = Σ_s w[r, s] x[r, s]². */
void NAME(moments)(const REAL *votes, const REAL *shift, const REAL *w, int64_t S, int64_t r0,
                   int64_t r1, REAL *sum, REAL *sumsq)
{
#pragma omp parallel for schedule(static)
    for (int64_t r = r0; r < r1; ++r) {
        const REAL *v = votes + r * S * H;
        const REAL *wr = w + r * S;
        const VEC c = NAME(load)(shift + r * H);
        VEC a1 = {0}, a2 = {0}, b1 = {0}, b2 = {0};
        int64_t s = 0;
        for (; s + 1 < S; s += 2) {
            const VEC x0 = NAME(load)(v + s * H) - c;
            const VEC x1 = NAME(load)(v + (s + 1) * H) - c;
            const VEC y0 = wr[s] * x0, y1 = wr[s + 1] * x1;
            a1 += y0;
            a2 += y0 * x0;
            b1 += y1;
            b2 += y1 * x1;
        }
        if (s < S) {
            const VEC x0 = NAME(load)(v + s * H) - c;
            const VEC y0 = wr[s] * x0;
            a1 += y0;
            a2 += y0 * x0;
        }
        NAME(store)(sum + r * H, a1 + b1);
        NAME(store)(sumsq + r * H, a2 + b2);
    }
}

/* out[r, s] = Σ_h x (lin[r] + sq[r] x) with x = v[r, s] − c[r], for rows [r0, r1): the E-step's
 * quadratic form (lin = −2μ/σ², sq = 1/σ²) and the moments' backward. */
void NAME(row_forms)(const REAL *votes, const REAL *shift, const REAL *lin, const REAL *sq,
                     int64_t S, int64_t r0, int64_t r1, REAL *out)
{
#pragma omp parallel for schedule(static)
    for (int64_t r = r0; r < r1; ++r) {
        const REAL *v = votes + r * S * H;
        const VEC c = NAME(load)(shift + r * H);
        const VEC l = NAME(load)(lin + r * H);
        const VEC q = NAME(load)(sq + r * H);
        REAL *o = out + r * S;
        int64_t s = 0;
        for (; s + 16 <= S; s += 16) {
            VEC t[16];
            for (int i = 0; i < 16; ++i) {
                const VEC x = NAME(load)(v + (s + i) * H) - c;
                t[i] = x * (l + q * x);
            }
            NAME(store)(o + s, NAME(hsum16)(t));
        }
        for (; s < S; ++s) {
            const VEC x = NAME(load)(v + s * H) - c;
            o[s] = NAME(hsum)(x * (l + q * x));
        }
    }
}

static inline __attribute__((always_inline)) void NAME(vote_backward_tile)(
    const REAL *poses, const REAL *tiled, const REAL *votes, const REAL *shift,
    const REAL *const *coefs, int64_t T, const REAL *vcoef, const REAL *constant, int64_t B,
    int64_t S, int64_t J, int64_t s0, int64_t s1, const int Q, REAL *grad_poses,
    REAL *grad_tiled, REAL *grad_offset)
{
    VEC pk[SLOT_TILE][H];
    VEC gp[SLOT_TILE][H];
    VEC goff[SLOT_TILE];
    VEC bv[T], cv[T]; /* this row's recorded v-coefficients and constants */
    const int64_t n = s1 - s0;
    for (int64_t i = 0; i < n; ++i)
        goff[i] = (VEC){0};
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t i = 0; i < n; ++i) {
            NAME(spread_pose)(poses + (b * S + s0 + i) * H, pk[i], Q);
            for (int k = 0; k < Q; ++k)
                gp[i][k] = (VEC){0};
        }
        for (int64_t j = 0; j < J; ++j) {
            const int64_t row = b * J + j;
            const VEC c = NAME(load)(shift + row * H);
            for (int64_t t = 0; t < T; ++t) {
                bv[t] = NAME(load)(vcoef + (row * T + t) * H);
                cv[t] = NAME(load)(constant + (row * T + t) * H);
            }
            for (int64_t i = 0; i < n; ++i) {
                const int64_t s = s0 + i;
                /* gradient of vote (row, s): x ⊙ Σ_t A_t[row, s] B_t + Σ_t A_t[row, s] C_t */
                VEC mul = {0}, add = {0};
                for (int64_t t = 0; t < T; ++t) {
                    const REAL a = coefs[t][row * S + s];
                    mul += a * bv[t];
                    add += a * cv[t];
                }
                const VEC g = (NAME(load)(votes + (row * S + s) * H) - c) * mul + add;
                const REAL *tw = tiled + (s * J + j) * Q * H;
                REAL *dt = grad_tiled + (s * J + j) * Q * H;
                for (int k = 0; k < Q; ++k) {
                    gp[i][k] += g * NAME(load)(tw + k * H);
                    NAME(store)(dt + k * H, NAME(load)(dt + k * H) + pk[i][k] * g);
                }
                goff[i] += g;
            }
        }
        /* dL/dpose[r * Q + k] = Σ_c gp[k][r * Q + c] */
        for (int64_t i = 0; i < n; ++i) {
            REAL *out = grad_poses + (b * S + s0 + i) * H;
            for (int k = 0; k < Q; ++k) {
                REAL t[H];
                NAME(store)(t, gp[i][k]);
                for (int r = 0; r < H / Q; ++r) {
                    REAL acc = 0;
                    for (int cc = 0; cc < Q; ++cc)
                        acc += t[r * Q + cc];
                    out[r * Q + k] = acc;
                }
            }
        }
    }
    if (grad_offset)
        for (int64_t i = 0; i < n; ++i)
            NAME(store)(grad_offset + (s0 + i) * H, goff[i]);
}

/* Backward of votes + routing for slots [s0, s1) of all B blocks. The vote gradient is
 * assembled from the T recorded coefficients (coefs[t] (B*J, S), vcoef and constant
 * (B*J, T, 16)) and never stored: it goes straight into grad_poses (B, S, 16), grad_tiled
 * (S, J, Q, 16; zero it first) and grad_offset (S, 16; may be NULL).
 * Slots are taken in tiles so that the coefficient rows are read a cache line at a time. */
void NAME(vote_backward)(const REAL *poses, const REAL *tiled, const REAL *votes,
                         const REAL *shift, const REAL *const *coefs, int64_t T,
                         const REAL *vcoef, const REAL *constant, int64_t B, int64_t S,
                         int64_t J, int64_t Q, int64_t s0, int64_t s1, REAL *grad_poses,
                         REAL *grad_tiled, REAL *grad_offset)
{
#pragma omp parallel for schedule(static)
    for (int64_t t0 = s0; t0 < s1; t0 += SLOT_TILE) {
        const int64_t t1 = t0 + SLOT_TILE < s1 ? t0 + SLOT_TILE : s1;
        if (Q == 4)
            NAME(vote_backward_tile)(poses, tiled, votes, shift, coefs, T, vcoef, constant, B,
                                     S, J, t0, t1, 4, grad_poses, grad_tiled, grad_offset);
        else
            NAME(vote_backward_tile)(poses, tiled, votes, shift, coefs, T, vcoef, constant, B,
                                     S, J, t0, t1, 16, grad_poses, grad_tiled, grad_offset);
    }
}

#undef VEC
#undef IVEC
#endif

/* CPU kernels for the vote-sized work of EM routing (see ffi.py, which compiles this
 * file with the system C compiler and calls it through ctypes).
 *
 * route_forward computes a chunk's votes and runs every iteration of Procedure 1 on them;
 * route_backward is its hand-written backward, down to the gradients of the poses and W. Each
 * routing pass reads a vote once (v² formed on the fly) while the chunk's votes sit in cache;
 * the PyTorch path needs separate passes and a stored v² for the same quantities. Loops are
 * split over OpenMP threads of PyTorch's own OpenMP runtime (same soname, already loaded), so
 * the kernels share its thread pool and thread count.
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
 *
 * Interface: every routing entry point takes its arguments as pointers to the structs below,
 * which ffi.py mirrors field for field as ctypes Structures (tests/test_cpu_kernels.py compares
 * the layouts through emcaps_layout). EMCAPS_ABI_VERSION changes with any change of a struct
 * or of an entry point's signature; the loader refuses a library whose version differs.
 */
#ifndef REAL

#include <tgmath.h> /* log, exp, log1p of the working precision: logf for float */
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define H 16

#define EMCAPS_ABI_VERSION 2

/* One chunk's routing problem: shapes, schedule and scalars (ffi.Problem).
 * N images, L parent positions, S slots per position, J parent types, Q = 4 (matrix poses) or
 * 16 (vector poses); lambdas (iters) the inverse temperatures; num_children ids per image for
 * exact routing (0 without); the floors of σ² and of Σ_s R a; τ of the E-step. */
typedef struct {
    int64_t N, L, S, J, Q;
    int64_t iters;
    int64_t num_children;
    const double *lambdas;
    double var_floor, sum_floor, likelihood_power;
} emcaps_problem;

/* Its input tensors (ffi.Inputs), of the element type of the call (offset, child_index and
 * parent_count may be NULL): poses (B, S, 16), tiled (S, J, Q, 16), offset (S, 16),
 * a_in (B, S), beta_u and beta_a (J), child_index (L·S, int64) and parent_count (L·S). */
typedef struct {
    const void *poses, *tiled, *offset, *a_in, *beta_u, *beta_a;
    const int64_t *child_index;
    const void *parent_count;
} emcaps_inputs;

/* route_forward's work buffers, outputs and tape (ffi.ForwardBuffers; see route_forward). */
typedef struct {
    void *votes, *shift, *assignments, *variance, *log_sigmas;
    void *slot_a, *slot_b, *child_a, *child_b;
    void *poses_out, *logit_out;
    void *const *tape; /* NULL, or 4·iters − 2 buffers */
} emcaps_forward_buffers;

/* route_backward's inputs beyond the problem, work buffers and outputs (ffi.BackwardBuffers;
 * see route_backward). */
typedef struct {
    const void *const *tape;
    const void *g_poses, *g_logit; /* may be NULL */
    void *votes, *shift, *rowbuf, *grad_assign, *slot, *child;
    void *const *coefs; /* 2·iters − 1 buffers */
    void *vcoef, *constant;
    void *grad_a, *grad_bu, *grad_ba;
    const void *wmat;
    int64_t threads;
    void *grad_poses, *grad_w_threads, *grad_off_threads, *gp_threads;
} emcaps_backward_buffers;

/* The hardware's vector in bytes: 64 with AVX-512, 32 with AVX, 16 otherwise (SSE, NEON). A
 * 16-entry vote is NP parts of PW lanes each (per element type, below), so that every value
 * lives in registers: GCC keeps a vector wider than the hardware's in memory, broadcasts a
 * scalar into it through memory and shuffles it lane by lane. */
#ifndef VBYTES /* -DVBYTES=64 compiles the AVX-512 layout for any target (tests) */
#if defined(__AVX512F__)
#define VBYTES 64
#elif defined(__AVX__)
#define VBYTES 32
#else
#define VBYTES 16
#endif
#endif

#define INLINE static inline __attribute__((always_inline))

/* Lane shuffles of a part with constant indices: of one part, and of two (PW and up pick
 * from b). */
#ifdef __clang__
#define SHUFFLE1(a, ...) __builtin_shufflevector(a, a, __VA_ARGS__)
#define SHUFFLE2(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE1(a, ...) __builtin_shuffle(a, (PIVEC){__VA_ARGS__})
#define SHUFFLE2(a, b, ...) __builtin_shuffle(a, b, (PIVEC){__VA_ARGS__})
#endif
/* f(j, args) for the lanes j of a part of 2, 4, 8 or 16 lanes. */
#define LANES2(f, ...) f(0, __VA_ARGS__), f(1, __VA_ARGS__)
#define LANES4(f, ...) LANES2(f, __VA_ARGS__), f(2, __VA_ARGS__), f(3, __VA_ARGS__)
#define LANES8(f, ...) LANES4(f, __VA_ARGS__), f(4, __VA_ARGS__), f(5, __VA_ARGS__), \
                       f(6, __VA_ARGS__), f(7, __VA_ARGS__)
#define LANES16(f, ...) LANES8(f, __VA_ARGS__), f(8, __VA_ARGS__), f(9, __VA_ARGS__), \
                        f(10, __VA_ARGS__), f(11, __VA_ARGS__), f(12, __VA_ARGS__), \
                        f(13, __VA_ARGS__), f(14, __VA_ARGS__), f(15, __VA_ARGS__)
/* Pairwise half-sums of two parts a, b at block size m (hsum16): lane o of block k = o / 2m,
 * r = o % 2m takes lane 2mk + r of a (r < m) or 2mk + r − m of b, plus the lane m further on. */
#define TREE_LO(o, m) ((o) % (2 * (m)) < (m) ? (o) / (2 * (m)) * 2 * (m) + (o) % (2 * (m)) \
                                             : PW + (o) / (2 * (m)) * 2 * (m) + (o) % (2 * (m)) - (m))
#define TREE_HI(o, m) (TREE_LO(o, m) + (m))
/* For 4x4 matrices stored row-major as 16 lanes (lane 4·row + column), lane j of part i
 * (PW >= 4: a part holds whole rows): COLUMN(c): lane (r, k) <- entry (r, c);
 * ROW_TILE(r): lane (k, c) <- entry (r, c); ROW_SPREAD(r): lane (k, c) <- entry (r, k). */
#define COLUMN_LANE(j, c) ((j) / 4 * 4 + (c))
#define TILE_LANE(j, r) ((4 * (r)) % PW + (j) % 4)
#define SPREAD_LANE(j, r, i) ((4 * (r)) % PW + ((i) * PW + (j)) / 4)

#define REAL float
#define IREAL int32_t
#define REAL_IS_FLOAT 1
#define PW (VBYTES / 4)
#define NAME(x) x##_f32
#include __FILE__
#undef REAL
#undef IREAL
#undef REAL_IS_FLOAT
#undef PW
#undef NAME

#define REAL double
#define IREAL int64_t
#define REAL_IS_FLOAT 0
#define PW (VBYTES / 8)
#define NAME(x) x##_f64
#include __FILE__
#undef REAL
#undef IREAL
#undef REAL_IS_FLOAT
#undef PW
#undef NAME

int64_t emcaps_abi_version(void) { return EMCAPS_ABI_VERSION; }

#include <stddef.h>
#define FIELD(type, field) out[n++] = (int64_t)offsetof(type, field)

/* sizeof and the offset of every field, in declaration order, of struct `which`
 * (0 problem, 1 inputs, 2 forward buffers, 3 backward buffers) into out; returns the count
 * written (0 for an unknown struct). For the test that ffi.py's Structures match. */
int64_t emcaps_layout(int64_t which, int64_t *out)
{
    int64_t n = 0;
    switch (which) {
    case 0:
        out[n++] = sizeof(emcaps_problem);
        FIELD(emcaps_problem, N); FIELD(emcaps_problem, L); FIELD(emcaps_problem, S);
        FIELD(emcaps_problem, J); FIELD(emcaps_problem, Q); FIELD(emcaps_problem, iters);
        FIELD(emcaps_problem, num_children); FIELD(emcaps_problem, lambdas);
        FIELD(emcaps_problem, var_floor); FIELD(emcaps_problem, sum_floor);
        FIELD(emcaps_problem, likelihood_power);
        break;
    case 1:
        out[n++] = sizeof(emcaps_inputs);
        FIELD(emcaps_inputs, poses); FIELD(emcaps_inputs, tiled); FIELD(emcaps_inputs, offset);
        FIELD(emcaps_inputs, a_in); FIELD(emcaps_inputs, beta_u); FIELD(emcaps_inputs, beta_a);
        FIELD(emcaps_inputs, child_index); FIELD(emcaps_inputs, parent_count);
        break;
    case 2:
        out[n++] = sizeof(emcaps_forward_buffers);
        FIELD(emcaps_forward_buffers, votes); FIELD(emcaps_forward_buffers, shift);
        FIELD(emcaps_forward_buffers, assignments); FIELD(emcaps_forward_buffers, variance);
        FIELD(emcaps_forward_buffers, log_sigmas); FIELD(emcaps_forward_buffers, slot_a);
        FIELD(emcaps_forward_buffers, slot_b); FIELD(emcaps_forward_buffers, child_a);
        FIELD(emcaps_forward_buffers, child_b); FIELD(emcaps_forward_buffers, poses_out);
        FIELD(emcaps_forward_buffers, logit_out); FIELD(emcaps_forward_buffers, tape);
        break;
    case 3:
        out[n++] = sizeof(emcaps_backward_buffers);
        FIELD(emcaps_backward_buffers, tape); FIELD(emcaps_backward_buffers, g_poses);
        FIELD(emcaps_backward_buffers, g_logit); FIELD(emcaps_backward_buffers, votes);
        FIELD(emcaps_backward_buffers, shift); FIELD(emcaps_backward_buffers, rowbuf);
        FIELD(emcaps_backward_buffers, grad_assign); FIELD(emcaps_backward_buffers, slot);
        FIELD(emcaps_backward_buffers, child); FIELD(emcaps_backward_buffers, coefs);
        FIELD(emcaps_backward_buffers, vcoef); FIELD(emcaps_backward_buffers, constant);
        FIELD(emcaps_backward_buffers, grad_a); FIELD(emcaps_backward_buffers, grad_bu);
        FIELD(emcaps_backward_buffers, grad_ba); FIELD(emcaps_backward_buffers, wmat);
        FIELD(emcaps_backward_buffers, threads); FIELD(emcaps_backward_buffers, grad_poses);
        FIELD(emcaps_backward_buffers, grad_w_threads);
        FIELD(emcaps_backward_buffers, grad_off_threads);
        FIELD(emcaps_backward_buffers, gp_threads);
        break;
    }
    return n;
}
#undef FIELD

#else

/* A part: one hardware vector of PW lanes (GCC/Clang vector extension), and its lane mask. */
#define NP (H / PW)
typedef REAL NAME(pvec) __attribute__((vector_size(VBYTES)));
typedef IREAL NAME(pivec) __attribute__((vector_size(VBYTES)));
#define PVEC NAME(pvec)
#define PIVEC NAME(pivec)
#if PW == 16
#define LANES LANES16
#elif PW == 8
#define LANES LANES8
#elif PW == 4
#define LANES LANES4
#else
#define LANES LANES2
#endif
/* M(i, args) for every part i. */
#if NP == 1
#define EACH_PART(M, ...) M(0, __VA_ARGS__)
#elif NP == 2
#define EACH_PART(M, ...) M(0, __VA_ARGS__) M(1, __VA_ARGS__)
#elif NP == 4
#define EACH_PART(M, ...) M(0, __VA_ARGS__) M(1, __VA_ARGS__) M(2, __VA_ARGS__) M(3, __VA_ARGS__)
#else
#define EACH_PART(M, ...) M(0, __VA_ARGS__) M(1, __VA_ARGS__) M(2, __VA_ARGS__) M(3, __VA_ARGS__) \
                          M(4, __VA_ARGS__) M(5, __VA_ARGS__) M(6, __VA_ARGS__) M(7, __VA_ARGS__)
#endif

/* 16 entries of a pose, vote or vote gradient: NP parts (one AVX-512 register in float32, two
 * AVX2 registers in float32 or four in float64, ...), lane by lane arithmetic below. */
typedef struct {
    PVEC p[NP];
} NAME(vec);
#define VEC NAME(vec)

INLINE VEC NAME(load)(const REAL *p)
{
    VEC v;
    for (int i = 0; i < NP; ++i)
        memcpy(&v.p[i], p + i * PW, sizeof v.p[i]);
    return v;
}

INLINE void NAME(store)(REAL *p, VEC v)
{
    for (int i = 0; i < NP; ++i)
        memcpy(p + i * PW, &v.p[i], sizeof v.p[i]);
}

INLINE VEC NAME(vzero)(void)
{
    VEC v;
    for (int i = 0; i < NP; ++i)
        v.p[i] = (PVEC){0};
    return v;
}

INLINE VEC NAME(vadd)(VEC a, VEC b)
{
    for (int i = 0; i < NP; ++i)
        a.p[i] += b.p[i];
    return a;
}

INLINE VEC NAME(vsub)(VEC a, VEC b)
{
    for (int i = 0; i < NP; ++i)
        a.p[i] -= b.p[i];
    return a;
}

INLINE VEC NAME(vmul)(VEC a, VEC b)
{
    for (int i = 0; i < NP; ++i)
        a.p[i] *= b.p[i];
    return a;
}

/* a·b + c, and s·a + c for a scalar s (each one FMA per part where the target has FMA) */
INLINE VEC NAME(vfma)(VEC a, VEC b, VEC c)
{
    for (int i = 0; i < NP; ++i)
        c.p[i] = a.p[i] * b.p[i] + c.p[i];
    return c;
}

INLINE VEC NAME(vsfma)(REAL s, VEC a, VEC c)
{
    for (int i = 0; i < NP; ++i)
        c.p[i] = s * a.p[i] + c.p[i];
    return c;
}

/* s·a */
INLINE VEC NAME(vscale)(REAL s, VEC a)
{
    for (int i = 0; i < NP; ++i)
        a.p[i] = s * a.p[i];
    return a;
}

/* The parts of v added lane by lane, halving: lane j holds the sum of lanes j, j + PW, ...
 * (the first levels of the 16-lane halving tree, whatever the part width). */
INLINE PVEC NAME(fold)(VEC v)
{
    for (int n = NP; n > 1; n /= 2)
        for (int i = 0; i < n / 2; ++i)
            v.p[i] += v.p[i + n / 2];
    return v.p[0];
}

/* Σ of the 16 lanes: halving (lane h plus lane h + 8, then + 4, + 2, + 1). */
#define ROTATE_LANE(j, m) (((j) + (m)) % PW)
static inline REAL NAME(hsum)(VEC v)
{
    PVEC f = NAME(fold)(v);
#if PW >= 16
    f += SHUFFLE1(f, LANES(ROTATE_LANE, 8));
#endif
#if PW >= 8
    f += SHUFFLE1(f, LANES(ROTATE_LANE, 4));
#endif
#if PW >= 4
    f += SHUFFLE1(f, LANES(ROTATE_LANE, 2));
#endif
    f += SHUFFLE1(f, LANES(ROTATE_LANE, 1));
    return f[0];
}

/* One level of hsum16's tree over x[0 .. 2m): x[i] <- pairwise half-sums of x[2i], x[2i + 1]. */
#define TREE_LEVEL(x, m)                                                                    \
    for (int i = 0; i < (m); ++i)                                                           \
        x[i] = SHUFFLE2(x[2 * i], x[2 * i + 1], LANES(TREE_LO, m)) +                         \
               SHUFFLE2(x[2 * i], x[2 * i + 1], LANES(TREE_HI, m));

/* The 16 lane sums of 16 vectors, as one vector: lane i of the result is the sum of t[i], by
 * the same halving tree as hsum. Each group of PW vectors, folded to one part each, gives one
 * part of the result through log2(PW) levels of pairwise half-sums; fed in bit-reversed
 * order, the sums come out in order. */
static inline VEC NAME(hsum16)(const VEC *t)
{
    static const int rev[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
    VEC out;
    for (int g = 0; g < NP; ++g) {
        PVEC x[PW];
        for (int i = 0; i < PW; ++i)
            x[i] = NAME(fold)(t[g * PW + rev[i] / NP]);
#if PW >= 16
        TREE_LEVEL(x, 8)
#endif
#if PW >= 8
        TREE_LEVEL(x, 4)
#endif
#if PW >= 4
        TREE_LEVEL(x, 2)
#endif
        TREE_LEVEL(x, 1)
        out.p[g] = x[0];
    }
    return out;
}

/* pk[k][h] = pose[(h / Q) * Q + k] for k < Q: the pose entries each vote entry multiplies.
 * Q = 4: pose column k spread over its row (one in-part shuffle per part); Q = 16: pose[k] in
 * every lane (a broadcast). */
#define COLUMN_OF(x, i, c) SHUFFLE1((x).p[i], LANES(COLUMN_LANE, c))
#define SAME_LANE(j, x) (x)
INLINE void NAME(spread_pose)(const REAL *pose, VEC *pk, const int Q)
{
#if PW >= 4
    if (Q == 4) {
        const VEC p = NAME(load)(pose);
#define SPREAD_PART(i, unused)                                                                \
    pk[0].p[i] = COLUMN_OF(p, i, 0);                                                          \
    pk[1].p[i] = COLUMN_OF(p, i, 1);                                                          \
    pk[2].p[i] = COLUMN_OF(p, i, 2);                                                          \
    pk[3].p[i] = COLUMN_OF(p, i, 3);
        EACH_PART(SPREAD_PART, 0)
#undef SPREAD_PART
        return;
    }
#endif
    if (Q == H) {
        for (int k = 0; k < H; ++k) {
            const PVEC x = (PVEC){LANES(SAME_LANE, pose[k])};
            for (int i = 0; i < NP; ++i)
                pk[k].p[i] = x;
        }
        return;
    }
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
        const VEC off = offset ? NAME(load)(offset + s * H) : NAME(vzero)();
        for (int64_t b = g0; b < g1; ++b) {
            VEC pk[H];
            NAME(spread_pose)(poses + (b * S + s) * H, pk, Q);
            REAL *c = shift + b * J * H;
            for (int64_t j = 0; j < J; ++j) {
                VEC acc = off;
                for (int k = 0; k < Q; ++k)
                    acc = NAME(vfma)(pk[k], NAME(load)(ts + (j * Q + k) * H), acc);
                NAME(store)(votes + ((b * J + j) * S + s) * H, acc);
                NAME(store)(c + j * H, NAME(vadd)(NAME(load)(c + j * H), acc));
            }
        }
    }
    const REAL inv = (REAL)1 / (REAL)S;
    for (int64_t i = g0 * J; i < g1 * J; ++i)
        NAME(store)(shift + i * H, NAME(vscale)(inv, NAME(load)(shift + i * H)));
}

/* Votes of blocks [b0, b1) and their mean, shared out over the threads of the enclosing
 * parallel region. */
static void NAME(votes_all)(const REAL *poses, const REAL *tiled, const REAL *offset, int64_t S,
                            int64_t J, int64_t Q, int64_t b0, int64_t b1, REAL *votes,
                            REAL *shift)
{
#pragma omp for schedule(static)
    for (int64_t g0 = b0; g0 < b1; g0 += VOTE_GROUP) {
        const int64_t g1 = g0 + VOTE_GROUP < b1 ? g0 + VOTE_GROUP : b1;
        if (Q == 4)
            NAME(votes_group)(poses, tiled, offset, S, J, g0, g1, 4, votes, shift);
        else
            NAME(votes_group)(poses, tiled, offset, S, J, g0, g1, 16, votes, shift);
    }
}

/* Votes of the problem's N·L blocks and their unweighted mean per (block, parent type), into
 * votes (B, J, S, 16) and shift (B·J, 16). */
void NAME(votes)(const emcaps_problem *p, const emcaps_inputs *in, REAL *votes, REAL *shift)
{
#pragma omp parallel
    NAME(votes_all)(in->poses, in->tiled, in->offset, p->S, p->J, p->Q, 0, p->N * p->L, votes,
                    shift);
}

/* R_0 of the slots at parent position l: uniform over each child's parents (exact routing:
 * J types at each of its parent_count positions) or over the J types. */
static inline void NAME(initial_assignments)(const int64_t *child_index, const REAL *parent_count,
                                             int64_t J, int64_t S, int64_t l, REAL *out)
{
    for (int64_t s = 0; s < S; ++s)
        out[s] = child_index ? (REAL)1 / ((REAL)J * parent_count[l * S + s]) : (REAL)1 / (REAL)J;
}

/* For exact routing: combine the per-slot values of each image over the slots that hold the
 * same child (their max, or their sum) and give every slot its child's result. slot (N·L, S),
 * child (N, C) work space. Shared out over the threads of the enclosing parallel region. */
static void NAME(over_children)(REAL *slot, REAL *child, const int64_t *child_index, int64_t N,
                                int64_t L, int64_t S, int64_t C, int use_max)
{
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        REAL *cv = child + n * C;
        for (int64_t i = 0; i < C; ++i)
            cv[i] = use_max ? -INFINITY : 0;
        for (int64_t i = 0; i < L * S; ++i) {
            const REAL x = slot[n * L * S + i];
            REAL *d = cv + child_index[i];
            *d = use_max ? (x > *d ? x : *d) : *d + x;
        }
    }
#pragma omp for schedule(static)
    for (int64_t b = 0; b < N * L; ++b) {
        const int64_t n = b / L, l = b % L;
        for (int64_t s = 0; s < S; ++s)
            slot[b * S + s] = child[n * C + child_index[l * S + s]];
    }
}

/* Σ_h x (l + q x) for up to 16 slots from s on (x = v − c): the quadratic forms of a row, 16 at
 * a time through hsum16. Writes form[0..n) and returns n. */
static inline int64_t NAME(row_forms16)(const REAL *v, VEC c, VEC l, VEC q, int64_t s, int64_t S,
                                        REAL *form)
{
    const int64_t n = S - s < 16 ? S - s : 16;
    if (n == 16) {
        VEC tt[16];
        for (int i = 0; i < 16; ++i) {
            const VEC x = NAME(vsub)(NAME(load)(v + (s + i) * H), c);
            tt[i] = NAME(vmul)(x, NAME(vfma)(q, x, l));
        }
        NAME(store)(form, NAME(hsum16)(tt));
    } else {
        for (int64_t i = 0; i < n; ++i) {
            const VEC x = NAME(vsub)(NAME(load)(v + (s + i) * H), c);
            form[i] = NAME(hsum)(NAME(vmul)(x, NAME(vfma)(q, x, l)));
        }
    }
    return n;
}

/* The rest of an M-step for one row from its amount A = Σ_s R a and sums Σ w x, Σ w x²:
 * divisor D, centred μ, σ² before the floor (V'), σ², Σ_h log σ. Clamps let NaN through. */
static inline void NAME(m_finish)(REAL A, const REAL *s1, const REAL *s2, double var_floor,
                                  double sum_floor, REAL *div, REAL *mean, REAL *vraw,
                                  REAL *var, REAL *log_sigma)
{
    const REAL D = A < (REAL)sum_floor ? (REAL)sum_floor : A;
    REAL ls = 0;
    for (int h = 0; h < H; ++h) {
        mean[h] = s1[h] / D;
        vraw[h] = s2[h] / D - mean[h] * mean[h];
        var[h] = (vraw[h] < 0 ? 0 : vraw[h]) + (REAL)var_floor;
        ls += (REAL)0.5 * log(var[h]);
    }
    *div = D;
    *log_sigma = ls;
}

/* exp of 16 lanes. float: Cephes' expf (range reduction by ln 2, degree-6 polynomial): within
 * 1.0 ulp of exp on [-87.3, 88.3] (measured, tests/test_cpu_kernels.py), 0 below -87.34 where
 * libm returns subnormals, NaN stays NaN; the routing only takes exp of arguments <= 0.
 * double: libm, lane by lane. */
#if REAL_IS_FLOAT
INLINE PVEC NAME(vexp_part)(PVEC x)
{
    const PVEC in = x;
    const PIVEC hi = x > 88.3762626647949f, lo = x < -87.3365447504019f; /* lanes -1 or 0 */
    const PVEC top = (PVEC){0} + 88.3762626647949f, bottom = (PVEC){0} - 87.3365447504019f;
    x = (PVEC)(((PIVEC)x & ~hi) | ((PIVEC)top & hi));
    x = (PVEC)(((PIVEC)x & ~lo) | ((PIVEC)bottom & lo));
    PVEC fx = x * 1.44269504088896341f + 0.5f;
    PIVEC n = __builtin_convertvector(fx, PIVEC);
    n += __builtin_convertvector(n, PVEC) > fx; /* floor: truncation went up for fx < 0 */
    const PVEC nf = __builtin_convertvector(n, PVEC);
    x = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    const PVEC z = x * x;
    PVEC y = 1.9875691500e-4f * x + 1.3981999507e-3f;
    y = y * x + 8.3334519073e-3f;
    y = y * x + 4.1665795894e-2f;
    y = y * x + 1.6666665459e-1f;
    y = y * x + 5.0000001201e-1f;
    y = y * z + x + 1.0f;
    const PVEC scale = (PVEC)((n + 127) << 23);
    const PIVEC nan = in != in;
    return (PVEC)(((PIVEC)(y * scale) & ~lo & ~nan) | ((PIVEC)in & nan));
}
#endif

INLINE VEC NAME(vexp)(VEC x)
{
#if REAL_IS_FLOAT
    for (int i = 0; i < NP; ++i)
        x.p[i] = NAME(vexp_part)(x.p[i]);
    return x;
#else
    REAL t[H];
    NAME(store)(t, x);
    for (int h = 0; h < H; ++h)
        t[h] = exp(t[h]);
    return NAME(load)(t);
#endif
}

/* vexp over n entries (n a multiple of 16): exported for the tests of its accuracy. */
void NAME(exp_lanes)(const REAL *x, int64_t n, REAL *out)
{
    for (int64_t i = 0; i + H <= n; i += H)
        NAME(store)(out + i, NAME(vexp)(NAME(load)(x + i)));
}

static inline REAL NAME(log_sigmoid)(REAL x)
{
    return x < 0 ? x - log1p(exp(x)) : -log1p(exp(-x));
}

/* route_forward: Procedure 1 forward for a chunk of N images (capsules/em.py has the same math in PyTorch ops):
 *   votes v = pose @ W (+ offset) of B = N·L blocks into `votes` (B, J, S, 16), their mean per
 *   row into `shift` (B·J, 16); then `iters` M-steps with E-steps between, on x = v − c.
 * a_in (B, S); beta_u, beta_a (J); lambdas (iters) the inverse temperatures;
 * likelihood_power τ the E-step's power on p (R ∝ a p^τ; 1 in Procedure 1).
 * child_index (L·S) and parent_count (L·S) for exact routing (children normalised over every
 * parent that holds them, ids < num_children per image), or NULL: softmax over the J types.
 * Work buffers: R (B·J, S), var (B·J, 16), log_sigmas (B·J), slot_a/slot_b (B, S),
 * child_a/child_b (N, C).
 * Out: poses (B·J, 16) = μ + c, logit (B·J) = λ(β_a − cost).
 * Clamps are written so that NaN passes through them (as in PyTorch's clamp_min): a NaN in the
 * input must reach the outputs, where the training loop's NaN guard sees it.
 * tape: NULL, or the 4·iters − 2 buffers route_backward reads (T = iters): Σ w x for each
 * iteration (tape[t], (B·J, 16)), Σ w x² (tape[T + t]), the E-steps' Σ_h x (−2 μ/σ² + x/σ²)
 * (tape[2T + t], (B·J, S), t < T − 1) and the assignments they give (tape[3T − 1 + t]). */
static void NAME(forward_impl)(const REAL *poses, const REAL *tiled, const REAL *offset,
                         const REAL *a_in, const REAL *beta_u, const REAL *beta_a,
                         const double *lambdas, int64_t iters, const int64_t *child_index,
                         const REAL *parent_count, int64_t num_children, int64_t N, int64_t L,
                         int64_t S, int64_t J, int64_t Q, double var_floor, double sum_floor,
                         double likelihood_power, REAL *votes, REAL *shift, REAL *R,
                         REAL *var, REAL *log_sigmas, REAL *slot_a,
                         REAL *slot_b, REAL *child_a, REAL *child_b, REAL *poses_out,
                         REAL *logit_out, REAL *const *tape)
{
    const int64_t B = N * L, rows = B * J, C = num_children;
    const REAL log_2pi_half = (REAL)(0.5 * H * log(2.0 * 3.14159265358979323846));
    const REAL tau = (REAL)likelihood_power, half_tau = (REAL)0.5 * tau;
#pragma omp parallel
    {
        NAME(votes_all)(poses, tiled, offset, S, J, Q, 0, B, votes, shift);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; ++b)
            for (int64_t j = 0; j < J; ++j)
                NAME(initial_assignments)(child_index, parent_count, J, S, b % L,
                                          R + (b * J + j) * S);
        for (int64_t t = 0; t < iters; ++t) {
            const REAL lam = (REAL)lambdas[t];
            /* M-step, one row (block, parent type) at a time */
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; ++r) {
                const int64_t b = r / J, j = r % J;
                const REAL *v = votes + r * S * H;
                const REAL *rr = R + r * S, *ar = a_in + b * S;
                const VEC c = NAME(load)(shift + r * H);
                VEC a1 = NAME(vzero)(), a2 = NAME(vzero)();
                REAL amount = 0;
                for (int64_t s = 0; s < S; ++s) {
                    const REAL w = rr[s] * ar[s];
                    const VEC x = NAME(vsub)(NAME(load)(v + s * H), c);
                    const VEC y = NAME(vscale)(w, x);
                    amount += w;
                    a1 = NAME(vadd)(a1, y);
                    a2 = NAME(vfma)(y, x, a2);
                }
                if (tape) {
                    NAME(store)(tape[t] + r * H, a1);
                    NAME(store)(tape[iters + t] + r * H, a2);
                }
                REAL s1[H], s2[H], div, vraw[H], log_sigma;
                NAME(store)(s1, a1);
                NAME(store)(s2, a2);
                /* centred μ into poses_out until the end */
                NAME(m_finish)(amount, s1, s2, var_floor, sum_floor, &div, poses_out + r * H, vraw,
                               var + r * H, &log_sigma);
                log_sigmas[r] = log_sigma; /* the E-step's normaliser, Σ_h log σ */
                const REAL cost = amount * ((REAL)H * beta_u[j] + log_sigma);
                logit_out[r] = lam * (beta_a[j] - cost);
            }
            if (t == iters - 1)
                break;
            /* E-step: log(a_j p_j^τ) of every (row, slot) into R (τ = 1: Procedure 1) */
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; ++r) {
                const REAL *v = votes + r * S * H;
                REAL iv[H], lin[H], constant = 0;
                for (int h = 0; h < H; ++h) {
                    const REAL mean = poses_out[r * H + h];
                    iv[h] = (REAL)1 / var[r * H + h];
                    lin[h] = (REAL)-2 * (mean * iv[h]);
                    constant += mean * mean * iv[h];
                }
                const REAL log_norm = log_sigmas[r] + log_2pi_half;
                const VEC c = NAME(load)(shift + r * H), q = NAME(load)(iv), l = NAME(load)(lin);
                const REAL base = NAME(log_sigmoid)(logit_out[r]) - tau * log_norm;
                REAL *out = R + r * S;
                REAL *taped = tape ? tape[2 * iters + t] + r * S : NULL;
                for (int64_t s = 0; s < S; s += 16) {
                    REAL form[16];
                    const int64_t n = NAME(row_forms16)(v, c, l, q, s, S, form);
                    for (int64_t i = 0; i < n; ++i) {
                        if (taped)
                            taped[s + i] = form[i];
                        REAL quad = form[i] + constant;
                        quad = quad < 0 ? 0 : quad;
                        out[s + i] = base - half_tau * quad;
                    }
                }
            }
            /* Normalise: R = a_j p_j / Σ over the child's parents, with a per-child max shift */
#pragma omp for schedule(static)
            for (int64_t b = 0; b < B; ++b) {
                REAL *m = slot_a + b * S;
                for (int64_t s = 0; s < S; ++s)
                    m[s] = -INFINITY;
                for (int64_t j = 0; j < J; ++j) {
                    const REAL *lg = R + (b * J + j) * S;
                    for (int64_t s = 0; s < S; ++s)
                        m[s] = lg[s] > m[s] ? lg[s] : m[s];
                }
            }
            if (child_index)
                NAME(over_children)(slot_a, child_a, child_index, N, L, S, C, 1);
#pragma omp for schedule(static)
            for (int64_t b = 0; b < B; ++b) {
                const REAL *m = slot_a + b * S;
                REAL *sum = slot_b + b * S;
                memset(sum, 0, sizeof(REAL) * S);
                for (int64_t j = 0; j < J; ++j) {
                    REAL *lg = R + (b * J + j) * S;
                    int64_t s = 0;
                    for (; s + 16 <= S; s += 16) {
                        const VEC e = NAME(vexp)(NAME(vsub)(NAME(load)(lg + s), NAME(load)(m + s)));
                        NAME(store)(lg + s, e);
                        NAME(store)(sum + s, NAME(vadd)(NAME(load)(sum + s), e));
                    }
                    for (; s < S; ++s) {
                        const REAL e = exp(lg[s] - m[s]);
                        lg[s] = e;
                        sum[s] += e;
                    }
                }
            }
            if (child_index)
                NAME(over_children)(slot_b, child_b, child_index, N, L, S, C, 0);
#pragma omp for schedule(static)
            for (int64_t b = 0; b < B; ++b) {
                const REAL *sum = slot_b + b * S;
                for (int64_t j = 0; j < J; ++j) {
                    REAL *e = R + (b * J + j) * S;
                    for (int64_t s = 0; s < S; ++s)
                        e[s] /= sum[s];
                    if (tape)
                        memcpy(tape[3 * iters - 1 + t] + (b * J + j) * S, e, sizeof(REAL) * S);
                }
            }
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows * H; ++i)
            poses_out[i] += shift[i];
    }
}

/* route_forward as exported: the arguments of forward_impl, read from the structs. */
void NAME(route_forward)(const emcaps_problem *p, const emcaps_inputs *in,
                         const emcaps_forward_buffers *out)
{
    NAME(forward_impl)(in->poses, in->tiled, in->offset, in->a_in, in->beta_u, in->beta_a,
                       p->lambdas, p->iters, in->child_index, in->parent_count,
                       p->num_children, p->N, p->L, p->S, p->J, p->Q, p->var_floor,
                       p->sum_floor, p->likelihood_power, out->votes, out->shift,
                       out->assignments, out->variance, out->log_sigmas, out->slot_a,
                       out->slot_b, out->child_a, out->child_b, out->poses_out, out->logit_out,
                       (REAL *const *)out->tape);
}

/* Per-row quantities of an M-step, recomputed from its taped sums: amount A = Σ_s R a, then
 * as m_finish. */
static inline void NAME(m_row)(const REAL *assign, const REAL *a_in, int64_t S, const REAL *s1,
                               const REAL *s2, double var_floor, double sum_floor, REAL *amount,
                               REAL *div, REAL *mean, REAL *vraw, REAL *var, REAL *log_sigma)
{
    REAL A = 0;
    for (int64_t s = 0; s < S; ++s)
        A += assign[s] * a_in[s];
    *amount = A;
    NAME(m_finish)(A, s1, s2, var_floor, sum_floor, div, mean, vraw, var, log_sigma);
}

/* Matrix poses (Q = 4): one vote's gradient g mapped to its pose's, gps += Σ_c g[:, c] ⊙ (W
 * column c spread over the rows: wm, 4 x 16), and to W's, dw += Σ_r pose[r, :]ᵀ g[r, :]. */
INLINE void NAME(matrix_grads)(VEC g, const REAL *pose, const REAL *wm, REAL *gps, REAL *dw)
{
#if PW >= 4
    const VEC p = NAME(load)(pose), w0 = NAME(load)(wm), w1 = NAME(load)(wm + H),
              w2 = NAME(load)(wm + 2 * H), w3 = NAME(load)(wm + 3 * H);
    VEC gp = NAME(load)(gps), d = NAME(load)(dw);
#define COLUMN(i, c) COLUMN_OF(g, i, c)
#define ROW_TILE(r) SHUFFLE1(g.p[4 * (r) / PW], LANES(TILE_LANE, r))
#define ROW_SPREAD(i, r) SHUFFLE1(p.p[4 * (r) / PW], LANES(SPREAD_LANE, r, i))
#define MATRIX_PART(i, unused)                                                                \
    gp.p[i] = gp.p[i] + COLUMN(i, 0) * w0.p[i] + COLUMN(i, 1) * w1.p[i] +                     \
              COLUMN(i, 2) * w2.p[i] + COLUMN(i, 3) * w3.p[i];                                \
    d.p[i] = d.p[i] + ROW_SPREAD(i, 0) * ROW_TILE(0) + ROW_SPREAD(i, 1) * ROW_TILE(1) +        \
             ROW_SPREAD(i, 2) * ROW_TILE(2) + ROW_SPREAD(i, 3) * ROW_TILE(3);
    EACH_PART(MATRIX_PART, 0)
#undef MATRIX_PART
#undef ROW_SPREAD
#undef ROW_TILE
#undef COLUMN
    NAME(store)(gps, gp);
    NAME(store)(dw, d);
#else /* parts narrower than a matrix row: entry by entry */
    REAL t[H];
    NAME(store)(t, g);
    for (int l = 0; l < H; ++l) { /* gps lane (r, ·), dw lane (k, c): r = k = l / 4, c = l % 4 */
        const int r = l / 4, c = l % 4;
        gps[l] = gps[l] + t[4 * r] * wm[l] + t[4 * r + 1] * wm[H + l] +
                 t[4 * r + 2] * wm[2 * H + l] + t[4 * r + 3] * wm[3 * H + l];
        dw[l] = dw[l] + pose[r] * t[c] + pose[4 + r] * t[4 + c] + pose[8 + r] * t[8 + c] +
                pose[12 + r] * t[12 + c];
    }
#endif
}

/* route_backward: backward of route_forward for one chunk, by hand (the same derivatives PyTorch's autograd
 * takes through routing.routing_iterations; the tests hold the two equal in float64).
 * Recomputes the votes into `votes`/`shift`; reads the forward's tape; g_poses (B·J, 16) and
 * g_logit (B·J) may be NULL. Writes grad_a (B, S), per-row parts of the β gradients
 * (grad_bu, grad_ba: (B·J)) and the gradients of the poses (grad_poses (B, S, 16)), of W and
 * of the offset, the last two per thread (grad_w_threads (threads, S, J, Q·Q), zeroed;
 * grad_off_threads (threads, S, 16), zeroed, or NULL) for the caller to sum.
 * The vote gradient is never stored: every use of the votes is linear in x or x², so
 * dL/dx = x ⊙ Σ_k a_k B_k + Σ_k a_k C_k over 2T − 1 records, slot coefficients coefs[k]
 * (B·J, S) with vcoef/constant (B·J, 2T − 1, 16) (M-step t is record t, E-step t record T + t),
 * and the last M-step pass (t = 0), when all records are known, forms it vote by vote and maps
 * it to the poses and W. wmat: W column-spread (Q = 4: wmat[s, j, c][(r, k)] = W[s, j, k, c])
 * or W itself (Q = 16). Work buffers: rowbuf (B·J, 2·16 + 1), gR (B·J, S), slot (B, S),
 * child (N, C), gp_threads (threads, S, 16). */
static void NAME(backward_impl)(const REAL *poses, const REAL *tiled, const REAL *offset,
                          const REAL *a_in, const REAL *beta_u, const REAL *beta_a,
                          const double *lambdas, int64_t iters, const int64_t *child_index,
                          const REAL *parent_count, int64_t num_children, int64_t N, int64_t L,
                          int64_t S, int64_t J, int64_t Q, double var_floor, double sum_floor,
                          double likelihood_power, const REAL *const *tape,
                          const REAL *g_poses, const REAL *g_logit,
                          REAL *votes, REAL *shift, REAL *rowbuf, REAL *gR, REAL *slot,
                          REAL *child, REAL *const *coefs, REAL *vcoef, REAL *constant,
                          REAL *grad_a, REAL *grad_bu, REAL *grad_ba, const REAL *wmat,
                          int64_t threads, REAL *grad_poses, REAL *grad_w_threads,
                          REAL *grad_off_threads, REAL *gp_threads)
{
    const int64_t B = N * L, rows = B * J, C = num_children, T = iters, K = 2 * iters - 1;
    const int RW = 2 * H + 1; /* rowbuf: g_mu (16), g_var (16), g_logit (1) */
    const int64_t WQ = Q * Q, GQ = Q * H; /* per (slot, type) entries of dW; of wmat */
    const REAL tau = (REAL)likelihood_power; /* ℓ = log a − τ (log norm + quad / 2) */
#pragma omp parallel num_threads(threads)
    {
        const int tid = omp_get_thread_num();
        REAL *dw_t = grad_w_threads + tid * S * J * WQ;
        REAL *doff_t = grad_off_threads ? grad_off_threads + tid * S * H : NULL;
        REAL *gp = gp_threads + tid * S * H; /* this block's dL/dpose, (S, 16) */
        NAME(votes_all)(poses, tiled, offset, S, J, Q, 0, B, votes, shift);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r) {
            REAL *rb = rowbuf + r * RW;
            for (int h = 0; h < H; ++h) {
                rb[h] = g_poses ? g_poses[r * H + h] : 0;
                rb[H + h] = 0;
            }
            rb[2 * H] = g_logit ? g_logit[r] : 0;
            grad_bu[r] = grad_ba[r] = 0;
        }
        for (int64_t t = T - 1; t >= 0; --t) {
            const REAL lam = (REAL)lambdas[t];
            /* M-step t: from (g_mu, g_var, g_logit) of its outputs to g of R_t and a */
#pragma omp for schedule(static)
            for (int64_t b = 0; b < B; ++b) {
                const int64_t l = b % L;
                const REAL *ab = a_in + b * S;
                REAL *ga = grad_a + b * S;
                if (t == T - 1)
                    memset(ga, 0, sizeof(REAL) * S);
                for (int64_t j = 0; j < J; ++j) {
                    const int64_t r = b * J + j;
                    const REAL *assign;
                    REAL *w = coefs[t] + r * S;
                    if (t > 0) {
                        assign = tape[3 * T - 1 + t - 1] + r * S;
                    } else {
                        NAME(initial_assignments)(child_index, parent_count, J, S, l, w);
                        assign = w; /* R_0, overwritten by w below */
                    }
                    REAL A, D, mean[H], vraw[H], var[H], ls;
                    NAME(m_row)(assign, ab, S, tape[t] + r * H, tape[T + t] + r * H, var_floor,
                                sum_floor, &A, &D, mean, vraw, var, &ls);
                    REAL *rb = rowbuf + r * RW;
                    const REAL gl = rb[2 * H];
                    const REAL g_cost = -lam * gl;
                    grad_ba[r] += lam * gl;
                    REAL gA = g_cost * ((REAL)H * beta_u[j] + ls);
                    grad_bu[r] += g_cost * (REAL)H * A;
                    const REAL g_ls = g_cost * A;
                    REAL gS1[H], gS2[H], gD = 0;
                    const REAL *s1 = tape[t] + r * H, *s2 = tape[T + t] + r * H;
                    for (int h = 0; h < H; ++h) {
                        const REAL gv = rb[H + h] + g_ls * (REAL)0.5 / var[h];
                        const REAL gvr = vraw[h] >= 0 ? gv : 0;
                        const REAL gmu = rb[h] - 2 * mean[h] * gvr;
                        gS2[h] = gvr / D;
                        gS1[h] = gmu / D;
                        gD -= (s2[h] * gvr + s1[h] * gmu) / (D * D);
                    }
                    if (A >= (REAL)sum_floor)
                        gA += gD;
                    for (int h = 0; h < H; ++h) {
                        vcoef[(r * K + t) * H + h] = 2 * gS2[h];
                        constant[(r * K + t) * H + h] = gS1[h];
                    }
                    /* g_w[s] = Σ_h x (gS1 + gS2 x) + gA; w = R a */
                    const REAL *v = votes + r * S * H;
                    const VEC c = NAME(load)(shift + r * H), l1 = NAME(load)(gS1),
                              q2 = NAME(load)(gS2);
                    REAL *gr = gR + r * S;
                    for (int64_t s = 0; s < S; s += 16) {
                        REAL form[16];
                        const int64_t n = NAME(row_forms16)(v, c, l1, q2, s, S, form);
                        for (int64_t i = 0; i < n; ++i) {
                            const REAL gw = form[i] + gA, rs = assign[s + i];
                            gr[s + i] = gw * ab[s + i];
                            ga[s + i] += gw * rs;
                            w[s + i] = rs * ab[s + i];
                        }
                    }
                    if (t == 0) { /* every record is known: the vote gradient, vote by vote */
                        if (j == 0)
                            memset(gp, 0, sizeof(REAL) * S * H);
                        const REAL *bk = vcoef + r * K * H, *ck = constant + r * K * H;
                        const REAL *ak[K];
                        for (int64_t k = 0; k < K; ++k)
                            ak[k] = coefs[k] + r * S;
                        for (int64_t s2 = 0; s2 < S; ++s2) {
                            VEC mul = NAME(vzero)(), add = NAME(vzero)();
                            for (int64_t k = 0; k < K; ++k) {
                                mul = NAME(vsfma)(ak[k][s2], NAME(load)(bk + k * H), mul);
                                add = NAME(vsfma)(ak[k][s2], NAME(load)(ck + k * H), add);
                            }
                            const VEC g =
                                NAME(vfma)(NAME(vsub)(NAME(load)(v + s2 * H), c), mul, add);
                            const REAL *pose = poses + (b * S + s2) * H;
                            const REAL *wm = wmat + (s2 * J + j) * GQ;
                            REAL *dw = dw_t + (s2 * J + j) * WQ;
                            if (Q == 4)
                                NAME(matrix_grads)(g, pose, wm, gp + s2 * H, dw);
                            else { /* vector poses: a vote is pose (1 x 16) @ W (16 x 16) */
                                for (int k = 0; k < H; ++k) {
                                    /* dL/dpose[k] += Σ_h g[h] W[k][h];  dW[k][h] += pose[k] g[h] */
                                    gp[s2 * H + k] += NAME(hsum)(NAME(vmul)(g, NAME(load)(wm + k * H)));
                                    NAME(store)(dw + k * H,
                                                NAME(vsfma)(pose[k], g, NAME(load)(dw + k * H)));
                                }
                            }
                            if (doff_t)
                                NAME(store)(doff_t + s2 * H, NAME(vadd)(NAME(load)(doff_t + s2 * H), g));
                        }
                        if (j == J - 1)
                            for (int64_t s2 = 0; s2 < S; ++s2)
                                NAME(store)(grad_poses + (b * S + s2) * H,
                                            NAME(load)(gp + s2 * H));
                    }
                }
            }
            if (t == 0)
                break;
            /* E-step t − 1: R_t = normalise(ℓ); softmax backward g_ℓ = R (g_R − Σ_parents R g_R) */
            const REAL *Rt = tape[3 * T - 1 + t - 1];
#pragma omp for schedule(static)
            for (int64_t b = 0; b < B; ++b) {
                REAL *d = slot + b * S;
                memset(d, 0, sizeof(REAL) * S);
                for (int64_t j = 0; j < J; ++j) {
                    const REAL *rr = Rt + (b * J + j) * S, *gg = gR + (b * J + j) * S;
                    for (int64_t s = 0; s < S; ++s)
                        d[s] += rr[s] * gg[s];
                }
            }
            if (child_index)
                NAME(over_children)(slot, child, child_index, N, L, S, C, 0);
            const REAL lam_prev = (REAL)lambdas[t - 1];
#pragma omp for schedule(static)
            for (int64_t b = 0; b < B; ++b) {
                const REAL *ab = a_in + b * S, *d = slot + b * S;
                const int64_t l = b % L;
                for (int64_t j = 0; j < J; ++j) {
                    const int64_t r = b * J + j;
                    const REAL *assign_prev;
                    if (t - 1 > 0) {
                        assign_prev = tape[3 * T - 1 + t - 2] + r * S;
                    } else {
                        REAL *tmp = coefs[T + t - 1] + r * S; /* R_0 here for a moment */
                        NAME(initial_assignments)(child_index, parent_count, J, S, l, tmp);
                        assign_prev = tmp;
                    }
                    REAL A, D, mean[H], vraw[H], var[H], ls;
                    NAME(m_row)(assign_prev, ab, S, tape[t - 1] + r * H, tape[T + t - 1] + r * H,
                                var_floor, sum_floor, &A, &D, mean, vraw, var, &ls);
                    const REAL logit = lam_prev * (beta_a[j] - A * ((REAL)H * beta_u[j] + ls));
                    REAL iv[H], m[H], Kc = 0;
                    for (int h = 0; h < H; ++h) {
                        iv[h] = (REAL)1 / var[h];
                        m[h] = mean[h] * iv[h];
                        Kc += mean[h] * mean[h] * iv[h];
                    }
                    const REAL *F = tape[2 * T + t - 1] + r * S;
                    const REAL *rr = Rt + r * S, *gg = gR + r * S;
                    REAL *gF = coefs[T + t - 1] + r * S;
                    REAL sum_gl = 0, gK = 0;
                    for (int64_t s = 0; s < S; ++s) {
                        const REAL gl = rr[s] * (gg[s] - d[s]);
                        sum_gl += gl;
                        const REAL gf = F[s] + Kc >= 0 ? (REAL)-0.5 * tau * gl : 0;
                        gF[s] = gf;
                        gK += gf;
                    }
                    /* Σ_s gF x, Σ_s gF x² over the votes */
                    const REAL *v = votes + r * S * H;
                    const VEC c = NAME(load)(shift + r * H);
                    VEC p1 = NAME(vzero)(), p2 = NAME(vzero)();
                    for (int64_t s = 0; s < S; ++s) {
                        const VEC x = NAME(vsub)(NAME(load)(v + s * H), c);
                        const VEC y = NAME(vscale)(gF[s], x);
                        p1 = NAME(vadd)(p1, y);
                        p2 = NAME(vfma)(y, x, p2);
                    }
                    REAL P1[H], P2[H];
                    NAME(store)(P1, p1);
                    NAME(store)(P2, p2);
                    REAL *rb = rowbuf + r * RW;
                    const REAL sig = (REAL)1 / ((REAL)1 + exp(logit)); /* logsigmoid' = σ(−x) */
                    rb[2 * H] = sum_gl * sig;
                    for (int h = 0; h < H; ++h) {
                        const REAL gm = -2 * P1[h];
                        REAL giv = P2[h] + mean[h] * mean[h] * gK + gm * mean[h];
                        rb[h] = 2 * mean[h] * iv[h] * gK + gm * iv[h];
                        rb[H + h] = -tau * sum_gl * (REAL)0.5 / var[h] - giv / (var[h] * var[h]);
                        vcoef[(r * K + T + t - 1) * H + h] = 2 * iv[h];
                        constant[(r * K + T + t - 1) * H + h] = -2 * m[h];
                    }
                }
            }
        }
    }
}

/* route_backward as exported: the arguments of backward_impl, read from the structs. */
void NAME(route_backward)(const emcaps_problem *p, const emcaps_inputs *in,
                          const emcaps_backward_buffers *b)
{
    NAME(backward_impl)(in->poses, in->tiled, in->offset, in->a_in, in->beta_u, in->beta_a,
                        p->lambdas, p->iters, in->child_index, in->parent_count,
                        p->num_children, p->N, p->L, p->S, p->J, p->Q, p->var_floor,
                        p->sum_floor, p->likelihood_power, (const REAL *const *)b->tape,
                        b->g_poses, b->g_logit, b->votes, b->shift, b->rowbuf, b->grad_assign,
                        b->slot, b->child, (REAL *const *)b->coefs, b->vcoef, b->constant,
                        b->grad_a, b->grad_bu, b->grad_ba, b->wmat, b->threads, b->grad_poses,
                        b->grad_w_threads, b->grad_off_threads, b->gp_threads);
}

#undef VEC
#undef PVEC
#undef PIVEC
#undef NP
#undef LANES
#undef EACH_PART
#endif

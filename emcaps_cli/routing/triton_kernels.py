"""EM routing as Triton kernels: votes and Procedure 1 on the GPU, with a hand-written backward.

One program per routing problem (an image n and a parent position l; p = n * L + l) holds all J
parent types of that problem and walks its S child slots in tiles of BLOCK_S, recomputing each
tile's votes from the child poses and W (16 or 4 multiply-adds per vote entry) every time it
needs them, so no vote-sized tensor is ever written to memory:

    v[j, s, (r, c)] = Σ_k pose[s, r·q + k] · W[s, j, k, c] + offset[s, (r, c)]

(q = 4 and 4 rows for matrix poses, q = 16 and one row for vector poses). Per routing problem,
registers hold the (J, 16) M-step statistics; a tile is (BLOCK_J, BLOCK_S, 16).

Forward, one launch per iteration t (exact routing couples the parent positions of an image,
so the next M-step must wait for every position's E-step):

* `_forward_step`: R_t from the previous E-step's logits and per-slot normaliser (uniform
  over each child's parents at t = 0); M-step sums Σ R a, Σ R a v, Σ R a v² over the S tiles;
  μ, σ², the activation logit; then, except after the last M-step, a second pass over the
  tiles writes the E-step logits log(a_j p_j) (N·L, J, S) and their logsumexp over j per slot.
  The first launch also computes the unweighted vote mean per parent (the centring shift).
* `_child_logsumexp` (exact routing only): one program per block of (image, child) pairs
  reduces the slot logsumexps of every (position, slot) holding the child and writes the
  child's normaliser back to each of those slots, so R = exp(logit − normaliser[slot]).

Backward, one launch per iteration from the last to the first (`_backward_step`), each
recomputing the iteration's M-step from the taped E-step logits (three passes over the S
tiles, votes recomputed in each): the E-step's gradient (from the next iteration's dL/dR via
the softmax over each child's parents), the M-step's gradient, and the vote gradient of that
iteration, which is mapped at once to the poses (each program owns its rows), W and the vote
offset (atomic adds into one of GRADIENT_COPIES copies, summed at the end); dL/dR_t and
Σ_j R dL/dR per slot go to the next launch, with `_child_sum` in between for exact routing.
All arithmetic runs in the inputs' dtype: float32 on the GPU (`routing.fused.route` casts
bf16/fp16 up), float64 in the interpreter tests.

The tests run these kernels on CPU tensors under TRITON_INTERPRET=1 against plain autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from emcaps_cli.capsules.votes import POSE_SIZE

# Values per (BLOCK_J, BLOCK_S, 16) tile: at 4,096 and 8 warps no kernel spills registers when
# compiled for sm_90 (ptxas, paper shapes J = 32, S = 288; 16 slots per tile spilled).
TILE_VALUES = 4096
BLOCK_S: int | None = None  # child slots per tile; None: as many as TILE_VALUES allows
# dL/dW and dL/doffset are summed with atomic adds into this many copies (program p adds into
# copy p mod GRADIENT_COPIES, the copies are summed at the end), so that fewer programs contend
# for one address: 16 copies of the paper's largest W gradient are 9.4 MB.
GRADIENT_COPIES = 16
BLOCK_C = 64  # (image, child) pairs per program of the child reductions


# --- device helpers -----------------------------------------------------------------------------


@triton.jit
def _tile_offsets(p, s_idx, j_idx, S, J, Q: tl.constexpr):
    """Offsets of W[s, j, 0, c] (BJ, BS, 16) and pose[s, r·q] (BS, 16) for a tile's vote entries
    h = (r, c); add k·q to the first and k to the second for the k-th term of the product."""
    h_idx = tl.arange(0, 16)
    row, col = h_idx // Q, h_idx % Q
    w_base = s_idx[None, :, None] * (J * Q * Q) + j_idx[:, None, None] * (Q * Q)
    pose_base = p * S * 16 + s_idx[:, None] * 16 + row[None, :] * Q
    return w_base + col[None, None, :], pose_base


@triton.jit
def _votes(poses_ptr, w_ptr, off_ptr, p, s_idx, j_idx, S, J,
           Q: tl.constexpr, HAS_OFFSET: tl.constexpr):  # fmt: skip
    """Votes of one tile: (BLOCK_J, BLOCK_S, 16); zero at padded slots and types."""
    h_idx = tl.arange(0, 16)
    s_ok, j_ok = s_idx < S, j_idx < J
    m2 = s_ok[:, None]
    m3 = j_ok[:, None, None] & s_ok[None, :, None]
    w_base, pose_base = _tile_offsets(p, s_idx, j_idx, S, J, Q)
    acc = tl.zeros((j_idx.shape[0], s_idx.shape[0], 16), dtype=poses_ptr.dtype.element_ty)
    for k in tl.static_range(Q):
        x = tl.load(poses_ptr + pose_base + k, mask=m2, other=0.0)  # (BS, 16): pose[s, r·q + k]
        w = tl.load(w_ptr + w_base + k * Q, mask=m3, other=0.0)  # (BJ, BS, 16): W[s, j, k, c]
        acc += x[None, :, :] * w
    if HAS_OFFSET:
        off = tl.load(off_ptr + s_idx[:, None] * 16 + h_idx[None, :], mask=m2, other=0.0)
        acc += tl.where(j_ok[:, None, None], off[None, :, :], 0.0)
    return acc


@triton.jit
def _assignments(logits_ptr, norm_ptr, init_ptr, p, l, s_idx, j_idx, S, J,
                 FIRST: tl.constexpr):  # fmt: skip
    """R (BLOCK_J, BLOCK_S) of one tile: exp(logit − per-slot normaliser), or the initial R."""
    s_ok, j_ok = s_idx < S, j_idx < J
    m = j_ok[:, None] & s_ok[None, :]
    if FIRST:
        r0 = tl.load(init_ptr + l * S + s_idx, mask=s_ok, other=0.0)  # (BS,)
        r = tl.where(m, r0[None, :] + tl.zeros((j_idx.shape[0], 1), dtype=r0.dtype), 0.0)
    else:
        lg = tl.load(logits_ptr + p * J * S + j_idx[:, None] * S + s_idx[None, :], mask=m, other=0)
        norm = tl.load(norm_ptr + p * S + s_idx, mask=s_ok, other=0.0)  # (BS,)
        r = tl.where(m, tl.exp(lg - norm[None, :]), 0.0)
    return r


@triton.jit
def _m_step_sums(poses_ptr, w_ptr, off_ptr, a_ptr, logits_ptr, norm_ptr, init_ptr, shift,
                 p, l, j_idx, S: tl.constexpr, J, Q: tl.constexpr, HAS_OFFSET: tl.constexpr,
                 FIRST: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
    """Σ_s R a (BJ,), Σ_s R a v (BJ, 16), Σ_s R a v² (BJ, 16) over every tile, v centred."""
    amount = tl.zeros((j_idx.shape[0],), dtype=shift.dtype)
    sum_v = tl.zeros((j_idx.shape[0], 16), dtype=shift.dtype)
    sum_v2 = tl.zeros((j_idx.shape[0], 16), dtype=shift.dtype)
    for s0 in range(0, S, BLOCK_S):
        s_idx = s0 + tl.arange(0, BLOCK_S)
        v = _votes(poses_ptr, w_ptr, off_ptr, p, s_idx, j_idx, S, J, Q, HAS_OFFSET)
        v -= shift[:, None, :]
        a = tl.load(a_ptr + p * S + s_idx, mask=s_idx < S, other=0.0)  # (BS,)
        r = _assignments(logits_ptr, norm_ptr, init_ptr, p, l, s_idx, j_idx, S, J, FIRST)
        weighted = r * a[None, :]  # (BJ, BS)
        amount += tl.sum(weighted, axis=1)
        sum_v += tl.sum(weighted[:, :, None] * v, axis=1)
        sum_v2 += tl.sum(weighted[:, :, None] * v * v, axis=1)
    return amount, sum_v, sum_v2


@triton.jit
def _m_step(amount, sum_v, sum_v2, beta_u, beta_a, lam, var_floor, sum_floor):
    """Procedure 1's M-step from the sums: μ, σ², Σ_h log σ², the activation logit, and the
    divisor and pre-floor variance the backward needs."""
    divisor = tl.maximum(amount, sum_floor)  # (BJ,)
    mean = sum_v / divisor[:, None]  # (BJ, 16)
    raw_var = sum_v2 / divisor[:, None] - mean * mean
    variance = tl.maximum(raw_var, 0.0) + var_floor
    log_var_sum = tl.sum(tl.log(variance), axis=1)  # (BJ,)
    cost = amount * (16 * beta_u + 0.5 * log_var_sum)
    logit = lam * (beta_a - cost)
    return divisor, mean, raw_var, variance, log_var_sum, logit


@triton.jit
def _log_sigmoid(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _e_step_quad(v, mean, inv_var):
    """Σ_h (v − μ)²/σ² expanded as in routing.e_step_logits, before its clamp: (BJ, BS)."""
    mean_inv_var = mean * inv_var
    quad = tl.sum(v * v * inv_var[:, None, :] - 2.0 * v * mean_inv_var[:, None, :], axis=2)
    return quad + tl.sum(mean * mean_inv_var, axis=1)[:, None]


@triton.jit
def _e_step_logits(v, mean, inv_var, log_act, log_norm, power):
    """log(a_j p_j^τ) of one tile (BJ, BS), Procedure 1's E-step (τ = power; 1 in the paper)."""
    quad = tl.maximum(_e_step_quad(v, mean, inv_var), 0.0)
    return log_act[:, None] + power * (-0.5 * quad - log_norm[:, None])


@triton.jit
def _quad_gradient(v, mean, inv_var, logits_ptr, norm_ptr, g_r_ptr, g_sum_ptr, p, s_idx,
                   j_idx, S, J, power):  # fmt: skip
    """dL/d(log a_j p_j) and dL/d(quad) of one tile (BJ, BS each), from the next iteration's
    dL/dR through the softmax over each child's parents: g = R (dL/dR − Σ_parents R dL/dR)."""
    s_ok, j_ok = s_idx < S, j_idx < J
    m = j_ok[:, None] & s_ok[None, :]
    at = p * J * S + j_idx[:, None] * S + s_idx[None, :]
    lg = tl.load(logits_ptr + at, mask=m, other=0.0)
    norm = tl.load(norm_ptr + p * S + s_idx, mask=s_ok, other=0.0)
    g_r = tl.load(g_r_ptr + at, mask=m, other=0.0)
    g_sum = tl.load(g_sum_ptr + p * S + s_idx, mask=s_ok, other=0.0)
    g_logits = tl.where(m, tl.exp(lg - norm[None, :]) * (g_r - g_sum[None, :]), 0.0)
    kept = _e_step_quad(v, mean, inv_var) >= 0.0  # the clamp passes the gradient here
    return g_logits, tl.where(kept, -0.5 * power * g_logits, 0.0)


@triton.jit
def _vote_gradient_to_inputs(g_v, poses_ptr, w_ptr, g_poses_ptr, g_w_ptr, g_off_ptr, p,
                             s_idx, j_idx, S, J, Q: tl.constexpr, ROWS: tl.constexpr,
                             HAS_OFFSET: tl.constexpr):  # fmt: skip
    """Adds a tile's vote gradient g_v (BJ, BS, 16) to dL/dposes (this program's rows),
    dL/dW and dL/doffset (shared with other programs: atomic adds into this program's copy)."""
    h_idx = tl.arange(0, 16)
    s_ok, j_ok = s_idx < S, j_idx < J
    m2 = s_ok[:, None]
    m3 = j_ok[:, None, None] & s_ok[None, :, None]
    w_base, pose_base = _tile_offsets(p, s_idx, j_idx, S, J, Q)
    rows_out = p * S * 16 + s_idx[:, None] * 16 + tl.arange(0, ROWS)[None, :] * Q  # (BS, ROWS)
    gw_base = s_idx[None, :, None] * (J * Q * Q) + j_idx[:, None, None] * (Q * Q)
    gw_cols = gw_base + tl.arange(0, Q)[None, None, :]  # (BJ, BS, Q)
    gw_mask = j_ok[:, None, None] & s_ok[None, :, None]
    for k in tl.static_range(Q):
        w = tl.load(w_ptr + w_base + k * Q, mask=m3, other=0.0)  # (BJ, BS, 16): W[s, j, k, c]
        x = tl.load(poses_ptr + pose_base + k, mask=m2, other=0.0)  # (BS, 16): pose[s, r·q + k]
        # dL/dpose[s, r·q + k] = Σ_j Σ_c g_v[j, s, (r, c)] W[s, j, k, c]
        g_x = tl.sum(tl.reshape(tl.sum(g_v * w, axis=0), (s_idx.shape[0], ROWS, Q)), axis=2)
        old = tl.load(g_poses_ptr + rows_out + k, mask=m2, other=0.0)
        tl.store(g_poses_ptr + rows_out + k, old + g_x, mask=m2)
        # dL/dW[s, j, k, c] = Σ_r pose[s, r·q + k] g_v[j, s, (r, c)]
        g_w = tl.sum(
            tl.reshape(g_v * x[None, :, :], (j_idx.shape[0], s_idx.shape[0], ROWS, Q)), axis=2
        )  # (BJ, BS, Q)
        tl.atomic_add(g_w_ptr + gw_cols + k * Q, g_w, mask=gw_mask)
    if HAS_OFFSET:
        g_off = tl.sum(g_v, axis=0)  # (BS, 16)
        tl.atomic_add(g_off_ptr + s_idx[:, None] * 16 + h_idx[None, :], g_off, mask=m2)


# --- kernels ------------------------------------------------------------------------------------


@triton.jit
def _forward_step(poses_ptr, w_ptr, off_ptr, a_ptr, beta_u_ptr, beta_a_ptr, init_ptr,
                  logits_in_ptr, norm_in_ptr, shift_ptr, logits_out_ptr, lse_out_ptr,
                  mean_out_ptr, logit_out_ptr, S: tl.constexpr, J: tl.constexpr, L, lam,
                  var_floor, sum_floor, power,
                  Q: tl.constexpr, HAS_OFFSET: tl.constexpr, FIRST: tl.constexpr,
                  LAST: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
    """One iteration of Procedure 1 for routing problem p = program_id (see the module doc)."""
    p = tl.program_id(0).to(tl.int64)
    l = p % L
    j_idx = tl.arange(0, BLOCK_J)
    j_ok = j_idx < J
    h_idx = tl.arange(0, 16)
    jh = p * J * 16 + j_idx[:, None] * 16 + h_idx[None, :]  # (BJ, 16) offsets
    if FIRST:  # the unweighted vote mean per parent, the centring shift
        shift = tl.zeros((BLOCK_J, 16), dtype=poses_ptr.dtype.element_ty)
        for s0 in range(0, S, BLOCK_S):
            s_idx = s0 + tl.arange(0, BLOCK_S)
            shift += tl.sum(_votes(poses_ptr, w_ptr, off_ptr, p, s_idx, j_idx, S, J, Q,
                                   HAS_OFFSET), axis=1)  # fmt: skip
        shift = shift / S
        tl.store(shift_ptr + jh, shift, mask=j_ok[:, None])
    else:
        shift = tl.load(shift_ptr + jh, mask=j_ok[:, None], other=0.0)
    beta_u = tl.load(beta_u_ptr + j_idx, mask=j_ok, other=0.0)
    beta_a = tl.load(beta_a_ptr + j_idx, mask=j_ok, other=0.0)
    amount, sum_v, sum_v2 = _m_step_sums(
        poses_ptr, w_ptr, off_ptr, a_ptr, logits_in_ptr, norm_in_ptr, init_ptr, shift, p, l,
        j_idx, S, J, Q, HAS_OFFSET, FIRST, BLOCK_S,
    )  # fmt: skip
    _, mean, _, variance, log_var_sum, logit = _m_step(
        amount, sum_v, sum_v2, beta_u, beta_a, lam, var_floor, sum_floor
    )
    if LAST:
        tl.store(mean_out_ptr + jh, mean + shift, mask=j_ok[:, None])
        tl.store(logit_out_ptr + p * J + j_idx, logit, mask=j_ok)
    else:
        inv_var = 1.0 / variance
        log_act = _log_sigmoid(logit)
        log_norm = 0.5 * log_var_sum + 16 * 0.9189385332046727  # + (H/2) log 2π: H ½ log 2π, H = 16
        for s0 in range(0, S, BLOCK_S):
            s_idx = s0 + tl.arange(0, BLOCK_S)
            s_ok = s_idx < S
            v = _votes(poses_ptr, w_ptr, off_ptr, p, s_idx, j_idx, S, J, Q, HAS_OFFSET)
            v -= shift[:, None, :]
            lg = _e_step_logits(v, mean, inv_var, log_act, log_norm, power)  # (BJ, BS)
            m = j_ok[:, None] & s_ok[None, :]
            tl.store(logits_out_ptr + p * J * S + j_idx[:, None] * S + s_idx[None, :], lg, mask=m)
            lg = tl.where(j_ok[:, None], lg, -float("inf"))
            top = tl.max(lg, axis=0)  # (BS,)
            lse = top + tl.log(tl.sum(tl.exp(lg - top[None, :]), axis=0))
            tl.store(lse_out_ptr + p * S + s_idx, lse, mask=s_ok)


@triton.jit
def _child_logsumexp(lse_ptr, table_ptr, norm_ptr, pairs, C, LS,
                     P: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    """norm[n, slot] = logsumexp of lse[n, slot'] over the slots' holding the same child.

    table (C, P): the flat slots l·S + s of each child, −1 where a child has fewer parents."""
    pair = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BC,) n·C + c
    n, c = pair // C, pair % C
    k = tl.arange(0, P)
    slot = tl.load(table_ptr + c[:, None] * P + k[None, :], mask=(pair < pairs)[:, None], other=-1)
    ok = slot >= 0
    at = n[:, None] * LS + slot
    x = tl.load(lse_ptr + at, mask=ok, other=-float("inf"))  # (BC, P)
    # A child no parent holds (past the last stride step), or a pair past the end: nothing to do.
    held = tl.sum(ok.to(tl.int32), axis=1) > 0
    top = tl.where(held, tl.max(x, axis=1), 0.0)
    total = top + tl.log(tl.where(held, tl.sum(tl.exp(x - top[:, None]), axis=1), 1.0))
    tl.store(norm_ptr + at, total[:, None] + tl.zeros_like(x), mask=ok)


@triton.jit
def _child_sum(x_ptr, table_ptr, out_ptr, pairs, C, LS, P: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[n, slot] = Σ x[n, slot'] over the slots holding the same child (table as above)."""
    pair = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    n, c = pair // C, pair % C
    k = tl.arange(0, P)
    slot = tl.load(table_ptr + c[:, None] * P + k[None, :], mask=(pair < pairs)[:, None], other=-1)
    ok = slot >= 0
    at = n[:, None] * LS + slot
    x = tl.load(x_ptr + at, mask=ok, other=0.0)  # (BC, P)
    tl.store(out_ptr + at, tl.sum(x, axis=1)[:, None] + tl.zeros_like(x), mask=ok)


@triton.jit
def _e_step_gradient(poses_ptr, w_ptr, off_ptr, shift, amount, mean, inv_var, logit,
                     logits_out_ptr, norm_out_ptr, g_r_next_ptr, g_sum_next_ptr, p, j_idx,
                     S: tl.constexpr, J: tl.constexpr, Q: tl.constexpr,
                     HAS_OFFSET: tl.constexpr, BLOCK_S: tl.constexpr, power):  # fmt: skip
    """dL/dμ, dL/dlogit and dL/dσ² (BJ, 16 / BJ / BJ, 16) of an iteration's M-step outputs
    through the next E-step, from the next iteration's dL/dR, Σ over every tile."""
    g_lsum = tl.zeros_like(amount)  # Σ_s dL/dlogits
    g_qsum = tl.zeros_like(amount)  # Σ_s dL/dquad
    g_qv = tl.zeros_like(mean)  # Σ_s dL/dquad v
    g_qv2 = tl.zeros_like(mean)  # Σ_s dL/dquad v²
    for s0 in range(0, S, BLOCK_S):
        s_idx = s0 + tl.arange(0, BLOCK_S)
        v = _votes(poses_ptr, w_ptr, off_ptr, p, s_idx, j_idx, S, J, Q, HAS_OFFSET)
        v -= shift[:, None, :]
        g_logits, g_quad = _quad_gradient(
            v, mean, inv_var, logits_out_ptr, norm_out_ptr, g_r_next_ptr, g_sum_next_ptr,
            p, s_idx, j_idx, S, J, power,
        )  # fmt: skip
        g_lsum += tl.sum(g_logits, axis=1)
        g_qsum += tl.sum(g_quad, axis=1)
        g_qv += tl.sum(g_quad[:, :, None] * v, axis=1)
        g_qv2 += tl.sum(g_quad[:, :, None] * v * v, axis=1)
    # quad = Σ v² iv − 2 Σ v (μ iv) + Σ μ² iv; logits hold −τ log_norm, ½ Σ log σ² + const
    g_inv_var = g_qv2 + g_qsum[:, None] * mean * mean - 2.0 * g_qv * mean
    g_mean = 2.0 * g_qsum[:, None] * mean * inv_var - 2.0 * g_qv * inv_var
    g_logit = g_lsum * (1.0 / (1.0 + tl.exp(logit)))  # d log σ(x)/dx = σ(−x)
    g_var = -g_inv_var * inv_var * inv_var - 0.5 * power * g_lsum[:, None] * inv_var
    return g_mean, g_logit, g_var


@triton.jit
def _m_step_gradient(g_ba_ptr, g_bu_ptr, p, j_idx, J, lam, sum_floor, g_logit, g_var, g_mean,
                     amount, sum_v, sum_v2, divisor, mean, raw_var, inv_var, log_var_sum,
                     beta_u):  # fmt: skip
    """Back through `_m_step`: adds dL/dβ_a and dL/dβ_u to this problem's rows and returns
    dL/dΣ R a v, dL/dΣ R a v² (BJ, 16 each) and dL/dΣ R a (BJ,)."""
    j_ok = j_idx < J
    tl.store(g_ba_ptr + p * J + j_idx, tl.load(g_ba_ptr + p * J + j_idx, mask=j_ok, other=0.0)
             + lam * g_logit, mask=j_ok)  # fmt: skip
    g_cost = -lam * g_logit
    tl.store(g_bu_ptr + p * J + j_idx, tl.load(g_bu_ptr + p * J + j_idx, mask=j_ok, other=0.0)
             + 16 * g_cost * amount, mask=j_ok)  # fmt: skip
    g_var += (0.5 * g_cost * amount)[:, None] * inv_var
    g_amount = g_cost * (16 * beta_u + 0.5 * log_var_sum)
    g_raw = tl.where(raw_var >= 0.0, g_var, 0.0)
    g_sum_v2 = g_raw / divisor[:, None]
    g_mean += -2.0 * mean * g_raw
    g_sum_v = g_mean / divisor[:, None]
    g_div = -tl.sum(g_raw * sum_v2 + g_mean * sum_v, axis=1) / (divisor * divisor)
    g_amount += tl.where(amount >= sum_floor, g_div, 0.0)
    return g_sum_v, g_sum_v2, g_amount


@triton.jit
def _backward_step(poses_ptr, w_ptr, off_ptr, a_ptr, beta_u_ptr, beta_a_ptr, init_ptr,
                   logits_in_ptr, norm_in_ptr, shift_ptr, logits_out_ptr, norm_out_ptr,
                   g_r_next_ptr, g_sum_next_ptr, g_mean_ptr, g_logit_ptr, g_r_ptr, g_rsum_ptr,
                   g_a_ptr, g_bu_ptr, g_ba_ptr, g_poses_ptr, g_w_ptr, g_off_ptr,
                   S: tl.constexpr, J: tl.constexpr, L, copies, lam, var_floor, sum_floor,
                   power, Q: tl.constexpr, ROWS: tl.constexpr, HAS_OFFSET: tl.constexpr,
                   FIRST: tl.constexpr, LAST: tl.constexpr, BLOCK_J: tl.constexpr,
                   BLOCK_S: tl.constexpr):  # fmt: skip
    """The gradient of one iteration of `_forward_step` for routing problem p = program_id.
    Seeds: dL/dμ, dL/dlogit of the outputs (last iteration) or the next iteration's dL/dR and
    Σ_parents R dL/dR per slot. Writes dL/dR_t and Σ_j R_t dL/dR_t per slot (unless first),
    adds to dL/da, dL/dβ (per-problem rows), dL/dposes, dL/dW and dL/doffset."""
    p = tl.program_id(0).to(tl.int64)
    l = p % L
    j_idx = tl.arange(0, BLOCK_J)
    j_ok = j_idx < J
    h_idx = tl.arange(0, 16)
    jh = p * J * 16 + j_idx[:, None] * 16 + h_idx[None, :]
    copy = p % copies  # this program's copy of dL/dW (S, J, q, q) and dL/doffset (S, 16)
    g_w_ptr += copy * (S * J * Q * Q)
    g_off_ptr += copy * (S * 16)
    shift = tl.load(shift_ptr + jh, mask=j_ok[:, None], other=0.0)
    beta_u = tl.load(beta_u_ptr + j_idx, mask=j_ok, other=0.0)
    beta_a = tl.load(beta_a_ptr + j_idx, mask=j_ok, other=0.0)
    # Pass 1: the iteration's M-step, recomputed.
    amount, sum_v, sum_v2 = _m_step_sums(
        poses_ptr, w_ptr, off_ptr, a_ptr, logits_in_ptr, norm_in_ptr, init_ptr, shift, p, l,
        j_idx, S, J, Q, HAS_OFFSET, FIRST, BLOCK_S,
    )  # fmt: skip
    divisor, mean, raw_var, variance, log_var_sum, logit = _m_step(
        amount, sum_v, sum_v2, beta_u, beta_a, lam, var_floor, sum_floor
    )
    inv_var = 1.0 / variance
    if LAST:
        g_mean = tl.load(g_mean_ptr + jh, mask=j_ok[:, None], other=0.0)
        g_logit = tl.load(g_logit_ptr + p * J + j_idx, mask=j_ok, other=0.0)
        g_var = tl.zeros_like(variance)
    else:
        # Pass 2: the E-step's gradient, Σ over the tiles.
        g_mean, g_logit, g_var = _e_step_gradient(
            poses_ptr, w_ptr, off_ptr, shift, amount, mean, inv_var, logit, logits_out_ptr,
            norm_out_ptr, g_r_next_ptr, g_sum_next_ptr, p, j_idx, S, J, Q, HAS_OFFSET,
            BLOCK_S, power,
        )  # fmt: skip
    # The M-step's gradient, on (J, 16) tensors.
    g_sum_v, g_sum_v2, g_amount = _m_step_gradient(
        g_ba_ptr, g_bu_ptr, p, j_idx, J, lam, sum_floor, g_logit, g_var, g_mean, amount,
        sum_v, sum_v2, divisor, mean, raw_var, inv_var, log_var_sum, beta_u,
    )  # fmt: skip
    # Pass 3: dL/dR, dL/da and the vote gradient of this iteration, tile by tile.
    for s0 in range(0, S, BLOCK_S):
        s_idx = s0 + tl.arange(0, BLOCK_S)
        s_ok = s_idx < S
        m = j_ok[:, None] & s_ok[None, :]
        v = _votes(poses_ptr, w_ptr, off_ptr, p, s_idx, j_idx, S, J, Q, HAS_OFFSET)
        v -= shift[:, None, :]
        a = tl.load(a_ptr + p * S + s_idx, mask=s_ok, other=0.0)  # (BS,)
        r = _assignments(logits_in_ptr, norm_in_ptr, init_ptr, p, l, s_idx, j_idx, S, J, FIRST)
        g_weighted = tl.sum(v * g_sum_v[:, None, :] + v * v * g_sum_v2[:, None, :], axis=2)
        g_weighted = tl.where(m, g_weighted + g_amount[:, None], 0.0)  # (BJ, BS)
        old = tl.load(g_a_ptr + p * S + s_idx, mask=s_ok, other=0.0)
        tl.store(g_a_ptr + p * S + s_idx, old + tl.sum(g_weighted * r, axis=0), mask=s_ok)
        if not FIRST:
            g_r = g_weighted * a[None, :]
            tl.store(g_r_ptr + p * J * S + j_idx[:, None] * S + s_idx[None, :], g_r, mask=m)
            tl.store(g_rsum_ptr + p * S + s_idx, tl.sum(r * g_r, axis=0), mask=s_ok)
        weighted = (r * a[None, :])[:, :, None]
        g_v = weighted * g_sum_v[:, None, :] + 2.0 * weighted * v * g_sum_v2[:, None, :]
        if not LAST:
            _, g_quad = _quad_gradient(
                v, mean, inv_var, logits_out_ptr, norm_out_ptr, g_r_next_ptr, g_sum_next_ptr,
                p, s_idx, j_idx, S, J, power,
            )  # fmt: skip
            g_v += g_quad[:, :, None] * (2.0 * v * inv_var[:, None, :]
                                         - 2.0 * (mean * inv_var)[:, None, :])  # fmt: skip
        g_v = tl.where(m[:, :, None], g_v, 0.0)
        _vote_gradient_to_inputs(
            g_v, poses_ptr, w_ptr, g_poses_ptr, g_w_ptr, g_off_ptr, p, s_idx, j_idx, S, J, Q,
            ROWS, HAS_OFFSET,
        )  # fmt: skip


# --- host side ----------------------------------------------------------------------------------


def child_table(index: torch.Tensor, num_children: int) -> torch.Tensor:
    """(L·S,) child id per flat slot -> (C, P) int64: the flat slots holding each child, padded
    with −1 (P = the most parents any child has, rounded up to a power of two)."""
    order = torch.argsort(index, stable=True)  # slots grouped by child
    counts = torch.bincount(index, minlength=num_children)  # (C,)
    width = triton.next_power_of_2(int(counts.max()))
    starts = torch.cumsum(counts, 0) - counts  # (C,)
    rank = torch.arange(index.numel(), device=index.device) - starts[index[order]]
    table = torch.full((num_children, width), -1, dtype=torch.int64, device=index.device)
    table[index[order], rank] = order
    return table


@dataclass
class RoutingProblem:
    """One chunk's routing inputs, flattened to routing problems p = n·L + l.

    child_poses (N, L, S, 16), transforms (S, J, q, q), offset (S, 16) or None, activations_in
    (N, L, S), β (J,), lambdas one inverse temperature per iteration, initial (L, S) the first
    R of each slot, table (C, P) for exact routing (see child_table) or None, the numeric floors
    and the E-step's likelihood power τ."""

    child_poses: torch.Tensor
    transforms: torch.Tensor
    offset: torch.Tensor | None
    activations_in: torch.Tensor
    beta_u: torch.Tensor
    beta_a: torch.Tensor
    lambdas: list[float]
    initial: torch.Tensor
    table: torch.Tensor | None
    var_floor: float
    sum_floor: float
    likelihood_power: float = 1.0  # τ of the E-step, R ∝ a p^τ

    def __post_init__(self) -> None:
        dtype = self.child_poses.dtype
        self.child_poses = self.child_poses.contiguous()
        self.transforms = self.transforms.to(dtype).contiguous()
        if self.offset is not None:
            self.offset = self.offset.to(dtype).contiguous()
        self.activations_in = self.activations_in.to(dtype).contiguous()
        self.beta_u = self.beta_u.to(dtype).contiguous()
        self.beta_a = self.beta_a.to(dtype).contiguous()
        self.initial = self.initial.to(dtype).contiguous()

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """(N, L, S, J, q)."""
        n, l, s, _ = self.child_poses.shape
        return n, l, s, self.transforms.shape[1], self.transforms.shape[2]

    def common(self) -> tuple:
        """The leading arguments both kernels take."""
        off = self.offset if self.offset is not None else self.child_poses  # unread when absent
        return (self.child_poses, self.transforms, off, self.activations_in, self.beta_u,
                self.beta_a, self.initial)  # fmt: skip

    def meta(self) -> dict:
        _, _, s, j, q = self.shape
        block_j = triton.next_power_of_2(j)
        block_s = BLOCK_S or min(max(TILE_VALUES // (block_j * POSE_SIZE), 1),
                                 triton.next_power_of_2(s))  # fmt: skip
        warps = 8 if block_j * block_s * POSE_SIZE >= TILE_VALUES else 4
        return dict(Q=q, HAS_OFFSET=self.offset is not None, BLOCK_J=block_j, BLOCK_S=block_s,
                    num_warps=warps)  # fmt: skip


def _normalisers(problem: RoutingProblem, lse: torch.Tensor) -> torch.Tensor:
    """Per-slot normaliser of R (N·L, S): the slot's own logsumexp over j (patch routing, the
    class layer) or its child's over every parent holding it (exact routing)."""
    if problem.table is None:
        return lse.clone()  # lse is rewritten by the next iteration
    n, l, s, _, _ = problem.shape
    norm = torch.empty_like(lse)
    pairs = n * problem.table.shape[0]
    grid = (triton.cdiv(pairs, BLOCK_C),)
    _child_logsumexp[grid](lse, problem.table, norm, pairs, problem.table.shape[0], l * s,
                           P=problem.table.shape[1], BLOCK_C=BLOCK_C)  # fmt: skip
    return norm


def _group_sums(problem: RoutingProblem, per_slot: torch.Tensor) -> torch.Tensor:
    """Σ over each child's parents of a per-slot quantity (N·L, S), as _normalisers groups."""
    if problem.table is None:
        return per_slot.clone()  # per_slot is rewritten by the next launch
    n, l, s, _, _ = problem.shape
    out = torch.empty_like(per_slot)
    pairs = n * problem.table.shape[0]
    grid = (triton.cdiv(pairs, BLOCK_C),)
    _child_sum[grid](per_slot, problem.table, out, pairs, problem.table.shape[0], l * s,
                     P=problem.table.shape[1], BLOCK_C=BLOCK_C)  # fmt: skip
    return out


def route_forward(
    problem: RoutingProblem, keep_tape: bool
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor] | None]:
    """Votes and Procedure 1 for a chunk: poses (N, L, J, 16), activation logits (N, L, J) and,
    if `keep_tape`, [shift, logits_0, norm_0, …] for route_backward (the E-step logits
    (N·L, J, S) and per-slot normalisers (N·L, S) of every iteration but the last)."""
    n, l, s, j, _ = problem.shape
    poses = problem.child_poses
    shift = poses.new_empty(n * l, j, POSE_SIZE)
    out_mean, out_logit = poses.new_empty(n, l, j, POSE_SIZE), poses.new_empty(n, l, j)
    lse = poses.new_empty(n * l, s)
    iters = len(problem.lambdas)
    spare = [poses.new_empty(n * l, j, s) for _ in range(min(iters - 1, 2))]
    tape: list[torch.Tensor] = [shift]
    logits_in = norm_in = lse  # unread on the first iteration
    for t, lam in enumerate(problem.lambdas):
        last = t == iters - 1
        if last:
            logits_out = lse  # no E-step after the last M-step: unwritten
        elif keep_tape:
            logits_out = poses.new_empty(n * l, j, s)
        else:
            logits_out = spare[t % 2]  # inference: two buffers in turn
        _forward_step[(n * l,)](
            *problem.common(), logits_in, norm_in, shift, logits_out, lse, out_mean, out_logit,
            s, j, l, lam, problem.var_floor, problem.sum_floor, problem.likelihood_power,
            FIRST=t == 0, LAST=last, **problem.meta(),
        )  # fmt: skip
        if not last:
            logits_in, norm_in = logits_out, _normalisers(problem, lse)
            tape += [logits_in, norm_in]
    return out_mean, out_logit, tape if keep_tape else None


def route_backward(
    problem: RoutingProblem,
    tape: list[torch.Tensor],
    grad_poses: torch.Tensor | None,
    grad_logit: torch.Tensor | None,
    need_offset: bool,
):
    """Gradients of route_forward from its tape, for one chunk: (poses (N, L, S, 16),
    transforms (S, J, q, q), activations_in (N, L, S), β_u (J,), β_a (J,), offset (S, 16) or
    None). The votes are recomputed in every pass; their gradient is never stored."""
    n, l, s, j, q = problem.shape
    poses = problem.child_poses
    g_mean = poses.new_zeros(n * l, j, POSE_SIZE) if grad_poses is None else grad_poses
    g_logit = poses.new_zeros(n * l, j) if grad_logit is None else grad_logit
    g_mean = g_mean.to(poses.dtype).contiguous()
    g_logit = g_logit.to(poses.dtype).contiguous()
    g_a = poses.new_zeros(n * l, s)
    g_bu, g_ba = poses.new_zeros(n * l, j), poses.new_zeros(n * l, j)
    g_poses = torch.zeros_like(poses)
    copies = min(GRADIENT_COPIES, n * l)
    g_w = poses.new_zeros(copies, *problem.transforms.shape)  # (copies, S, J, q, q)
    g_off = poses.new_zeros(copies, s, POSE_SIZE)
    g_r_next, g_sum_next = poses.new_zeros(n * l, j, s), poses.new_zeros(n * l, s)
    g_r, g_rsum = poses.new_empty(n * l, j, s), poses.new_empty(n * l, s)
    shift, steps = tape[0], tape[1:]
    iters = len(problem.lambdas)
    for t in reversed(range(iters)):
        first, last = t == 0, t == iters - 1
        # R_t from the E-step before (unread at t = 0), R_{t+1} from this one (unread at the end)
        logits_in, norm_in = (steps[2 * t - 2], steps[2 * t - 1]) if not first else (g_a, g_a)
        logits_out, norm_out = (steps[2 * t], steps[2 * t + 1]) if not last else (g_a, g_a)
        _backward_step[(n * l,)](
            *problem.common(), logits_in, norm_in, shift, logits_out, norm_out,
            g_r_next, g_sum_next, g_mean, g_logit, g_r, g_rsum, g_a, g_bu, g_ba, g_poses,
            g_w, g_off, s, j, l, copies, problem.lambdas[t], problem.var_floor, problem.sum_floor,
            problem.likelihood_power, ROWS=POSE_SIZE // q, FIRST=first, LAST=last, **problem.meta(),
        )  # fmt: skip
        if not first:
            g_r_next, g_r = g_r, g_r_next
            g_sum_next = _group_sums(problem, g_rsum)
    return (
        g_poses,
        g_w.sum(0),
        g_a.view(n, l, s),
        g_bu.sum(0),
        g_ba.sum(0),
        g_off.sum(0) if need_offset else None,
    )

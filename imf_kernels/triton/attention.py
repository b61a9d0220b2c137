"""Triton attention: o = softmax(c q k^T) v, its tangent (DESIGN 4.3) and the FlashAttention-2 backward.

Per query row, s_j = c q.k_j, p = softmax(s): o = sum_j p_j v_j, lse = log sum_j exp(s_j), and with
ds_j = c (dq.k_j + q.dk_j): do = sum_j p_j ds_j v_j - (sum_j p_j ds_j) o + sum_j p_j dv_j.
Memory floor per (b, h), S bytes per element: forward (2 Lq + 2 Lk) D S + 4 Lq (q, k, v in; o, lse out);
forward-with-tangent (4 Lq + 4 Lk) D S + 4 Lq (plus dq, dk, dv in, do out); backward (4 Lq + 4 Lk) D S + 4 Lq
(q, k, v, o, dO, lse in; dq, dk, dv out). Scores and probabilities never leave the chip.

Exponentials are exp2 with log2(e) folded into the scale; lse is stored in natural-log units. Every tl.dot
accumulates in fp32. fp32 inputs get fp32-accurate dots (`input_precision="tf32x3"`, DOT_PRECISION below: three
tensor-core TF32 products of the split operands), as PyTorch's fp32 matmuls: Triton's default single TF32 pass
rounds operands to 10 mantissa bits (~1e-3 error against PyTorch's ~1e-6), and "ieee" (CUDA-core FMAs) spills.
Like PyTorch, one TF32 pass is used when `torch.set_float32_matmul_precision("high")` allows it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from imf_kernels.triton._launch import cdiv, launch_kernel

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)
MAX_LK = 4096
# Contexts up to this many tokens (after padding to a power of two >= 16) may be one tile: no KV loop.
# Cross-attention reads 20-24 tokens.
SHORT_CONTEXT_MAX = 64
MIN_DOT = 16
MAX_GRID_Y = 65535  # CUDA's limit on grid dimension 1, which holds B * H


# tangents on the first m <= B samples: two launches into one output (`imf_kernels.interface`)
TANGENT_ROWS = True
# q, k, v, their tangents and grad_o of any strides, read as they are; o, do and the gradients laid out like their
# inputs (`torch.empty_like`): a channels-first map's (B, heads, L, d) views go in and come out without a copy
STRIDED_INPUTS = True


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _tile_offsets(b, h, rows, cols, stride_b, stride_h, stride_l, stride_d):
    """Element offsets of rows x cols of sample b, head h in a (B, H, L, D) tensor of these strides (64-bit base,
    32-bit offsets within the head)."""
    return b * stride_b + h * stride_h + (rows[:, None] * stride_l + cols[None, :] * stride_d)


@triton.jit
def _fwd_tile(
    q,
    dq,
    k_ptrs,
    v_ptrs,
    dk_ptrs,
    dv_ptrs,
    kv_mask,
    col_valid,
    m_i,
    l_i,
    acc,
    dacc,
    rs,
    qk_scale2,
    scale,
    TANGENT: tl.constexpr,
    HAS_DK: tl.constexpr,
    HAS_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One KV tile of the online softmax: rescale every accumulator by exp2(m_old - m_new), then
    acc += e V, dacc += (e * dS) V + e dV, rs += rowsum(e * dS), with e = exp2(s2 - m_new)."""
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    s2 = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale2
    s2 = tl.where(col_valid[None, :], s2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s2, 1))
    alpha = tl.exp2(m_i - m_new)
    e = tl.exp2(s2 - m_new[:, None])
    l_i = l_i * alpha + tl.sum(e, 1)
    acc = acc * alpha[:, None] + tl.dot(e.to(v.dtype), v, input_precision=DOT_PRECISION)
    if TANGENT:
        ds = tl.dot(dq, tl.trans(k), input_precision=DOT_PRECISION)
        if HAS_DK:
            dk = tl.load(dk_ptrs, mask=kv_mask, other=0.0)
            ds += tl.dot(q, tl.trans(dk), input_precision=DOT_PRECISION)
        e_ds = e * (ds * scale)
        rs = rs * alpha + tl.sum(e_ds, 1)
        dacc = dacc * alpha[:, None] + tl.dot(e_ds.to(v.dtype), v, input_precision=DOT_PRECISION)
        if HAS_DV:
            dv = tl.load(dv_ptrs, mask=kv_mask, other=0.0)
            dacc += tl.dot(e.to(dv.dtype), dv, input_precision=DOT_PRECISION)
    return m_new, l_i, acc, dacc, rs


@triton.jit
def _attn_fwd_kernel(
    Q,
    K,
    V,
    DQ,
    DK,
    DV,
    O,
    DO,
    LSE,
    Lq,
    Lk,
    H,
    qk_scale2,
    scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    TANGENT: tl.constexpr,
    HAS_DK: tl.constexpr,
    HAS_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(Lq, BLOCK_M), B * H). o, lse and, if TANGENT, do for BLOCK_M query rows.
    SINGLE_TILE: the whole context is one BLOCK_N tile (Lk <= BLOCK_N), no KV loop. Every (B, H, L, D) tensor is
    read and written through its own strides (a channels-first map's (B, heads, L, d) view needs no copy)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    row_mask = rows < Lq

    q = tl.load(Q + _tile_offsets(b, h, rows, cols, stride_qb, stride_qh, stride_qm, stride_qd),
                mask=row_mask[:, None], other=0.0)  # fmt: skip
    dq = q
    if TANGENT:
        dq = tl.load(DQ + _tile_offsets(b, h, rows, cols, stride_dqb, stride_dqh, stride_dqm, stride_dqd),
                     mask=row_mask[:, None], other=0.0)  # fmt: skip
    k_ptrs = K + _tile_offsets(b, h, offs_n, cols, stride_kb, stride_kh, stride_kn, stride_kd)
    v_ptrs = V + _tile_offsets(b, h, offs_n, cols, stride_vb, stride_vh, stride_vn, stride_vd)
    dk_ptrs = DK + _tile_offsets(b, h, offs_n, cols, stride_dkb, stride_dkh, stride_dkn, stride_dkd)
    dv_ptrs = DV + _tile_offsets(b, h, offs_n, cols, stride_dvb, stride_dvh, stride_dvn, stride_dvd)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    rs = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dacc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    if SINGLE_TILE:
        # One update from the empty state (alpha = 0): plain softmax over the padded context.
        col_valid = offs_n < Lk
        m_i, l_i, acc, dacc, rs = _fwd_tile(
            q, dq, k_ptrs, v_ptrs, dk_ptrs, dv_ptrs, col_valid[:, None], col_valid,
            m_i, l_i, acc, dacc, rs, qk_scale2, scale, TANGENT, HAS_DK, HAS_DV, DOT_PRECISION,
        )  # fmt: skip
    else:
        for start_n in range(0, Lk, BLOCK_N):
            col_valid = start_n + offs_n < Lk
            m_i, l_i, acc, dacc, rs = _fwd_tile(
                q, dq, k_ptrs + start_n * stride_kn, v_ptrs + start_n * stride_vn, dk_ptrs + start_n * stride_dkn,
                dv_ptrs + start_n * stride_dvn, col_valid[:, None], col_valid,
                m_i, l_i, acc, dacc, rs, qk_scale2, scale, TANGENT, HAS_DK, HAS_DV, DOT_PRECISION,
            )  # fmt: skip

    inv_l = 1.0 / l_i
    o = acc * inv_l[:, None]
    o_off = _tile_offsets(b, h, rows, cols, stride_ob, stride_oh, stride_om, stride_od)
    tl.store(O + o_off, o.to(O.dtype.element_ty), mask=row_mask[:, None])
    # lse (B, H, Lq) contiguous, in natural-log units: log(l * 2^m) = (m + log2 l) * ln 2.
    tl.store(LSE + bh * Lq + rows, (m_i + tl.log2(l_i)) / 1.4426950408889634, mask=row_mask)
    if TANGENT:
        do = (dacc - rs[:, None] * o) * inv_l[:, None]
        do_off = _tile_offsets(b, h, rows, cols, stride_dob, stride_doh, stride_dom, stride_dod)
        tl.store(DO + do_off, do.to(DO.dtype.element_ty), mask=row_mask[:, None])


@triton.jit
def _attn_bwd_delta_kernel(
    O, GRAD_O, DELTA, Lq, H,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """delta = rowsum(dO * O), float32: the softmax backward's row correction."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, HEAD_DIM)
    row_mask = rows < Lq
    o_off = _tile_offsets(b, h, rows, cols, stride_ob, stride_oh, stride_om, stride_od)
    g_off = _tile_offsets(b, h, rows, cols, stride_gb, stride_gh, stride_gm, stride_gd)
    o = tl.load(O + o_off, mask=row_mask[:, None], other=0.0).to(tl.float32)
    grad_o = tl.load(GRAD_O + g_off, mask=row_mask[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + bh * Lq + rows, tl.sum(o * grad_o, 1), mask=row_mask)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    GRAD_O,
    LSE,
    DELTA,
    GRAD_K,
    GRAD_V,
    Lq,
    Lk,
    H,
    qk_scale2,
    scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_gkb, stride_gkh, stride_gkn, stride_gkd,
    stride_gvb, stride_gvh, stride_gvn, stride_gvd,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(Lk, BLOCK_N), B * H): one KV block loops over every query block, in transposed form
    (rows = keys): p^T = exp2(c2 k q^T - lse2), dV = p^T dO, dp^T = V dO^T,
    dK = c (p^T * (dp^T - delta)) Q."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, HEAD_DIM)
    offs_m = tl.arange(0, BLOCK_M)
    key_mask = keys < Lk
    k = tl.load(K + _tile_offsets(b, h, keys, cols, stride_kb, stride_kh, stride_kn, stride_kd),
                mask=key_mask[:, None], other=0.0)  # fmt: skip
    v = tl.load(V + _tile_offsets(b, h, keys, cols, stride_vb, stride_vh, stride_vn, stride_vd),
                mask=key_mask[:, None], other=0.0)  # fmt: skip
    q_ptrs = Q + _tile_offsets(b, h, offs_m, cols, stride_qb, stride_qh, stride_qm, stride_qd)
    g_ptrs = GRAD_O + _tile_offsets(b, h, offs_m, cols, stride_gb, stride_gh, stride_gm, stride_gd)
    grad_k = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    grad_v = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    for start_m in range(0, Lq, BLOCK_M):
        rows = start_m + offs_m
        row_mask = rows < Lq
        q = tl.load(q_ptrs + start_m * stride_qm, mask=row_mask[:, None], other=0.0)
        grad_o = tl.load(g_ptrs + start_m * stride_gm, mask=row_mask[:, None], other=0.0)
        # Padded query rows load q = dO = 0 and lse = +inf: p = 0, so they add nothing to dK, dV.
        lse2 = tl.load(LSE + bh * Lq + rows, mask=row_mask, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + bh * Lq + rows, mask=row_mask, other=0.0)
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale2 - lse2[None, :])
        grad_v += tl.dot(p_t.to(grad_o.dtype), grad_o, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(grad_o), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        grad_k += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)

    gk_off = _tile_offsets(b, h, keys, cols, stride_gkb, stride_gkh, stride_gkn, stride_gkd)
    gv_off = _tile_offsets(b, h, keys, cols, stride_gvb, stride_gvh, stride_gvn, stride_gvd)
    tl.store(GRAD_K + gk_off, (grad_k * scale).to(GRAD_K.dtype.element_ty), mask=key_mask[:, None])
    tl.store(GRAD_V + gv_off, grad_v.to(GRAD_V.dtype.element_ty), mask=key_mask[:, None])


@triton.jit
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    GRAD_O,
    LSE,
    DELTA,
    GRAD_Q,
    Lq,
    Lk,
    H,
    qk_scale2,
    scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_gqb, stride_gqh, stride_gqm, stride_gqd,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(Lq, BLOCK_M), B * H): p = exp2(c2 q k^T - lse2), dp = dO V^T,
    dQ = c (p * (dp - delta)) K."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    row_mask = rows < Lq
    q = tl.load(Q + _tile_offsets(b, h, rows, cols, stride_qb, stride_qh, stride_qm, stride_qd),
                mask=row_mask[:, None], other=0.0)  # fmt: skip
    grad_o = tl.load(GRAD_O + _tile_offsets(b, h, rows, cols, stride_gb, stride_gh, stride_gm, stride_gd),
                     mask=row_mask[:, None], other=0.0)  # fmt: skip
    lse2 = tl.load(LSE + bh * Lq + rows, mask=row_mask, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh * Lq + rows, mask=row_mask, other=0.0)
    k_ptrs = K + _tile_offsets(b, h, offs_n, cols, stride_kb, stride_kh, stride_kn, stride_kd)
    v_ptrs = V + _tile_offsets(b, h, offs_n, cols, stride_vb, stride_vh, stride_vn, stride_vd)
    grad_q = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    for start_n in range(0, Lk, BLOCK_N):
        keys = start_n + offs_n
        key_mask = keys < Lk
        k = tl.load(k_ptrs + start_n * stride_kn, mask=key_mask[:, None], other=0.0)
        v = tl.load(v_ptrs + start_n * stride_vn, mask=key_mask[:, None], other=0.0)
        # Padded keys load k = v = 0: their dp is 0 and their ds column multiplies k = 0, so no mask on p.
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale2 - lse2[:, None])
        dp = tl.dot(grad_o, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        grad_q += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    gq_off = _tile_offsets(b, h, rows, cols, stride_gqb, stride_gqh, stride_gqm, stride_gqd)
    tl.store(GRAD_Q + gq_off, (grad_q * scale).to(GRAD_Q.dtype.element_ty), mask=row_mask[:, None])


# --------------------------------------------------------------------------------------------------------
# Block configurations
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes and launch options of one kernel launch. block_m tiles queries, block_n keys."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    single_tile: bool = False


def dot_precision(dtype: torch.dtype, matmul_precision: str | None = None) -> str:
    """`input_precision` of every tl.dot, following PyTorch's float32 matmul setting as its own matmuls do.

    fp32 operands: "tf32x3" (fp32 accuracy; one TF32 pass costs ~1e-3 relative error where PyTorch's fp32
    attention has ~1e-6) under the default `torch.get_float32_matmul_precision() == "highest"`, one "tf32" pass
    when the user allowed TF32 ("high" or "medium"). fp16/bf16 products are exact in any mode; "tf32" is
    Triton's default.
    """
    if dtype != torch.float32:
        return "tf32"
    if matmul_precision is None:
        matmul_precision = torch.get_float32_matmul_precision()
    return "tf32x3" if matmul_precision == "highest" else "tf32"


FP32_DOT_PRECISIONS = ("tf32x3", "tf32")


def padded_length(n: int, dtype: torch.dtype) -> int:
    """A sequence length padded to a tile side: a power of two, at least MIN_DOT (the smallest tl.dot dimension)
    and at least 32 for fp32: with tf32x3 dots, triton 3.6's backward over a single 16-key tile made an illegal
    memory access on an H200 (2026-11-26; Lk = 4); padded to 32 every test shape passed."""
    minimum = 2 * MIN_DOT if dtype == torch.float32 else MIN_DOT
    return max(minimum, triton.next_power_of_2(n))


# (kind, D, fp32 inputs) -> (BLOCK_M, BLOCK_N of the KV loop, its num_warps, longest padded context taken as
# one tile, that path's num_warps). The largest tiles that compile for sm_90 without register spills
# (`cuobjdump -res-usage` over `aot_specs`, triton 3.8): the tangent pass holds three (BLOCK_M, D) float32
# accumulators plus dq, so it takes narrower tiles than the primal; fp32 operands run "tf32x3" dots (each
# operand split in two), which need the narrowest tiles.
_HALF, _FP32 = False, True
_TILES = {
    **{("fwd", d, _HALF): (64, 64, 4, 64, 8 if d == 128 else 4) for d in HEAD_DIMS},
    **{("fwd", d, _FP32): (64, 32, 4, 64, 8) for d in (16, 32, 64)},
    ("fwd", 128, _FP32): (32, 16, 4, 32, 8),
    **{("jvp", d, _HALF): (64, 32, 4, 64, 4) for d in (16, 32)},
    # from bench/tune_gpu.py on an H200 (bf16, B256): cross-attention (Lq 1024, Lk 24) one 64x32 tile on
    # 4 warps 191 us, on 8 warps 300 us; self-attention (Lq = Lk = 64) a KV loop of 64x32 tiles on 4 warps
    # 62.8 us, one 64x64 tile 71.8 us (4 warps) or 124.9 us (8 warps)
    ("jvp", 64, _HALF): (64, 32, 4, 32, 4),
    ("jvp", 128, _HALF): (64, 16, 4, 16, 4),
    **{("jvp", d, _FP32): (16, 16, 4, 32, 4) for d in (16, 32)},
    ("jvp", 64, _FP32): (16, 16, 4, 32, 4),
    ("jvp", 128, _FP32): (16, 16, 8, 16, 8),
    **{("bwd", d, _HALF): (64, 64, 4, 64, 4) for d in (16, 32, 64)},
    ("bwd", 128, _HALF): (32, 32, 8, 64, 8),
    # The dK/dV and dQ kernels may differ ("bwd_dkdv" / "bwd_dq" entries override "bwd").
    **{("bwd_dkdv", d, _FP32): (16, 64, 4, 64, 4) for d in (16, 32)},
    **{("bwd_dq", d, _FP32): (32, 32, 8, 32, 8) for d in (16, 32)},
    ("bwd", 64, _FP32): (64, 32, 8, 32, 8),
    # q and dO read through their strides (a channels-first map's views, unit stride along the queries) took the
    # 64-query dK/dV tile to 255 registers, and 8 bytes of stack with triton 3.6's single-TF32 dots (104-180 for
    # contiguous inputs)
    ("bwd_dkdv", 64, _FP32): (32, 32, 8, 32, 8),
    ("bwd", 128, _FP32): (32, 32, 8, 32, 8),
}


# pick_config's answers by its arguments (the rule costs ~5 us of Python per launch; `_TILES` is constant)
_picked: dict[tuple, BlockConfig] = {}


def pick_config(kind: str, Lq: int, Lk: int, D: int, dtype: torch.dtype, *, kv_loop: bool | None = None) -> BlockConfig:
    """Deterministic tiles for `kind` in {"fwd", "jvp", "bwd_dkdv", "bwd_dq"} from the `_TILES` table.

    `kv_loop=None` takes the single-tile path when the context padded to a power of two >= 16 fits one tile;
    True/False forces the choice (tests use True to run the online-softmax loop at small Lk). The backward
    kernels always loop (dK/dV over query blocks, dQ over KV blocks); a short context is one KV block there.
    """
    key = (kind, Lq, Lk, D, dtype, kv_loop)
    cfg = _picked.get(key)
    if cfg is None:
        cfg = _picked[key] = _pick_config(kind, Lq, Lk, D, dtype, kv_loop)
    return cfg


def _pick_config(kind: str, Lq: int, Lk: int, D: int, dtype: torch.dtype, kv_loop: bool | None) -> BlockConfig:
    if kind not in ("fwd", "jvp", "bwd_dkdv", "bwd_dq"):
        raise ValueError(f"attention (triton): unknown kernel kind {kind!r}")
    if D not in HEAD_DIMS:
        raise ValueError(f"attention (triton): head dim D={D} not in {HEAD_DIMS}")
    fp32 = dtype == torch.float32
    block_m, loop_n, loop_warps, single_max, single_warps = _TILES.get((kind, D, fp32)) or _TILES[(kind[:3], D, fp32)]
    padded_lk = padded_length(Lk, dtype)
    block_m = min(block_m, padded_length(Lq, dtype))
    single = padded_lk <= single_max if kv_loop is None else not kv_loop
    if kind.startswith("bwd"):
        block_n = padded_lk if single else min(loop_n, padded_lk)
        return BlockConfig(block_m, block_n, single_warps if single else loop_warps, 2)
    if single:
        if padded_lk > SHORT_CONTEXT_MAX:
            raise ValueError(f"attention (triton): Lk={Lk} is too long for the single-tile path")
        # No loop, nothing to pipeline.
        return BlockConfig(block_m, padded_lk, single_warps, 1, single_tile=True)
    return BlockConfig(block_m, min(loop_n, padded_lk), loop_warps, 2)


def check_config(cfg: BlockConfig, D: int, Lk: int) -> None:
    """The GPU's rules the interpreter does not enforce: every tl.dot dimension >= 16, power-of-2 blocks."""
    for name, value in (("BLOCK_M", cfg.block_m), ("BLOCK_N", cfg.block_n), ("head dim D", D)):
        if value < MIN_DOT:
            raise ValueError(
                f"attention (triton): {name}={value} < {MIN_DOT}: every tl.dot dimension must be >= {MIN_DOT} on a GPU"
            )
        if value & (value - 1):
            raise ValueError(f"attention (triton): {name}={value} is not a power of two")
    if cfg.single_tile and Lk > cfg.block_n:
        raise ValueError(f"attention (triton): single-tile path needs Lk={Lk} <= BLOCK_N={cfg.block_n}")


# --------------------------------------------------------------------------------------------------------
# Launchers (imf_kernels.interface)
# --------------------------------------------------------------------------------------------------------


def _like(t: torch.Tensor) -> torch.Tensor:
    """An empty dense tensor of t's shape and dtype with t's order of dims in memory (`torch.empty_like` keeps it
    only for dense t; a k that is a channels-first map's view with v beside it is not): a gradient laid out so,
    transposed back to the map, is a view."""
    out = torch.empty_like(t)
    if out.stride() == t.stride():  # t was dense
        return out
    order = sorted(range(t.dim()), key=lambda dim: -t.stride(dim))  # outermost first
    dense = torch.empty([t.shape[dim] for dim in order], dtype=t.dtype, device=t.device)
    return dense.permute([order.index(dim) for dim in range(t.dim())])


def _strides(*tensors: torch.Tensor) -> tuple[int, ...]:
    """The stride arguments of a kernel, in the order of its tensors: (B, H, L, D) strides of each."""
    return sum((tensor.stride() for tensor in tensors), ())


def _launch_fwd(q, k, v, dq, dk, dv, scale: float, cfg: BlockConfig, o=None, lse=None):
    """One launch; o and lse (optional) are buffers to write into, e.g. rows of a larger batch's outputs."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    check_config(cfg, D, Lk)
    tangent = dq is not None
    o = _like(q) if o is None else o
    lse = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32) if lse is None else lse
    do = _like(q) if tangent else o
    grid = (cdiv(Lq, cfg.block_m), B * H)
    # Absent tangents are never read (constexpr flags); any tensor of the right dtype fills their slot.
    has_dk, has_dv = dk is not None, dv is not None
    dq, dk, dv = dq if tangent else q, dk if has_dk else k, dv if has_dv else v
    launch_kernel(_attn_fwd_kernel, grid,
        q, k, v, dq, dk, dv, o, do, lse, Lq, Lk, H, scale * LOG2E, scale, *_strides(q, k, v, dq, dk, dv, o, do),
        HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SINGLE_TILE=cfg.single_tile,
        TANGENT=tangent, HAS_DK=has_dk, HAS_DV=has_dv, DOT_PRECISION=dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return o, (do if tangent else None), lse


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """o = softmax(scale q k^T) v and lse (B, H, Lq) float32."""
    cfg = pick_config("fwd", q.shape[2], k.shape[2], q.shape[3], q.dtype)
    o, _, lse = _launch_fwd(q, k, v, None, None, None, scale, cfg)
    return o, lse


def attention_jvp_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dq: torch.Tensor,
    dk: torch.Tensor | None,
    dv: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, do, lse) in one pass; dk/dv None mean zero tangents. With tangents on the first m < B samples only
    (TANGENT_ROWS): the jvp kernel on those rows and the primal kernel on the rest, into one o and lse."""
    B, _, Lq, D = q.shape
    Lk, rows = k.shape[2], dq.shape[0]
    cfg = pick_config("jvp", Lq, Lk, D, q.dtype)
    if rows == B:
        return _launch_fwd(q, k, v, dq, dk, dv, scale, cfg)
    o = _like(q)
    lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    _, do, _ = _launch_fwd(q[:rows], k[:rows], v[:rows], dq, dk, dv, scale, cfg, o[:rows], lse[:rows])
    primal_cfg = pick_config("fwd", Lq, Lk, D, q.dtype)
    _launch_fwd(q[rows:], k[rows:], v[rows:], None, None, None, scale, primal_cfg, o[rows:], lse[rows:])
    return o, do, lse


def _launch_bwd(grad_o, q, k, v, o, lse, scale: float, cfg_dkdv: BlockConfig, cfg_dq: BlockConfig):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    check_config(cfg_dkdv, D, Lk)
    check_config(cfg_dq, D, Lk)
    delta = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    grad_q, grad_k, grad_v = _like(q), _like(k), _like(v)
    launch_kernel(_attn_bwd_delta_kernel, (cdiv(Lq, cfg_dq.block_m), B * H),
        o, grad_o, delta, Lq, H, *_strides(o, grad_o),
        HEAD_DIM=D, BLOCK_M=cfg_dq.block_m, num_warps=cfg_dq.num_warps, num_stages=1,
    )  # fmt: skip
    launch_kernel(_attn_bwd_dkdv_kernel, (cdiv(Lk, cfg_dkdv.block_n), B * H),
        q, k, v, grad_o, lse, delta, grad_k, grad_v, Lq, Lk, H, scale * LOG2E, scale,
        *_strides(q, k, v, grad_o, grad_k, grad_v),
        HEAD_DIM=D, BLOCK_M=cfg_dkdv.block_m, BLOCK_N=cfg_dkdv.block_n, DOT_PRECISION=dot_precision(q.dtype),
        num_warps=cfg_dkdv.num_warps, num_stages=cfg_dkdv.num_stages,
    )  # fmt: skip
    launch_kernel(_attn_bwd_dq_kernel, (cdiv(Lq, cfg_dq.block_m), B * H),
        q, k, v, grad_o, lse, delta, grad_q, Lq, Lk, H, scale * LOG2E, scale, *_strides(q, k, v, grad_o, grad_q),
        HEAD_DIM=D, BLOCK_M=cfg_dq.block_m, BLOCK_N=cfg_dq.block_n, DOT_PRECISION=dot_precision(q.dtype),
        num_warps=cfg_dq.num_warps, num_stages=cfg_dq.num_stages,
    )  # fmt: skip
    return grad_q, grad_k, grad_v


def attention_bwd(
    grad_o: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_q, grad_k, grad_v) of the primal from the saved lse, FlashAttention-2 style, no atomics."""
    Lq, Lk, D = q.shape[2], k.shape[2], q.shape[3]
    cfg_dkdv = pick_config("bwd_dkdv", Lq, Lk, D, q.dtype)
    cfg_dq = pick_config("bwd_dq", Lq, Lk, D, q.dtype)
    return _launch_bwd(grad_o, q, k, v, o, lse, scale, cfg_dkdv, cfg_dq)


def not_supported_reasons(op: str, args: dict) -> list[str]:
    """Why the Triton launchers cannot take this call, in words; empty when they can."""
    if op not in ("attention", "attention_jvp"):
        return [f"{op}: not an attention op"]
    q, k = args["q"], args["k"]
    reasons = []
    interpreted = _interpreted()
    dtypes = (torch.float32, torch.float16) if interpreted else (torch.float32, torch.float16, torch.bfloat16)
    if q.dtype not in dtypes:
        where = "the Triton interpreter" if interpreted else "triton"
        reasons.append(f"{op}: dtype {q.dtype} not supported by {where} (accepts {', '.join(map(str, dtypes))})")
    if q.device.type != "cuda" and not (interpreted and q.device.type == "cpu"):
        reasons.append(f"{op}: device {q.device} needs CUDA (or TRITON_INTERPRET=1 for CPU tensors)")
    if q.shape[-1] not in HEAD_DIMS:
        reasons.append(f"{op}: head dim D={q.shape[-1]} not in {HEAD_DIMS} supported by triton")
    if k.shape[2] > MAX_LK:
        reasons.append(f"{op}: Lk={k.shape[2]} > {MAX_LK} supported by triton")
    if q.shape[2] == 0 or k.shape[2] == 0:
        reasons.append(f"{op}: empty sequence (Lq={q.shape[2]}, Lk={k.shape[2]}) not supported by triton")
    if q.shape[0] * q.shape[1] > MAX_GRID_Y:
        reasons.append(f"{op}: B * H = {q.shape[0] * q.shape[1]} > {MAX_GRID_Y} supported by triton")
    return reasons


# --------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (static GPU evidence without a GPU)
# --------------------------------------------------------------------------------------------------------

# (Lq, Lk, D) of the attention layers of the `latent-b` (D = 64) and `cifar` (D = 32 or 64) presets:
# cross-attention at 32x32, 16x16 and 8x8 reads the 20 or 24 context tokens; self-attention at 16x16 and 8x8.
AOT_SHAPES = (
    *[(lq, lk, d) for d in (32, 64) for lq in (1024, 256, 64) for lk in (20, 24)],
    *[(lq, lq, d) for d in (32, 64) for lq in (256, 64)],
)

_TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _model_layouts(Lq: int, Lk: int, D: int, dtype: torch.dtype, batch: int = 2, heads: int = 4):
    """q, k, v (meta tensors) laid out as the U-Net's attention blocks give them (`imf.model.AttnBlock.fused`): q a
    channels-first map's (B, heads, L, d) view; self-attention (Lk = Lq) k and v the two halves of one such map,
    cross-attention (the context's Lk tokens) contiguous."""
    channels = heads * D
    q = torch.empty(batch, channels, Lq, dtype=dtype, device="meta").view(batch, heads, D, Lq).transpose(-1, -2)
    if Lk == Lq:
        kv = torch.empty(batch, 2 * channels, Lk, dtype=dtype, device="meta")
        k, v = (part.view(batch, heads, D, Lk).transpose(-1, -2) for part in kv.chunk(2, dim=1))
    else:
        k, v = torch.empty(2, batch, heads, Lk, D, dtype=dtype, device="meta").unbind(0)
    return q, k, v


def aot_specs(
    shapes: tuple[tuple[int, int, int], ...] = AOT_SHAPES,
    dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float32),
) -> list[dict]:
    """Every kernel launch the launchers pick for these (Lq, Lk, D) shapes and dtypes, with q, k, v laid out as
    the model gives them (`_model_layouts`), deduplicated, as
    {"name", "fn", "signature", "constexprs", "num_warps", "num_stages", "divisible_by_16"}. Each compiles for
    sm_90 with `triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
    options={"num_warps", "num_stages"})`, where attrs marks the `divisible_by_16` arguments with
    [["tt.divisibility", 16]]; the signature names every argument, constexprs as "constexpr" (triton 3.6 and
    3.8 take the same format). fp16 is left out by default: it picks exactly the tiles of bf16."""
    specs: dict[tuple, dict] = {}

    def add(name, fn, pointers, ints, floats, constexprs, cfg):
        """ints by name: as the JIT specialises them, 1 a constexpr, a multiple of 16 marked divisible."""
        kinds = {**pointers, **floats}
        kinds.update(
            {arg: ("i32" if -(2**31) <= value < 2**31 else "i64") for arg, value in ints.items() if value != 1}
        )
        constexprs = {**{arg: 1 for arg, value in ints.items() if value == 1}, **constexprs}
        signature = {arg: kinds.get(arg, "constexpr") for arg in fn.arg_names}
        key = (name, tuple(signature.items()), tuple(constexprs.items()), cfg.num_warps, cfg.num_stages)
        specs[key] = {
            "name": name,
            "fn": fn,
            "signature": signature,
            "constexprs": constexprs,
            "num_warps": cfg.num_warps,
            "num_stages": cfg.num_stages,
            # torch allocations are 16-byte aligned, and the JIT specialises such pointers the same way.
            "divisible_by_16": [*pointers, *(arg for arg, value in ints.items() if value != 1 and value % 16 == 0)],
        }

    def int_args(fn, values, **named):
        """The kernel's stride arguments (in order) with these values, and the named ints."""
        return {**named, **dict(zip([arg for arg in fn.arg_names if arg.startswith("stride_")], values, strict=True))}

    for Lq, Lk, D in shapes:
        for dtype, precision in [
            (each, precision)
            for each in dtypes
            for precision in (FP32_DOT_PRECISIONS if each == torch.float32 else (dot_precision(each),))
        ]:
            ptr = "*" + _TRITON_TYPE[dtype]
            q, k, v = _model_layouts(Lq, Lk, D, dtype)
            o = _like(q)
            scalars = {"qk_scale2": "fp32", "scale": "fp32"}
            lengths = dict(Lq=Lq, Lk=Lk, H=q.shape[1])
            fwd_ptrs = {a: ptr for a in ("Q", "K", "V", "DQ", "DK", "DV", "O", "DO")}
            fwd_ptrs.update(LSE="*fp32")
            for kind, flags in (("fwd", [(False, False, False)]), ("jvp", _JVP_FLAGS)):
                cfg = pick_config(kind, Lq, Lk, D, dtype)
                check_config(cfg, D, Lk)
                fwd_ints = int_args(_attn_fwd_kernel, _strides(q, k, v, q, k, v, o, o), **lengths)
                for tangent, has_dk, has_dv in flags:
                    constexprs = dict(
                        HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SINGLE_TILE=cfg.single_tile,
                        TANGENT=tangent, HAS_DK=has_dk, HAS_DV=has_dv, DOT_PRECISION=precision,
                    )  # fmt: skip
                    add(f"attn_{kind}", _attn_fwd_kernel, fwd_ptrs, fwd_ints, scalars, constexprs, cfg)
            cfg_dkdv = pick_config("bwd_dkdv", Lq, Lk, D, dtype)
            cfg_dq = pick_config("bwd_dq", Lq, Lk, D, dtype)
            check_config(cfg_dkdv, D, Lk)
            check_config(cfg_dq, D, Lk)
            grad_o = o  # the gradient of a channels-first map's view arrives laid out like o
            add(
                "attn_bwd_delta",
                _attn_bwd_delta_kernel,
                {"O": ptr, "GRAD_O": ptr, "DELTA": "*fp32"},
                int_args(_attn_bwd_delta_kernel, _strides(o, grad_o), Lq=Lq, H=q.shape[1]),
                {},
                dict(HEAD_DIM=D, BLOCK_M=cfg_dq.block_m),
                BlockConfig(cfg_dq.block_m, cfg_dq.block_n, cfg_dq.num_warps, 1),
            )
            bwd_ptrs = {a: ptr for a in ("Q", "K", "V", "GRAD_O")}
            bwd_ptrs.update(LSE="*fp32", DELTA="*fp32")
            dkdv_ints = int_args(_attn_bwd_dkdv_kernel, _strides(q, k, v, grad_o, _like(k), _like(v)), **lengths)
            dq_ints = int_args(_attn_bwd_dq_kernel, _strides(q, k, v, grad_o, _like(q)), **lengths)
            for name, fn, pointers, ints, cfg in (
                (
                    "attn_bwd_dkdv",
                    _attn_bwd_dkdv_kernel,
                    {**bwd_ptrs, "GRAD_K": ptr, "GRAD_V": ptr},
                    dkdv_ints,
                    cfg_dkdv,
                ),
                ("attn_bwd_dq", _attn_bwd_dq_kernel, {**bwd_ptrs, "GRAD_Q": ptr}, dq_ints, cfg_dq),
            ):
                constexprs = dict(HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DOT_PRECISION=precision)
                add(name, fn, pointers, ints, scalars, constexprs, cfg)
    return list(specs.values())


# (TANGENT, HAS_DK, HAS_DV) combinations the tangent launcher can pick.
_JVP_FLAGS = [(True, has_dk, has_dv) for has_dk in (True, False) for has_dv in (True, False)]

"""Triton kernels for pushdown attention (FlashAttention-2 style, forward and backward).

Score of query t and key j <= t (causal, queries aligned to the end of the keys):

    score(t, j) = scale * (q_t . k_j + q_t . E[idx(t, j)]),   idx = min(S(t, j), V-1)  or  [S > 0]

In a general tile the depth term is a register gather from QE = q_blk . E^T ([BM, V_pad]); in a
row-uniform tile (below) it is one more dot. Nothing of size T x T (or T x T x D) is materialized.

The stack tape S comes either dense (an int tile [Tq, Tk]) or compact: per token a depth D_j and a
boundary c_k, with S(t, j) = D_j - min_{j <= k <= t} c_k regenerated in-kernel. Negative values
(impossible for a valid tape, c_k <= D_k, which StackTape checks) are clamped to 0.

Key tiles are walked with their columns in *reversed* order (column r is key n0 + BN - 1 - r): a
forward min-scan along the columns is then the suffix minimum over keys, which is what the tape
needs, without relying on a reverse scan. Attention sums over keys, so their order is free.

    min_{j <= k <= t} c_k = min( suffix-min of c inside the key tile from j (keys <= t only),
                                 R[t] = min of c over keys right of the tile, up to t )

Forward and the dq pass visit key tiles right to left, so R[t] is a running per-row minimum; the
dk/dv pass visits query blocks top to bottom, so R[t] is one running scalar (the gap between the
key tile and the query block) plus a prefix-min scan over the query block. Tiles strictly below the
diagonal need only a 1-D scan over the key tile; diagonal tiles a 2-D scan.

Row-uniform tiles (FASTMODELS_PUSHDOWN_UNIFORM, on by default): R[t] is nonincreasing in t, and
when it is equal on the first and last row of a full tile, every row of that tile has the same S
row, idx_j. The depth term is then q_t . E[idx_j]: one more dot, q @ E[idx]^T, with the table rows
gathered once per key, and no per-element tape, gather or histogram work (the dq pass's histogram
becomes ds @ onehot(idx)). In the query-stationary passes these tiles are the leftmost ones of a
row block (_uniform_p finds where they end), so they get their own loop; the dk/dv pass tests each
tile. Far from the diagonal most tiles qualify: on the benchmark's random trees, 87% of the full
64 x 64 tiles at T = 4096 and 64% at T = 1024.

Backward (dS = P * (dP - delta), delta = rowsum(dO * O)):
  * dk, dv: key-stationary;
  * dq and the depth-gradient histogram Hist[t, v] = sum_j dS[t, j] [idx(t, j) = v]: query-stationary,
    each program owns its rows, so no atomics: dq += Hist @ E in-kernel, and each program writes
    its partial dE = Hist^T @ q_blk to its own slot of a buffer that is summed afterwards.
  The histogram of a row-uniform tile is one dot (above); of other full compact tiles, two dots
  (_histogram_full; FASTMODELS_PUSHDOWN_HIST=loop for the loop); of diagonal and dense tiles, a
  loop over the depth values present in the tile (min..max of its indices; a select for binary
  tapes). QE is computed once per query row by a small preprocess kernel (with delta, and the
  row-uniform split of each dq row block) and read back by both passes.

Dtypes: q, k, v, dO and E are fed to tl.dot in q's dtype on GPU (fp16/bf16 tensor cores; fp32 with
D <= 64 as three TF32 tensor-core products, "tf32x3", about fp32's accuracy, or as one, "tf32",
after torch.set_float32_matmul_precision("high" or "medium"), and with D > 64 as "ieee"; see
_fp32_precision); under TRITON_INTERPRET=1 every dot operand is upcast to fp32 first (the
interpreter computes bf16 dots on raw bit patterns). Accumulators, softmax statistics and QE are
fp32.
Layout: q, k, v contiguous [B, H, T, D]; E [H, V, D] with any strides (a stride-0 head axis from
expanding a shared [V, D] table works); tapes are made contiguous int32 (compact) or kept in
their integer dtype (dense).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._host import LAUNCH_OPTIONS, MAX_GRID_YZ, cdiv, interpreting, next_power_of_2, on_tensor_device
from ._tuning import gpu_configs

__all__ = ["pushdown_attention_fwd", "pushdown_attention_bwd"]

INTERPRET = interpreting()
# "No boundary" marker for masked-out tape entries (any value above every real c_k).
_BIG = tl.constexpr(2**30)
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# Query-block size of the dq pass; fixed (not autotuned) because the per-program dE partial
# buffer is sized by it before launch.
_DQ_BM = 16 if INTERPRET else 64
# Chunk of boundaries per step of the leftward scan in _uniform_p (small under the
# interpreter so that tests take several steps).
_SCAN = tl.constexpr(16 if INTERPRET else 256)


def _configs(pairs):
    """Autotune grid: one small config under the interpreter, the GPU grid otherwise (its first
    entry alone with FASTMODELS_AUTOTUNE=0)."""
    if INTERPRET:
        return [triton.Config({"BM": 16, "BN": 16}, num_warps=1, num_stages=1)]
    return gpu_configs([triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in pairs])


# GPU tile grids: (BM, BN, num_warps, num_stages); (BN, num_warps) for the dq pass.
FWD_TILES = ((64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2))
DKDV_TILES = ((32, 64, 4, 2), (64, 64, 4, 2), (32, 128, 4, 2), (64, 128, 8, 2))
# The dq pass keeps its BN = 32 / 4-warp tile only: on an H200 (triton 3.6, 2026-11-26) the
# autotuned dq pass (grid BN in {32, 64}, 4 or 8 warps) gave 6% dq and 15% dE errors at T = 512
# (D = 64 and 128) and T = 1024 (D = 64) (bench/results/cuda.jsonl), while this tile, the one the
# GPU tests ran, was right; every grid tile is right under the interpreter, so the fault is in
# compiled code. tests/test_pushdown_kernels.py::test_every_tile_config checks each tile at a
# benchmark-like length on a GPU.
DQ_TILES = ((32, 4),)
_FWD_CONFIGS = _configs(FWD_TILES)
_DKDV_CONFIGS = _configs(DKDV_TILES)
_DQ_CONFIGS = (
    [triton.Config({"BN": 16}, num_warps=1, num_stages=1)]
    if INTERPRET
    else gpu_configs([triton.Config({"BN": bn}, num_warps=w, num_stages=2) for bn, w in DQ_TILES])
)
# T_BUCKET (the key length rounded up to a power of two) is an unused launch argument: it keys
# the autotuner, so short and long sequences get their own tile sizes without retuning per length.
_KEY = ["BD", "VP", "COMPACT", "BINARY", "T_BUCKET", "UNIFORM"]  # UNIFORM: the bench times both paths


# ---------------------------------------------------------------------------------------------
# Small device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _min_combine(a, b):
    return tl.minimum(a, b)


@triton.jit
def _mm(x, ref_ptr, FP32_DOT: tl.constexpr):
    """tl.dot operand: the input dtype on GPU (tensor cores), fp32 under the interpreter (which
    computes bf16 dots on raw bit patterns)."""
    if FP32_DOT:
        y = x.to(tl.float32)
    else:
        y = x.to(ref_ptr.dtype.element_ty)
    return y


@triton.jit
def _depth_index(S, V, BINARY: tl.constexpr):
    """Row of E used by tape value S: [S > 0] (binary) or S clamped to [0, V-1]."""
    if BINARY:
        idx = tl.minimum((S > 0).to(tl.int32), V - 1)
    else:
        idx = tl.minimum(tl.maximum(S, 0), V - 1)
    return idx


@triton.jit
def _gather_bias(b_qe, idx, BINARY: tl.constexpr, VP: tl.constexpr):
    """bias[t, j] = QE[t, idx[t, j]]: a register gather (a select between two columns if binary)."""
    if BINARY:
        o_v = tl.arange(0, VP)
        qe0 = tl.sum(tl.where(o_v[None, :] == 0, b_qe, 0.0), axis=1)
        qe1 = tl.sum(tl.where(o_v[None, :] == 1, b_qe, 0.0), axis=1)
        bias = tl.where(idx > 0, qe1[:, None], qe0[:, None])
    else:
        bias = tl.gather(b_qe, idx, axis=1)
    return bias


@triton.jit
def _tape_tile_qstat(dep, bnd, dense, b, o_m, o_t, o_n, m_m, m_n, R, Tq, Tk,
                     COMPACT: tl.constexpr, MASKED: tl.constexpr):
    """S tile [BM, BN] for the query-stationary passes (key tiles visited right to left).
    R[t] = min c_k over the keys already visited (right of this tile) with k <= t."""
    if COMPACT:
        c = tl.load(bnd + b * Tk + o_n, mask=m_n, other=_BIG)
        dj = tl.load(dep + b * Tk + o_n, mask=m_n, other=0)
        if MASKED:
            x = tl.where(o_n[None, :] <= o_t[:, None], c[None, :], _BIG)
            minc = tl.minimum(tl.associative_scan(x, 1, _min_combine), R[:, None])
            R = tl.minimum(R, tl.min(x, axis=1))
        else:
            # every key of the tile is <= every query: one 1-D suffix-min scan
            minc = tl.minimum(tl.associative_scan(c, 0, _min_combine)[None, :], R[:, None])
            R = tl.minimum(R, tl.min(c, axis=0))
        S = dj[None, :] - minc
    else:
        p_s = dense + (b * Tq + o_m[:, None]) * Tk + o_n[None, :]
        if MASKED:
            m_s = m_m[:, None] & m_n[None, :] & (o_n[None, :] <= o_t[:, None])
        else:
            m_s = m_m[:, None]
        S = tl.load(p_s, mask=m_s, other=0).to(tl.int32)
    return S, R


@triton.jit
def _uniform_p(bnd, b, m0, Tk, BM: tl.constexpr, SCAN: tl.constexpr):
    """Where the row-uniform full tiles of the query block starting at m0 end.

    For a full compact tile, S(t, j) = d_j - min(sm_j, R_t) with R_t = min c over (tile end, t],
    nonincreasing in t. The tile is row-uniform when R_first == R_last, i.e. when some k in
    (tile end, m0] has c_k <= Q = min c over (m0, last row]. With p the last such k <= m0 (-1 if
    none), exactly the full tiles ending before p qualify, and they are the leftmost ones
    (_n_uniform). p is found by scanning c leftwards from m0 in chunks of SCAN (usually one)."""
    o_r = m0 + 1 + tl.arange(0, BM)
    c_r = tl.load(bnd + b * Tk + o_r, mask=(o_r < Tk) & (o_r < m0 + BM), other=_BIG)
    Q = tl.min(c_r, axis=0)
    p = tl.full([], -1, tl.int32)
    hi = m0
    while (p < 0) & (hi >= 0):
        o_s = hi - tl.arange(0, SCAN)
        c_s = tl.load(bnd + b * Tk + o_s, mask=o_s >= 0, other=_BIG)
        p = tl.max(tl.where(c_s <= Q, o_s, -1), axis=0)
        hi -= SCAN
    return p


@triton.jit
def _n_uniform(p, n_full, BN: tl.constexpr):
    """How many of a query block's full key tiles of width BN, counted from the left, are
    row-uniform (p from _uniform_p)."""
    return tl.where(p >= 0, tl.minimum(n_full, tl.maximum(p, 0) // BN), 0)


@triton.jit
def _table_rows(e_h, idx, s_ev, s_ed, o_d, m_d):
    """E[idx_j] for a row-uniform tile: one table row per key ([BN, BD], from L1/L2)."""
    return tl.load(e_h + idx[:, None] * s_ev + o_d[None, :] * s_ed, mask=m_d[None, :], other=0.0)


@triton.jit
def _uniform_tile(b_q, k, v, e_h, s_ev, s_ed, dep, bnd, bh, b, n0, o_d, m_d, r, Tk, D, V,
                  BINARY: tl.constexpr, BN: tl.constexpr, FP32_DOT: tl.constexpr, PREC: tl.constexpr):
    """A row-uniform full compact tile (key tile at n0, running minimum r): every row has the same
    depth indices idx_j = idx(d_j - min(sm_j, r)), so the scores are q @ (k + E[idx])^T, two dots
    with the table rows gathered once per key (no per-element tape or gather work).
    Returns (unscaled fp32 scores, the k and v tiles as dot operands, idx, r updated)."""
    o_n = n0 + BN - 1 - tl.arange(0, BN)  # reversed key order
    p_kv = bh * Tk * D + o_n[:, None].to(tl.int64) * D + o_d[None, :]
    b_k = _mm(tl.load(k + p_kv, mask=m_d[None, :], other=0.0), k, FP32_DOT)
    b_v = _mm(tl.load(v + p_kv, mask=m_d[None, :], other=0.0), k, FP32_DOT)
    c = tl.load(bnd + b * Tk + o_n)
    d = tl.load(dep + b * Tk + o_n)
    sm = tl.associative_scan(c, 0, _min_combine)  # suffix min
    idx = _depth_index(d - tl.minimum(sm, r), V, BINARY)
    e_g = _table_rows(e_h, idx, s_ev, s_ed, o_d, m_d)
    r = tl.minimum(r, tl.min(c, axis=0))
    a = _mm(b_q, k, FP32_DOT)
    qk = tl.dot(a, tl.trans(b_k), input_precision=PREC)
    qk = tl.dot(a, tl.trans(_mm(e_g, k, FP32_DOT)), qk, input_precision=PREC)
    return qk, b_k, b_v, idx, r


@triton.jit
def _fwd_tile(acc, m_i, l_i, R, b_q, b_qe, k, v, dep, bnd, dense, bh, b, n0,
              o_m, o_t, m_m, o_d, m_d, Tq, Tk, D, V, qk_scale,
              COMPACT: tl.constexpr, BINARY: tl.constexpr, MASKED: tl.constexpr,
              BN: tl.constexpr, VP: tl.constexpr, FP32_DOT: tl.constexpr, PREC: tl.constexpr):
    o_n = n0 + BN - 1 - tl.arange(0, BN)  # reversed key order (see module docstring)
    m_n = o_n < Tk
    p_kv = bh * Tk * D + o_n[:, None].to(tl.int64) * D + o_d[None, :]
    m_kv = m_n[:, None] & m_d[None, :]
    b_k = tl.load(k + p_kv, mask=m_kv, other=0.0)
    b_v = tl.load(v + p_kv, mask=m_kv, other=0.0)

    qk = tl.dot(_mm(b_q, k, FP32_DOT), tl.trans(_mm(b_k, k, FP32_DOT)), input_precision=PREC)
    S, R = _tape_tile_qstat(dep, bnd, dense, b, o_m, o_t, o_n, m_m, m_n, R, Tq, Tk, COMPACT, MASKED)
    idx = _depth_index(S, V, BINARY)
    s = (qk + _gather_bias(b_qe, idx, BINARY, VP)) * qk_scale  # log2 domain
    if MASKED:
        s = tl.where((o_n[None, :] <= o_t[:, None]) & m_n[None, :], s, float("-inf"))
    acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, b_v, v, FP32_DOT, PREC)
    return acc, m_i, l_i, R


@triton.jit
def _fwd_tile_uniform(acc, m_i, l_i, r, b_q, k, v, e_h, s_ev, s_ed, dep, bnd, bh, b, n0,
                      o_d, m_d, Tk, D, V, qk_scale,
                      BINARY: tl.constexpr, BN: tl.constexpr, FP32_DOT: tl.constexpr, PREC: tl.constexpr):
    """A row-uniform full compact tile (_uniform_tile) of the forward."""
    qk, _, b_v, _, r = _uniform_tile(b_q, k, v, e_h, s_ev, s_ed, dep, bnd, bh, b, n0, o_d, m_d, r, Tk, D, V,
                                     BINARY, BN, FP32_DOT, PREC)
    acc, m_i, l_i = _softmax_step(acc, m_i, l_i, qk * qk_scale, b_v, v, FP32_DOT, PREC)
    return acc, m_i, l_i, r


@triton.jit
def _softmax_step(acc, m_i, l_i, s, b_v, v, FP32_DOT: tl.constexpr, PREC: tl.constexpr):
    """Online softmax over one tile of log2-domain scores s, and acc += P V."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no visible key yet
    alpha = tl.exp2(m_i - m_sub)
    p = tl.exp2(s - m_sub[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(_mm(p, v, FP32_DOT), _mm(b_v, v, FP32_DOT), input_precision=PREC)
    return acc, m_new, l_i


@triton.autotune(configs=_FWD_CONFIGS, key=_KEY)
@triton.jit(do_not_specialize=["Tq", "Tk", "T_BUCKET"])
def pushdown_attention_fwd_kernel(
    q, k, v, e, dep, bnd, dense, o, lse,
    s_eh, s_ev, s_ed,
    H, Tq, Tk, D, V, scale, T_BUCKET,
    COMPACT: tl.constexpr, BINARY: tl.constexpr, FP32_DOT: tl.constexpr, PREC: tl.constexpr,
    BD: tl.constexpr, VP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, UNIFORM: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(2).to(tl.int64) * H + tl.program_id(1)  # grid (blocks, H, B)
    b = bh // H
    h = bh % H
    off = Tk - Tq  # query i sits at absolute position off + i

    o_m = pid_m * BM + tl.arange(0, BM)
    o_t = off + o_m
    m_m = o_m < Tq
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_v = tl.arange(0, VP)
    m_v = o_v < V

    p_q = bh * Tq * D + o_m[:, None].to(tl.int64) * D + o_d[None, :]
    m_q = m_m[:, None] & m_d[None, :]
    b_q = tl.load(q + p_q, mask=m_q, other=0.0)
    b_e = tl.load(e + h * s_eh + o_v[:, None] * s_ev + o_d[None, :] * s_ed,
                  mask=m_v[:, None] & m_d[None, :], other=0.0)
    # QE = q E^T: the depth term of every (row, depth) pair, kept in registers
    b_qe = tl.dot(_mm(b_q, q, FP32_DOT), tl.trans(_mm(b_e, q, FP32_DOT)), input_precision=PREC)

    qk_scale = scale * _LOG2E
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    R = tl.full([BM], _BIG, tl.int32)

    m0 = off + pid_m * BM  # first absolute query position of the block
    n_tiles = tl.cdiv(tl.minimum(Tk, m0 + BM), BN)
    n_full = (m0 + 1) // BN  # tiles whose every key is <= every query of the block
    for it in range(0, n_tiles - n_full):  # diagonal tiles, right to left
        n0 = (n_tiles - 1 - it) * BN
        acc, m_i, l_i, R = _fwd_tile(acc, m_i, l_i, R, b_q, b_qe, k, v, dep, bnd, dense, bh, b, n0,
                                     o_m, o_t, m_m, o_d, m_d, Tq, Tk, D, V, qk_scale,
                                     COMPACT, BINARY, True, BN, VP, FP32_DOT, PREC)
    if UNIFORM and COMPACT:
        n_uni = _n_uniform(_uniform_p(bnd, b, m0, Tk, BM, _SCAN), n_full, BN)
    else:
        n_uni = 0
    for it in range(0, n_full - n_uni):  # full tiles, right to left
        n0 = (n_full - 1 - it) * BN
        acc, m_i, l_i, R = _fwd_tile(acc, m_i, l_i, R, b_q, b_qe, k, v, dep, bnd, dense, bh, b, n0,
                                     o_m, o_t, m_m, o_d, m_d, Tq, Tk, D, V, qk_scale,
                                     COMPACT, BINARY, False, BN, VP, FP32_DOT, PREC)
    if UNIFORM and COMPACT:
        r = tl.min(R, axis=0)  # every row's R is equal from here on
        for it in range(0, n_uni):  # row-uniform full tiles, right to left
            n0 = (n_uni - 1 - it) * BN
            acc, m_i, l_i, r = _fwd_tile_uniform(acc, m_i, l_i, r, b_q, k, v, e + h * s_eh, s_ev, s_ed, dep, bnd,
                                                 bh, b, n0, o_d, m_d, Tk, D, V, qk_scale,
                                                 BINARY, BN, FP32_DOT, PREC)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    acc = acc / l_safe[:, None]
    tl.store(o + p_q, acc.to(o.dtype.element_ty), mask=m_q)
    tl.store(lse + bh * Tq + o_m, (m_i + tl.log2(l_safe)) * _LN2, mask=m_m)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["Tq"])
def pushdown_attention_bwd_preprocess_kernel(
    q, o, do, e, delta, qe, bnd, pbuf, s_eh, s_ev, s_ed, H, Tq, D, V,
    FP32_DOT: tl.constexpr, PREC: tl.constexpr, BD: tl.constexpr, VP: tl.constexpr, BM: tl.constexpr,
    UNIFORM: tl.constexpr,
):
    """delta = rowsum(dO * O) and QE = q E^T ([BM, VP] per block, fp32), shared by both passes;
    with UNIFORM (compact tapes, Tq = Tk), also the block's _uniform_p (per sentence: the first
    head's programs write it), which the dq pass (row blocks of BM) reads."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(2).to(tl.int64) * H + tl.program_id(1)  # grid (blocks, H, B)
    h = bh % H
    if UNIFORM:
        b = bh // H
        p = _uniform_p(bnd, b, pid_m * BM, Tq, BM, _SCAN)
        tl.store(pbuf + b * tl.num_programs(0) + pid_m, p, mask=h == 0)
    o_m = pid_m * BM + tl.arange(0, BM)
    m_m = o_m < Tq
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_v = tl.arange(0, VP)
    p_x = bh * Tq * D + o_m[:, None].to(tl.int64) * D + o_d[None, :]
    m_x = m_m[:, None] & m_d[None, :]
    b_o = tl.load(o + p_x, mask=m_x, other=0.0).to(tl.float32)
    b_do = tl.load(do + p_x, mask=m_x, other=0.0).to(tl.float32)
    tl.store(delta + bh * Tq + o_m, tl.sum(b_o * b_do, axis=1), mask=m_m)
    b_q = tl.load(q + p_x, mask=m_x, other=0.0)
    b_e = tl.load(e + h * s_eh + o_v[:, None] * s_ev + o_d[None, :] * s_ed,
                  mask=(o_v[:, None] < V) & m_d[None, :], other=0.0)
    b_qe = tl.dot(_mm(b_q, q, FP32_DOT), tl.trans(_mm(b_e, q, FP32_DOT)), input_precision=PREC)
    tl.store(qe + (bh * Tq + o_m[:, None]) * VP + o_v[None, :], b_qe, mask=m_m[:, None])


@triton.jit
def _query_rows(q, do, lse, delta, bh, o_m, m_m, o_d, m_d, Tq, D):
    """A query block's q and dO tiles, its log2-domain LSE and delta, and the tiles' offsets and
    mask. Padded rows get lse = +inf, hence P = 0."""
    p_x = bh * Tq * D + o_m[:, None].to(tl.int64) * D + o_d[None, :]
    m_x = m_m[:, None] & m_d[None, :]
    b_q = tl.load(q + p_x, mask=m_x, other=0.0)
    b_do = tl.load(do + p_x, mask=m_x, other=0.0)
    b_lse = tl.load(lse + bh * Tq + o_m, mask=m_m, other=float("inf")) * _LOG2E
    b_delta = tl.load(delta + bh * Tq + o_m, mask=m_m, other=0.0)
    return b_q, b_do, b_lse, b_delta, p_x, m_x


@triton.jit
def _gap_rows(bnd, b, o_t, m_m, n0, Tk, BN: tl.constexpr):
    """c of a query block's rows for the key tile at n0 (key-stationary pass): only rows after the
    tile's last key count towards R[t] (the rest, and padding, read as _BIG)."""
    c_q = tl.load(bnd + b * Tk + o_t, mask=m_m, other=_BIG)
    return tl.where(o_t >= n0 + BN, c_q, _BIG)


@triton.jit
def _qe_bias(qk, qe, bh, Tq, o_m, m_m, idx, BINARY: tl.constexpr, VP: tl.constexpr):
    """qk + QE[t, idx[t, j]], with the block's QE rows read back from the preprocess kernel."""
    b_qe = tl.load(qe + (bh * Tq + o_m[:, None]) * VP + tl.arange(0, VP)[None, :], mask=m_m[:, None], other=0.0)
    return qk + _gather_bias(b_qe, idx, BINARY, VP)


@triton.jit
def _tape_tile_kstat(G, c_k, d_k, sufmin_k, bnd, dense, b, o_m, o_t, m_m, o_n, m_n, n0, Tq, Tk,
                     COMPACT: tl.constexpr, MASKED: tl.constexpr, BN: tl.constexpr):
    """S tile [BM, BN] for the key-stationary pass (query blocks visited top to bottom) and the
    gap scalar G (min c over keys from the tile end to the block's last row)."""
    if COMPACT:
        # R[t] = min c over keys in [tile end + 1, t]: the gap scalar G, then a prefix min over rows
        c_q = _gap_rows(bnd, b, o_t, m_m, n0, Tk, BN)
        R = tl.minimum(tl.associative_scan(c_q, 0, _min_combine), G)
        G = tl.minimum(G, tl.min(c_q, axis=0))
        if MASKED:
            x = tl.where(o_n[None, :] <= o_t[:, None], c_k[None, :], _BIG)
            minc = tl.minimum(tl.associative_scan(x, 1, _min_combine), R[:, None])
        else:
            minc = tl.minimum(sufmin_k[None, :], R[:, None])
        S = d_k[None, :] - minc
    else:
        p_s = dense + (b * Tq + o_m[:, None]) * Tk + o_n[None, :]
        if MASKED:
            m_s = m_m[:, None] & m_n[None, :] & (o_n[None, :] <= o_t[:, None])
        else:
            m_s = m_m[:, None]
        S = tl.load(p_s, mask=m_s, other=0).to(tl.int32)
    return S, G


@triton.jit
def _dkdv_tile(b_dk, b_dv, G, b_k, b_v, c_k, d_k, sufmin_k, q, do, lse, delta, qe, e_h, s_ev, s_ed,
               bnd, dense, bh, b, mi, n0, o_n, m_n, o_d, m_d, Tq, Tk, D, V, qk_scale,
               COMPACT: tl.constexpr, BINARY: tl.constexpr, MASKED: tl.constexpr, UNIFORM: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, VP: tl.constexpr,
               FP32_DOT: tl.constexpr, PREC: tl.constexpr):
    off = Tk - Tq
    o_m = mi * BM + tl.arange(0, BM)
    o_t = off + o_m
    m_m = o_m < Tq
    b_q, b_do, b_lse, b_delta, _, _ = _query_rows(q, do, lse, delta, bh, o_m, m_m, o_d, m_d, Tq, D)

    a = _mm(b_q, q, FP32_DOT)
    qk = tl.dot(a, tl.trans(_mm(b_k, q, FP32_DOT)), input_precision=PREC)
    if UNIFORM and not MASKED:
        # full compact tile: row-uniform when R[first row] = R[last row] (= the new G); then
        # S(t, j) = d_j - min(sm_j, G) for every row and the depth term is one more dot
        c_q = _gap_rows(bnd, b, o_t, m_m, n0, Tk, BN)
        G_new = tl.minimum(G, tl.min(c_q, axis=0))
        c_first = tl.min(tl.where(tl.arange(0, BM) == 0, c_q, _BIG), axis=0)
        if tl.minimum(G, c_first) == G_new:
            e_g = _table_rows(e_h, _depth_index(d_k - tl.minimum(sufmin_k, G_new), V, BINARY), s_ev, s_ed, o_d, m_d)
            qk = tl.dot(a, tl.trans(_mm(e_g, q, FP32_DOT)), qk, input_precision=PREC)
        else:
            minc = tl.minimum(sufmin_k[None, :], tl.minimum(tl.associative_scan(c_q, 0, _min_combine), G)[:, None])
            idx = _depth_index(d_k[None, :] - minc, V, BINARY)
            qk = _qe_bias(qk, qe, bh, Tq, o_m, m_m, idx, BINARY, VP)
        G = G_new
    else:
        S, G = _tape_tile_kstat(G, c_k, d_k, sufmin_k, bnd, dense, b, o_m, o_t, m_m, o_n, m_n, n0, Tq, Tk,
                                COMPACT, MASKED, BN)
        qk = _qe_bias(qk, qe, bh, Tq, o_m, m_m, _depth_index(S, V, BINARY), BINARY, VP)
    s = qk * qk_scale
    p = tl.exp2(s - b_lse[:, None])
    if MASKED:
        p = tl.where((o_n[None, :] <= o_t[:, None]) & m_n[None, :], p, 0.0)
    b_dv += tl.dot(tl.trans(_mm(p, q, FP32_DOT)), _mm(b_do, q, FP32_DOT), input_precision=PREC)
    dp = tl.dot(_mm(b_do, q, FP32_DOT), tl.trans(_mm(b_v, q, FP32_DOT)), input_precision=PREC)
    ds = p * (dp - b_delta[:, None])
    b_dk += tl.dot(tl.trans(_mm(ds, q, FP32_DOT)), _mm(b_q, q, FP32_DOT), input_precision=PREC)
    return b_dk, b_dv, G


def _prune_fp32_dkdv(configs, named_args, **kwargs):
    """Autotune pruning of the dk/dv pass: fp32 inputs on tensor cores (PREC tf32x3 or tf32) stage
    fp32 tiles in shared memory, and its 64 x 128 tile then needs 267-279 KB on sm_90 (triton 3.6;
    the limit is 227 KB): tiles of at most 32 x 128 or 64 x 64 remain (up to 205 KB)."""
    if INTERPRET or not kwargs.get("FP32_DOT") or kwargs.get("PREC") == "ieee":
        return configs
    return [c for c in configs if c.kwargs["BM"] * c.kwargs["BN"] <= 64 * 64] or configs[:1]


@triton.autotune(configs=_DKDV_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune_fp32_dkdv})
@triton.jit(do_not_specialize=["Tq", "Tk", "T_BUCKET"])
def pushdown_attention_bwd_dkdv_kernel(
    q, k, v, e, do, lse, delta, qe, bnd, dep, dense, dk, dv,
    s_eh, s_ev, s_ed,
    H, Tq, Tk, D, V, scale, T_BUCKET,
    COMPACT: tl.constexpr, BINARY: tl.constexpr, FP32_DOT: tl.constexpr, PREC: tl.constexpr,
    BD: tl.constexpr, VP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, UNIFORM: tl.constexpr,
):
    """Key-stationary: one program per (key block, batch*head); query blocks top to bottom."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(2).to(tl.int64) * H + tl.program_id(1)  # grid (blocks, H, B)
    b = bh // H
    e_h = e + (bh % H) * s_eh
    off = Tk - Tq
    n0 = pid_n * BN
    o_n = n0 + BN - 1 - tl.arange(0, BN)  # reversed key order
    m_n = o_n < Tk
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    p_kv = bh * Tk * D + o_n[:, None].to(tl.int64) * D + o_d[None, :]
    m_kv = m_n[:, None] & m_d[None, :]
    b_k = tl.load(k + p_kv, mask=m_kv, other=0.0)
    b_v = tl.load(v + p_kv, mask=m_kv, other=0.0)

    if COMPACT:
        c_k = tl.load(bnd + b * Tk + o_n, mask=m_n, other=_BIG)
        d_k = tl.load(dep + b * Tk + o_n, mask=m_n, other=0)
        sufmin_k = tl.associative_scan(c_k, 0, _min_combine)
    else:
        c_k = tl.zeros([BN], tl.int32)
        d_k = c_k
        sufmin_k = c_k
    G = tl.min(tl.full([BN], _BIG, tl.int32), axis=0)  # min c over [n0 + BN, first query row)

    qk_scale = scale * _LOG2E
    b_dk = tl.zeros([BN, BD], tl.float32)
    b_dv = tl.zeros([BN, BD], tl.float32)
    n_mblk = tl.cdiv(Tq, BM)
    mi_lo = tl.maximum(n0 - off, 0) // BM
    # first query block whose every row is >= every key of this tile
    mi_full = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(n0 + BN - 1 - off, 0), BM), mi_lo), n_mblk)
    for mi in range(mi_lo, mi_full):
        b_dk, b_dv, G = _dkdv_tile(b_dk, b_dv, G, b_k, b_v, c_k, d_k, sufmin_k, q, do, lse, delta, qe,
                                   e_h, s_ev, s_ed, bnd, dense, bh, b, mi, n0, o_n, m_n, o_d, m_d,
                                   Tq, Tk, D, V, qk_scale,
                                   COMPACT, BINARY, True, False, BM, BN, VP, FP32_DOT, PREC)
    for mi in range(mi_full, n_mblk):
        b_dk, b_dv, G = _dkdv_tile(b_dk, b_dv, G, b_k, b_v, c_k, d_k, sufmin_k, q, do, lse, delta, qe,
                                   e_h, s_ev, s_ed, bnd, dense, bh, b, mi, n0, o_n, m_n, o_d, m_d,
                                   Tq, Tk, D, V, qk_scale,
                                   COMPACT, BINARY, False, UNIFORM, BM, BN, VP, FP32_DOT, PREC)
    tl.store(dk + p_kv, (b_dk * scale).to(dk.dtype.element_ty), mask=m_kv)
    tl.store(dv + p_kv, b_dv.to(dv.dtype.element_ty), mask=m_kv)


@triton.jit
def _histogram(hist, ds, idx, valid, BINARY: tl.constexpr, VP: tl.constexpr):
    """hist[t, v] += sum_j ds[t, j] [idx[t, j] = v], over the depth values present in the tile."""
    o_v = tl.arange(0, VP)
    if BINARY:
        h1 = tl.sum(tl.where(idx > 0, ds, 0.0), axis=1)
        h0 = tl.sum(tl.where(idx > 0, 0.0, ds), axis=1)
        hist += tl.where(o_v[None, :] == 1, h1[:, None], tl.where(o_v[None, :] == 0, h0[:, None], 0.0))
    else:
        lo = tl.min(tl.where(valid, idx, VP))
        hi = tl.max(tl.where(valid, idx, -1))
        for val in range(lo, hi + 1):
            hv = tl.sum(tl.where(idx == val, ds, 0.0), axis=1)
            hist += tl.where(o_v[None, :] == val, hv[:, None], 0.0)
    return hist


@triton.jit
def _onehot_dot(x, onehot, ref, FP32_DOT: tl.constexpr):
    """x [BM, BN] @ onehot [BN, VP] (a bool matrix, exact in any dtype), fp32 result. fp32 inputs:
    tf32x3 (fp32 accuracy for x). fp16/bf16 inputs: one native tensor-core dot with x rounded to
    the input dtype, as the dq dot (ds @ k) rounds ds: 1 MMA instead of tf32x3's 3 (at half the
    rate of bf16), and no hi/lo operand splits in registers."""
    if FP32_DOT:
        y = tl.dot(x, onehot.to(tl.float32), input_precision="tf32x3")
    else:
        y = tl.dot(x.to(ref.dtype.element_ty), onehot.to(ref.dtype.element_ty))
    return y


@triton.jit
def _histogram_full(hist, ds, d_k, sm_k, R_old, V, ref, VP: tl.constexpr, FP32_DOT: tl.constexpr):
    """The depth histogram of a full compact tile with two tensor-core dots instead of a loop over
    depth values. With sm[j] = min c over the tile's keys j..end and R[t] the running minimum to the
    right of the tile, S(t, j) = d_j - sm_j where sm_j < R_t (case A: independent of t) and
    S(t, j) = d_j - R_t otherwise (case B: a per-row shift of d_j). So
      hist_A = ds_A @ onehot(clamp(d - sm)),
      Y = ds_B @ onehot(d - dmin), hist_B[t, v] = Y[t, v + R_t - dmin],
    with the clamp buckets (v = 0 and v = V - 1) summed from the case-B entries with S <= 0 and
    S >= V - 1. Needs
    max(d) - dmin < VP over the tile and V >= 2 (the caller checks). The one-hot operands are
    exact in any dtype; ds enters the dots as the dq dot takes it (_onehot_dot)."""
    o_v = tl.arange(0, VP)
    case_a = sm_k[None, :] < R_old[:, None]
    a = tl.minimum(tl.maximum(d_k - sm_k, 0), V - 1)
    x_a = tl.where(case_a, ds, 0.0)
    hist += _onehot_dot(x_a, a[:, None] == o_v[None, :], ref, FP32_DOT)
    dmin = tl.min(d_k, axis=0)
    x_b = ds - x_a
    y = _onehot_dot(x_b, (d_k - dmin)[:, None] == o_v[None, :], ref, FP32_DOT)
    shift = R_old - dmin  # [BM]; case-B entry (t, j) lands on v = (d_j - dmin) - shift_t
    u = o_v[None, :] + shift[:, None]
    inner = (o_v[None, :] > 0) & (o_v[None, :] < V - 1) & (u >= 0) & (u < VP)
    hist += tl.where(inner, tl.gather(y, tl.minimum(tl.maximum(u, 0), VP - 1), axis=1), 0.0)
    # the clamp buckets straight from the [BM, BN] tile (BN < VP elements per row, fp32 ds)
    s_b = d_k[None, :] - R_old[:, None]  # S of the case-B entries
    low = tl.sum(tl.where(s_b <= 0, x_b, 0.0), axis=1)  # S <= 0 -> v = 0
    high = tl.sum(tl.where(s_b >= V - 1, x_b, 0.0), axis=1)  # S >= V-1 -> v = V-1
    hist += tl.where(o_v[None, :] == 0, low[:, None], tl.where(o_v[None, :] == V - 1, high[:, None], 0.0))
    return hist


@triton.jit
def _dq_tile(b_dq, hist, R, b_q, b_do, b_lse, b_delta, b_qe, k, v, dep, bnd, dense, bh, b, n0,
             o_m, o_t, m_m, o_d, m_d, Tq, Tk, D, V, qk_scale,
             COMPACT: tl.constexpr, BINARY: tl.constexpr, MASKED: tl.constexpr,
             BN: tl.constexpr, VP: tl.constexpr, FP32_DOT: tl.constexpr, PREC: tl.constexpr,
             HIST_DOTS: tl.constexpr):
    o_n = n0 + BN - 1 - tl.arange(0, BN)  # reversed key order
    m_n = o_n < Tk
    p_kv = bh * Tk * D + o_n[:, None].to(tl.int64) * D + o_d[None, :]
    m_kv = m_n[:, None] & m_d[None, :]
    b_k = tl.load(k + p_kv, mask=m_kv, other=0.0)
    b_v = tl.load(v + p_kv, mask=m_kv, other=0.0)

    qk = tl.dot(_mm(b_q, k, FP32_DOT), tl.trans(_mm(b_k, k, FP32_DOT)), input_precision=PREC)
    if HIST_DOTS and COMPACT and not MASKED and not BINARY:
        # full tile: S from its two parts (see _histogram_full), which the histogram reuses
        c_k = tl.load(bnd + b * Tk + o_n, mask=m_n, other=_BIG)
        d_k = tl.load(dep + b * Tk + o_n, mask=m_n, other=0)
        sm_k = tl.associative_scan(c_k, 0, _min_combine)
        R_old = R
        S = d_k[None, :] - tl.minimum(sm_k[None, :], R_old[:, None])
        R = tl.minimum(R, tl.min(c_k, axis=0))
    else:
        S, R = _tape_tile_qstat(dep, bnd, dense, b, o_m, o_t, o_n, m_m, m_n, R, Tq, Tk, COMPACT, MASKED)
    idx = _depth_index(S, V, BINARY)
    s = (qk + _gather_bias(b_qe, idx, BINARY, VP)) * qk_scale
    p = tl.exp2(s - b_lse[:, None])
    if MASKED:
        valid = (o_n[None, :] <= o_t[:, None]) & m_n[None, :] & m_m[:, None]
        p = tl.where(valid, p, 0.0)
    else:
        valid = m_m[:, None] & (o_n[None, :] >= 0)
    dp = tl.dot(_mm(b_do, k, FP32_DOT), tl.trans(_mm(b_v, k, FP32_DOT)), input_precision=PREC)
    ds = p * (dp - b_delta[:, None])
    b_dq += tl.dot(_mm(ds, k, FP32_DOT), _mm(b_k, k, FP32_DOT), input_precision=PREC)
    if HIST_DOTS and COMPACT and not MASKED and not BINARY:
        if (tl.max(d_k, axis=0) - tl.min(d_k, axis=0) < VP) & (V >= 2):
            hist = _histogram_full(hist, ds, d_k, sm_k, R_old, V, k, VP, FP32_DOT)
        else:
            hist = _histogram(hist, ds, idx, valid, BINARY, VP)
    else:
        hist = _histogram(hist, ds, idx, valid, BINARY, VP)
    return b_dq, hist, R


@triton.jit
def _dq_tile_uniform(b_dq, hist, r, b_q, b_do, b_lse, b_delta, k, v, e_h, s_ev, s_ed, dep, bnd, bh, b, n0,
                     o_d, m_d, Tk, D, V, qk_scale,
                     BINARY: tl.constexpr, BN: tl.constexpr, VP: tl.constexpr,
                     FP32_DOT: tl.constexpr, PREC: tl.constexpr):
    """A row-uniform full compact tile (_uniform_tile) of the dq pass: its depth histogram is one
    dot with the one-hot of the per-key indices."""
    qk, b_k, b_v, idx, r = _uniform_tile(b_q, k, v, e_h, s_ev, s_ed, dep, bnd, bh, b, n0, o_d, m_d, r, Tk, D, V,
                                         BINARY, BN, FP32_DOT, PREC)
    p = tl.exp2(qk * qk_scale - b_lse[:, None])
    dp = tl.dot(_mm(b_do, k, FP32_DOT), tl.trans(b_v), input_precision=PREC)
    ds = p * (dp - b_delta[:, None])
    b_dq += tl.dot(_mm(ds, k, FP32_DOT), b_k, input_precision=PREC)
    hist += _onehot_dot(ds, idx[:, None] == tl.arange(0, VP)[None, :], k, FP32_DOT)
    return b_dq, hist, r


@triton.autotune(configs=_DQ_CONFIGS, key=_KEY)
@triton.jit(do_not_specialize=["Tq", "Tk", "T_BUCKET"])
def pushdown_attention_bwd_dq_kernel(
    q, k, v, e, do, lse, delta, qe, dep, bnd, pbuf, dense, dq, de_part,
    s_eh, s_ev, s_ed,
    H, Tq, Tk, D, V, scale, T_BUCKET,
    COMPACT: tl.constexpr, BINARY: tl.constexpr, FP32_DOT: tl.constexpr, PREC: tl.constexpr,
    BD: tl.constexpr, VP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HIST_DOTS: tl.constexpr,
    UNIFORM: tl.constexpr,
):
    """Query-stationary: dq and the depth histogram of this program's rows (no atomics).
    dq = scale * (dS k + Hist E); this block's share of dE, scale * Hist^T q, goes to its own slot
    de_part[b, pid_m, h] ([V, D])."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(2).to(tl.int64) * H + tl.program_id(1)  # grid (blocks, H, B)
    b = bh // H
    h = bh % H
    off = Tk - Tq
    o_m = pid_m * BM + tl.arange(0, BM)
    o_t = off + o_m
    m_m = o_m < Tq
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_v = tl.arange(0, VP)
    m_v = o_v < V

    b_q, b_do, b_lse, b_delta, p_x, m_x = _query_rows(q, do, lse, delta, bh, o_m, m_m, o_d, m_d, Tq, D)
    b_qe = tl.load(qe + (bh * Tq + o_m[:, None]) * VP + o_v[None, :], mask=m_m[:, None], other=0.0)

    qk_scale = scale * _LOG2E
    b_dq = tl.zeros([BM, BD], tl.float32)
    hist = tl.zeros([BM, VP], tl.float32)
    R = tl.full([BM], _BIG, tl.int32)
    m0 = off + pid_m * BM
    n_tiles = tl.cdiv(tl.minimum(Tk, m0 + BM), BN)
    n_full = (m0 + 1) // BN
    for it in range(0, n_tiles - n_full):
        n0 = (n_tiles - 1 - it) * BN
        b_dq, hist, R = _dq_tile(b_dq, hist, R, b_q, b_do, b_lse, b_delta, b_qe, k, v, dep, bnd, dense,
                                 bh, b, n0, o_m, o_t, m_m, o_d, m_d, Tq, Tk, D, V, qk_scale,
                                 COMPACT, BINARY, True, BN, VP, FP32_DOT, PREC, HIST_DOTS)
    if UNIFORM and COMPACT:
        p = tl.load(pbuf + b * tl.num_programs(0) + pid_m)  # from the preprocess kernel
        n_uni = _n_uniform(p, n_full, BN)
    else:
        n_uni = 0
    for it in range(0, n_full - n_uni):
        n0 = (n_full - 1 - it) * BN
        b_dq, hist, R = _dq_tile(b_dq, hist, R, b_q, b_do, b_lse, b_delta, b_qe, k, v, dep, bnd, dense,
                                 bh, b, n0, o_m, o_t, m_m, o_d, m_d, Tq, Tk, D, V, qk_scale,
                                 COMPACT, BINARY, False, BN, VP, FP32_DOT, PREC, HIST_DOTS)
    if UNIFORM and COMPACT:
        r = tl.min(R, axis=0)  # every row's R is equal from here on (see _uniform_p)
        for it in range(0, n_uni):
            n0 = (n_uni - 1 - it) * BN
            b_dq, hist, r = _dq_tile_uniform(b_dq, hist, r, b_q, b_do, b_lse, b_delta, k, v, e + h * s_eh, s_ev, s_ed,
                                             dep, bnd, bh, b, n0, o_d, m_d, Tk, D, V, qk_scale,
                                             BINARY, BN, VP, FP32_DOT, PREC)

    b_e = tl.load(e + h * s_eh + o_v[:, None] * s_ev + o_d[None, :] * s_ed,
                  mask=m_v[:, None] & m_d[None, :], other=0.0)
    b_dq += tl.dot(_mm(hist, q, FP32_DOT), _mm(b_e, q, FP32_DOT), input_precision=PREC)
    tl.store(dq + p_x, (b_dq * scale).to(dq.dtype.element_ty), mask=m_x)
    b_de = tl.dot(tl.trans(_mm(hist, q, FP32_DOT)), _mm(b_q, q, FP32_DOT), input_precision=PREC)
    n_mblk = tl.cdiv(Tq, BM)
    p_de = ((b * n_mblk + pid_m) * H + h) * V * D + o_v[:, None] * D + o_d[None, :]
    tl.store(de_part + p_de, b_de * scale, mask=m_v[:, None] & m_d[None, :])


# ---------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------


def _hist_dots() -> bool:
    """FASTMODELS_PUSHDOWN_HIST: "dots" (default) builds the dq pass's depth histogram of full
    compact tiles with tensor-core dots (_histogram_full), "loop" with the per-value loop. Read at
    every call so a benchmark can compare the two in one process."""
    mode = os.environ.get("FASTMODELS_PUSHDOWN_HIST", "dots")
    if mode not in ("dots", "loop"):
        raise ValueError(f"FASTMODELS_PUSHDOWN_HIST: expected 'dots' or 'loop', got {mode!r}")
    return mode == "dots"


def _uniform() -> bool:
    """FASTMODELS_PUSHDOWN_UNIFORM: "1" (default) gives row-uniform full compact tiles the fast
    path (the depth term as one more dot, no per-element tape work), "0" sends every tile through
    the general path. Read at every call so a benchmark can compare the two in one process."""
    mode = os.environ.get("FASTMODELS_PUSHDOWN_UNIFORM", "1")
    if mode not in ("0", "1"):
        raise ValueError(f"FASTMODELS_PUSHDOWN_UNIFORM: expected '0' or '1', got {mode!r}")
    return mode == "1"


def _fp32_precision(bd: int) -> str:
    """input_precision of the dots for fp32 inputs with head tiles of width ``bd``.

    Up to 64: tensor cores, from torch's float32 matmul setting: "tf32x3" under the default
    "highest" (fp32-level error, ~2^-21 per product), "tf32" once TF32 is allowed. The "ieee" FMA
    dots need far more registers than sm_90 has: ptxas (triton 3.9, sm_90, D = 64) spilled 54 KB
    per thread in the forward with BN = 64 tiles and 4 KB with BN = 32, 37-89 KB in the dk/dv
    pass and 9.5 KB in the dq pass, against 0.1-2.2 KB, 2.1-5.2 KB and 3.2 KB with tf32x3, whose
    configs fit in shared memory (at most 205 KB) once the dk/dv pass drops its 64 x 128 tile for
    them (_prune_fp32_dkdv).
    At 128 "ieee" stays: the tensor-core dots stage fp32 tiles in shared memory, and some configs
    of the bf16-tuned tile grids then need 262-393 KB, more than sm_90's 227 KB (the ieee builds
    fit, and spill 56-124 KB)."""
    if bd > 64:
        return "ieee"
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _pow2(n: int) -> int:
    return max(16, next_power_of_2(int(n)))


def _common(q, k, emb, depth, boundary, dense, binary):
    """Shared launch parameters; validates the layout contract (the public op validates values)."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if Tq > Tk:
        raise ValueError(f"pushdown kernels: Tq={Tq} must be <= Tk={Tk}")
    if max(B, H) > MAX_GRID_YZ:  # the grids are (blocks, H, B)
        raise ValueError(f"pushdown kernels: batch size B and heads H must each be <= {MAX_GRID_YZ}, got B={B}, H={H}")
    if emb.dim() != 3 or emb.shape[0] != H or emb.shape[2] != D:
        raise ValueError(f"pushdown kernels: emb must be [H={H}, V, D={D}], got {list(emb.shape)}")
    compact = dense is None
    if compact:
        if depth is None or boundary is None:
            raise ValueError("pushdown kernels: pass either dense or (depth, boundary)")
        if Tq != Tk:
            raise ValueError("pushdown kernels: a compact tape needs Tq == Tk (use a dense tape to decode)")
        depth = depth.to(torch.int32).contiguous()
        boundary = boundary.to(torch.int32).contiguous()
        dense = depth  # unused placeholder pointer
    else:
        if dense.shape != (B, Tq, Tk):
            raise ValueError(f"pushdown kernels: dense tape must be [B, Tq, Tk]={[B, Tq, Tk]}, got {list(dense.shape)}")
        dense = dense.contiguous()
        depth = boundary = dense  # unused placeholder pointers
    V = emb.shape[1]
    # binary mode reads rows 0 and 1 only
    V_used = min(V, 2) if binary else V
    meta = dict(
        COMPACT=compact, BINARY=bool(binary), FP32_DOT=INTERPRET or q.dtype == torch.float32,
        PREC=_fp32_precision(_pow2(D)) if q.dtype == torch.float32 else "tf32", BD=_pow2(D), VP=_pow2(V_used),
        UNIFORM=compact and _uniform(),
    )
    return B, H, Tq, Tk, D, V_used, depth, boundary, dense, meta


@on_tensor_device
def pushdown_attention_fwd(q, k, v, emb, depth, boundary, dense, scale: float, binary: bool):
    """Forward: returns (out [B, H, Tq, D] in q's dtype, lse [B, H, Tq] fp32, natural log).

    q [B, H, Tq, D], k/v [B, H, Tk, D] contiguous, same dtype; emb [H, V, D] (any strides, e.g. an
    expanded [V, D] table); tape either compact (depth, boundary [B, Tk] int, Tq == Tk) or dense
    ([B, Tq, Tk] int8/16/32, dense=None otherwise)."""
    B, H, Tq, Tk, D, V, depth, boundary, dense, meta = _common(q, k, emb, depth, boundary, dense, binary)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    lse = torch.empty((B, H, Tq), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    grid = lambda META: (cdiv(Tq, META["BM"]), H, B)  # noqa: E731
    pushdown_attention_fwd_kernel[grid](
        q, k, v, emb, depth, boundary, dense, out, lse,
        emb.stride(0), emb.stride(1), emb.stride(2),
        H, Tq, Tk, D, V, float(scale), _pow2(Tk), **meta, **LAUNCH_OPTIONS,
    )
    return out, lse


@on_tensor_device
def pushdown_attention_bwd(do, q, k, v, emb, depth, boundary, dense, out, lse, scale: float, binary: bool, *, shared_table: bool = False):
    """Backward: returns (dq, dk, dv) in the input dtype and demb [H, V, D] fp32 ([V, D], summed
    over heads, with ``shared_table``: the gradient of a [V, D] table that ``emb`` expands)."""
    B, H, Tq, Tk, D, V, depth, boundary, dense, meta = _common(q, k, emb, depth, boundary, dense, binary)
    q, k, v, out, do = (t.contiguous() for t in (q, k, v, out, do))
    lse = lse.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    demb_shape = (emb.shape[1], D) if shared_table else (H, emb.shape[1], D)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), torch.zeros(demb_shape, device=q.device, dtype=torch.float32)
    VP, BD = meta["VP"], meta["BD"]
    delta = torch.empty((B, H, Tq), device=q.device, dtype=torch.float32)
    qe = torch.empty((B, H, Tq, VP), device=q.device, dtype=torch.float32)
    n_mblk = cdiv(Tq, _DQ_BM)  # the dq pass's row blocks, also the preprocess kernel's
    pbuf = torch.empty((B, n_mblk), device=q.device, dtype=torch.int32) if meta["UNIFORM"] else delta
    pushdown_attention_bwd_preprocess_kernel[(n_mblk, H, B)](
        q, out, do, emb, delta, qe, boundary, pbuf, emb.stride(0), emb.stride(1), emb.stride(2), H, Tq, D, V,
        FP32_DOT=meta["FP32_DOT"], PREC=meta["PREC"], BD=BD, VP=VP, BM=_DQ_BM, UNIFORM=meta["UNIFORM"], **LAUNCH_OPTIONS,
    )
    grid_kv = lambda META: (cdiv(Tk, META["BN"]), H, B)  # noqa: E731
    pushdown_attention_bwd_dkdv_kernel[grid_kv](
        q, k, v, emb, do, lse, delta, qe, boundary, depth, dense, dk, dv,
        emb.stride(0), emb.stride(1), emb.stride(2),
        H, Tq, Tk, D, V, float(scale), _pow2(Tk), **meta, **LAUNCH_OPTIONS,
    )
    de_part = torch.empty((B, n_mblk, H, V, D), device=q.device, dtype=torch.float32)
    pushdown_attention_bwd_dq_kernel[(n_mblk, H, B)](
        q, k, v, emb, do, lse, delta, qe, depth, boundary, pbuf, dense, dq, de_part,
        emb.stride(0), emb.stride(1), emb.stride(2),
        H, Tq, Tk, D, V, float(scale), _pow2(Tk), BM=_DQ_BM, HIST_DOTS=_hist_dots(), **meta, **LAUNCH_OPTIONS,
    )
    # deterministic reduction of the per-program partials (one kernel unless binary mode pads V)
    part_sum = de_part.sum(dim=(0, 1, 2) if shared_table else (0, 1))
    if V == emb.shape[1]:
        return dq, dk, dv, part_sum
    demb = torch.zeros(demb_shape, device=q.device, dtype=torch.float32)
    demb[..., :V, :] = part_sum
    return dq, dk, dv, demb

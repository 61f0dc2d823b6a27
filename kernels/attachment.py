"""Triton kernels for the attachment scores of a Pushdown LM's attachment head
(fastmodels.ops.attachment; spec ../shared/specs/pushdown.md, section 4).

Per batch row b, with query row i at absolute position t = Tk - Tq + i and key j visible iff j <= t:

    out[i, j] = sum_w q[i, w] relu(keys[j, w] + feat[idx(i, j), w])      (-inf for j > t)
    idx = [S > 0] (binary) or clamp(S, 0, V - 1)

A relu sits between the two operands of every product, so there is no matmul for tensor cores:
the kernels are FMA/ALU and gather bound. Each works on [BT, BJ] tiles of (query, key) pairs and
walks the feature axis in chunks of BW as [BT, BJ, BW] register tiles, with the depth index tile
and the gather offsets idx * W computed once per tile, and feat rows gathered per element from
L1/L2 (binary tapes select between rows 0 and 1 instead). Loads are upcast to fp32 at once; every
sum is fp32.

  ``attachment_fwd_kernel``: one program per (query block, key block) tile and batch row, so short
      or decode-shaped inputs still fill the GPU; tiles above the diagonal only write -inf.
  ``attachment_bwd_dq_kernel``: one program per (query block, w chunk); key tiles right to left,
      dq[rows, chunk] += sum_j g relu(pre) in registers.
  ``attachment_bwd_dkf_kernel``: one program per (key block, w chunk); query blocks top to bottom,
      dkeys[keys, chunk] += sum_i x with x = g q [pre > 0], and the depth-table gradient dfeat.

Stack tape: dense ([B, Tq, Tk] int8/16/32, read per tile) or compact, S = d_j - min_{j<=k<=t} c_k
regenerated in-kernel (as kernels/pushdown.py, whose notes apply): key tiles hold their columns in
reversed order (key n0 + BJ - 1 - r in column r), so a forward min-scan along a row is the suffix
minimum over keys. The dq pass keeps a running per-row minimum R[t] of c right of the tile; the
forward's tiles and the key-stationary pass take the minimum over the gap between the key tile's
end and the query block (a short scan of c, only non-empty far below the diagonal or for decode
shapes, Tq < Tk) plus a prefix minimum over the block's own rows.

Depth-table gradient dfeat[v, w] = sum over (b, i, j) with idx = v of x: a scatter by idx, done with
fp32 atomics into a zeroed [V, W] buffer -- but rarely. A compact tape's S(t, j) never decreases
down a column (t growing), so the key-stationary pass keeps, per key column, a register carry for
the depth index of the column's latest rows: a tile whose columns each hold one index (most tiles
off the diagonal) adds its column sums to the carry, other tiles split their columns by index
(lo..hi per column: one select-and-sum pass per distinct offset), and a column flushes its carry
with one atomic row only when its index changes. So atomics number about (distinct depths per
key) x W per key block, not one per (pair, w). Any dense tape is still summed correctly (a value
that differs from the carried one goes straight to an atomic). The summation order of dfeat is
therefore not deterministic on GPU (the rounding of dfeat may differ between runs); dq, dkeys and
the scores are deterministic.

Layout: q [B, Tq, W], keys [B, Tk, W], feat [V, W] contiguous in one dtype (fp32/fp16/bf16); tapes
contiguous int32 (compact) or their integer dtype (dense). Outputs fp32. The kernels address feat
and dfeat with a row stride SF, W rounded up to a multiple of 16 (the launchers pad a copy of the
small table when W is not one), so that the per-element gathers vectorize.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import LAUNCH_OPTIONS, MAX_GRID_YZ, cdiv, interpreting, next_power_of_2, on_tensor_device
from .pushdown import _depth_index, _min_combine  # the same tape helpers as pushdown attention
from ._tuning import gpu_configs

__all__ = ["attachment_fwd", "attachment_bwd"]

INTERPRET = interpreting()
# "No boundary" marker for masked-out tape entries (above every real c_k).
_BIG = tl.constexpr(2**30)
# Chunk of boundaries per step of the gap scan (small under the interpreter so tests take several).
_SCAN = 4 if INTERPRET else 256

# GPU tiles (BT, BJ, BW, num_warps): 32 or 64 elements of each [BT, BJ, BW] temporary per
# thread. The dq and dkeys/dfeat passes recompute the depth index tile once per w chunk, so they
# also try wider chunks. No tile here spills on sm_90 for any recorded dtype/tape/flag variant at
# W = 64 or 60 (ptxas via triton 3.9: forward 79-187 registers, dq 84-236, dkeys/dfeat 168-254);
# left out for spilling: 64 x 64 x 8 and 32 x 32 x 32 (all passes), and for dkeys/dfeat
# 16 x 32 x 8, 32 x 32 x 4 and 16 x 16 x 16 (4-12 B when ptxas caps a variant at 128 registers).
FWD_TILES = ((32, 32, 8, 4), (16, 32, 8, 4), (32, 64, 8, 8), (16, 16, 16, 4))
DQ_TILES = ((32, 32, 16, 8), (32, 32, 8, 4), (16, 32, 16, 4), (16, 16, 16, 4))
DKF_TILES = ((32, 32, 8, 4), (32, 32, 16, 8), (32, 16, 8, 2))

def _configs(tiles):
    """Autotune grid: one tiny config under the interpreter (tiles of 8 so the tests' odd shapes
    span several tiles and w chunks), the GPU grid otherwise (its first entry alone with
    FASTMODELS_AUTOTUNE=0)."""
    if INTERPRET:
        return [triton.Config({"BT": 8, "BJ": 8, "BW": 8}, num_warps=1, num_stages=1)]
    return gpu_configs([triton.Config({"BT": bt, "BJ": bj, "BW": bw}, num_warps=w, num_stages=1)
                        for bt, bj, bw, w in tiles])


# W_BUCKET and V_BUCKET (W and V rounded up to powers of two) are unused launch arguments that key
# the autotuner: each model width and depth-table size gets its tiles without retuning per length.
_KEY = ["W_BUCKET", "V_BUCKET", "COMPACT", "BINARY"]


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _gap_min(bnd, b, lo, hi, Tk, SCAN: tl.constexpr):
    """min of c over positions [lo, hi) (_BIG if empty), SCAN boundaries per step."""
    m = tl.full([], _BIG, tl.int32)
    for k0 in range(lo, hi, SCAN):
        o_k = k0 + tl.arange(0, SCAN)
        m = tl.minimum(m, tl.min(tl.load(bnd + b * Tk + o_k, mask=o_k < hi, other=_BIG), axis=0))
    return m


@triton.jit
def _feat_tile(feat, idx, o_w, m_w, SF, V, BINARY: tl.constexpr):
    """feat[idx[t, j], w] as a [BT, BJ, BW] fp32 tile (a select between rows 0 and 1 if binary);
    SF is feat's row stride."""
    if BINARY:
        row1 = tl.minimum(tl.full([], 1, tl.int32), V - 1)
        f0 = tl.load(feat + o_w, mask=m_w, other=0.0).to(tl.float32)
        f1 = tl.load(feat + row1 * SF + o_w, mask=m_w, other=0.0).to(tl.float32)
        b_f = tl.where(idx[:, :, None] > 0, f1[None, None, :], f0[None, None, :])
    else:
        p_f = feat + (idx * SF)[:, :, None] + o_w[None, None, :]
        b_f = tl.load(p_f, mask=m_w[None, None, :], other=0.0).to(tl.float32)
    return b_f


@triton.jit
def _rows_chunk(x, b, o_r, m_r, o_w, m_w, T, W):
    """x[b, rows, chunk] as fp32 [len(rows), BW] (zeros where masked)."""
    p_x = x + (b * T + o_r[:, None]) * W + o_w[None, :]
    return tl.load(p_x, mask=m_r[:, None] & m_w[None, :], other=0.0).to(tl.float32)


@triton.jit
def _tape_qstat(dep, bnd, dense, b, o_i, o_t, o_j, vis, R, Tq, Tk,
                COMPACT: tl.constexpr, MASKED: tl.constexpr):
    """S tile [BT, BJ] for the dq pass (key tiles right to left, reversed columns): R[t] is the
    minimum of c over the keys already visited (right of this tile) with k <= t."""
    if COMPACT:
        m_j = o_j < Tk
        c = tl.load(bnd + b * Tk + o_j, mask=m_j, other=_BIG)
        d = tl.load(dep + b * Tk + o_j, mask=m_j, other=0)
        if MASKED:
            x = tl.where(o_j[None, :] <= o_t[:, None], c[None, :], _BIG)
            minc = tl.minimum(tl.associative_scan(x, 1, _min_combine), R[:, None])
            R = tl.minimum(R, tl.min(x, axis=1))
        else:
            # every key of the tile is <= every row: one 1-D suffix-min scan
            minc = tl.minimum(tl.associative_scan(c, 0, _min_combine)[None, :], R[:, None])
            R = tl.minimum(R, tl.min(c, axis=0))
        S = d[None, :] - minc
    else:
        p_s = dense + (b * Tq + o_i[:, None]) * Tk + o_j[None, :]
        S = tl.load(p_s, mask=vis, other=0).to(tl.int32)
    return S, R


@triton.jit
def _tape_kstat(G, c_k, d_k, sm_k, bnd, dense, b, o_i, o_t, m_i, o_j, n0, vis, Tq, Tk,
                COMPACT: tl.constexpr, MASKED: tl.constexpr, BJ: tl.constexpr):
    """S tile [BT, BJ] of the key tile at n0 (reversed columns: c_k, d_k, and sm_k, their suffix
    minima) for the query block of rows o_i, given G = min c over [n0 + BJ, first row of the
    block). Returns S and G moved past the block (for the next block down)."""
    if COMPACT:
        # min c over [tile end + 1, t]: the gap G, then a prefix minimum over the block's rows
        c_q = tl.load(bnd + b * Tk + o_t, mask=m_i & (o_t >= n0 + BJ), other=_BIG)
        R = tl.minimum(tl.associative_scan(c_q, 0, _min_combine), G)
        G = tl.minimum(G, tl.min(c_q, axis=0))
        if MASKED:
            x = tl.where(o_j[None, :] <= o_t[:, None], c_k[None, :], _BIG)
            minc = tl.minimum(tl.associative_scan(x, 1, _min_combine), R[:, None])
        else:
            minc = tl.minimum(sm_k[None, :], R[:, None])
        S = d_k[None, :] - minc
    else:
        p_s = dense + (b * Tq + o_i[:, None]) * Tk + o_j[None, :]
        S = tl.load(p_s, mask=vis, other=0).to(tl.int32)
    return S, G


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.autotune(configs=_configs(FWD_TILES), key=_KEY)
@triton.jit(do_not_specialize=["Tq", "Tk", "W_BUCKET", "V_BUCKET"])
def attachment_fwd_kernel(
    q, keys, feat, dep, bnd, dense, out,
    Tq, Tk, W, V, SF, W_BUCKET, V_BUCKET,
    COMPACT: tl.constexpr, BINARY: tl.constexpr, SCAN: tl.constexpr,
    BT: tl.constexpr, BJ: tl.constexpr, BW: tl.constexpr,
):
    """One [BT, BJ] score tile; grid (query blocks x key blocks, B)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n_jblk = tl.cdiv(Tk, BJ)
    mi = pid // n_jblk
    n0 = (pid % n_jblk) * BJ
    off = Tk - Tq  # query i sits at absolute position off + i
    o_i = mi * BT + tl.arange(0, BT)
    o_t = off + o_i
    m_i = o_i < Tq
    o_j = n0 + BJ - 1 - tl.arange(0, BJ)  # reversed key order (see module docstring)
    m_j = o_j < Tk
    p_o = out + (b * Tq + o_i[:, None]) * Tk + o_j[None, :]
    m_o = m_i[:, None] & m_j[None, :]
    t_last = off + tl.minimum(mi * BT + BT, Tq) - 1
    if n0 > t_last:  # above the diagonal
        tl.store(p_o, tl.full([BT, BJ], float("-inf"), tl.float32), mask=m_o)
    else:
        vis = m_i[:, None] & (o_j[None, :] <= o_t[:, None])
        if COMPACT:
            c_k = tl.load(bnd + b * Tk + o_j, mask=m_j, other=_BIG)
            d_k = tl.load(dep + b * Tk + o_j, mask=m_j, other=0)
            G = _gap_min(bnd, b, n0 + BJ, off + mi * BT, Tk, SCAN)
        else:
            c_k = o_j
            d_k = o_j
            G = 0
        S, _ = _tape_kstat(G, c_k, d_k, c_k, bnd, dense, b, o_i, o_t, m_i, o_j, n0, vis, Tq, Tk,
                           COMPACT, True, BJ)
        idx = _depth_index(S, V, BINARY)
        acc = tl.zeros([BT, BJ], tl.float32)
        for w0 in range(0, W, BW):
            o_w = w0 + tl.arange(0, BW)
            m_w = o_w < W
            b_q = _rows_chunk(q, b, o_i, m_i, o_w, m_w, Tq, W)
            b_k = _rows_chunk(keys, b, o_j, m_j, o_w, m_w, Tk, W)
            pre = b_k[None, :, :] + _feat_tile(feat, idx, o_w, m_w, SF, V, BINARY)
            # relu keeps NaN (as torch.relu and the C++ backend): tl.maximum's default drops it
            acc += tl.sum(b_q[:, None, :] * tl.maximum(pre, 0.0, propagate_nan=tl.PropagateNan.ALL), axis=2)
        tl.store(p_o, tl.where(vis, acc, float("-inf")), mask=m_o)


# ---------------------------------------------------------------------------------------------
# Backward: dq (query-stationary)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dq_tile(b_dq, R, g, keys, feat, dep, bnd, dense, b, n0, o_i, o_t, m_i, o_w, m_w,
             Tq, Tk, W, V, SF, COMPACT: tl.constexpr, BINARY: tl.constexpr, MASKED: tl.constexpr,
             BJ: tl.constexpr):
    o_j = n0 + BJ - 1 - tl.arange(0, BJ)  # reversed key order
    m_j = o_j < Tk
    if MASKED:
        vis = m_i[:, None] & (o_j[None, :] <= o_t[:, None])
    else:
        vis = m_i[:, None] & (o_j[None, :] >= 0)
    S, R = _tape_qstat(dep, bnd, dense, b, o_i, o_t, o_j, vis, R, Tq, Tk, COMPACT, MASKED)
    idx = _depth_index(S, V, BINARY)
    # masked entries (j > t, which may hold NaN) are never read
    b_g = tl.load(g + (b * Tq + o_i[:, None]) * Tk + o_j[None, :], mask=vis, other=0.0).to(tl.float32)
    b_k = _rows_chunk(keys, b, o_j, m_j, o_w, m_w, Tk, W)
    pre = b_k[None, :, :] + _feat_tile(feat, idx, o_w, m_w, SF, V, BINARY)
    b_dq += tl.sum(b_g[:, :, None] * tl.maximum(pre, 0.0, propagate_nan=tl.PropagateNan.ALL), axis=1)
    return b_dq, R


@triton.autotune(configs=_configs(DQ_TILES), key=_KEY)
@triton.jit(do_not_specialize=["Tq", "Tk", "W_BUCKET", "V_BUCKET"])
def attachment_bwd_dq_kernel(
    g, keys, feat, dep, bnd, dense, dq,
    Tq, Tk, W, V, SF, W_BUCKET, V_BUCKET,
    COMPACT: tl.constexpr, BINARY: tl.constexpr,
    BT: tl.constexpr, BJ: tl.constexpr, BW: tl.constexpr,
):
    """dq[rows, chunk] = sum_{j <= t} g relu(keys[j] + feat[idx]); grid (query blocks x w chunks, B).
    Each program owns its output: no atomics."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n_wblk = tl.cdiv(W, BW)
    mi = pid // n_wblk
    o_w = (pid % n_wblk) * BW + tl.arange(0, BW)
    m_w = o_w < W
    off = Tk - Tq
    o_i = mi * BT + tl.arange(0, BT)
    o_t = off + o_i
    m_i = o_i < Tq

    b_dq = tl.zeros([BT, BW], tl.float32)
    R = tl.full([BT], _BIG, tl.int32)
    m0 = off + mi * BT  # first absolute query position of the block
    n_tiles = tl.cdiv(tl.minimum(Tk, m0 + BT), BJ)
    n_full = (m0 + 1) // BJ  # tiles whose every key is <= every row of the block
    for it in range(0, n_tiles - n_full):  # diagonal tiles, right to left
        n0 = (n_tiles - 1 - it) * BJ
        b_dq, R = _dq_tile(b_dq, R, g, keys, feat, dep, bnd, dense, b, n0, o_i, o_t, m_i, o_w, m_w,
                           Tq, Tk, W, V, SF, COMPACT, BINARY, True, BJ)
    for it in range(0, n_full):  # full tiles, right to left
        n0 = (n_full - 1 - it) * BJ
        b_dq, R = _dq_tile(b_dq, R, g, keys, feat, dep, bnd, dense, b, n0, o_i, o_t, m_i, o_w, m_w,
                           Tq, Tk, W, V, SF, COMPACT, BINARY, False, BJ)
    tl.store(dq + (b * Tq + o_i[:, None]) * W + o_w[None, :], b_dq, mask=m_i[:, None] & m_w[None, :])


# ---------------------------------------------------------------------------------------------
# Backward: dkeys and dfeat (key-stationary)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dkf_tile(b_dk, carry, cur, G, b_k, c_k, d_k, sm_k, g, q, feat, bnd, dense, dfeat, b, mi, n0,
              o_j, o_w, m_w, Tq, Tk, W, V, SF,
              COMPACT: tl.constexpr, BINARY: tl.constexpr, MASKED: tl.constexpr,
              BT: tl.constexpr, BJ: tl.constexpr):
    off = Tk - Tq
    o_i = mi * BT + tl.arange(0, BT)
    o_t = off + o_i
    m_i = o_i < Tq
    vis = m_i[:, None] & (o_j[None, :] <= o_t[:, None])
    S, G = _tape_kstat(G, c_k, d_k, sm_k, bnd, dense, b, o_i, o_t, m_i, o_j, n0, vis, Tq, Tk,
                       COMPACT, MASKED, BJ)
    idx = _depth_index(S, V, BINARY)
    b_g = tl.load(g + (b * Tq + o_i[:, None]) * Tk + o_j[None, :], mask=vis, other=0.0).to(tl.float32)
    b_q = _rows_chunk(q, b, o_i, m_i, o_w, m_w, Tq, W)
    pre = b_k[None, :, :] + _feat_tile(feat, idx, o_w, m_w, SF, V, BINARY)
    x = tl.where(pre > 0.0, b_g[:, :, None] * b_q[:, None, :], 0.0)  # [BT, BJ, BW]
    xs = tl.sum(x, axis=0)
    b_dk += xs

    # dfeat: per key column, the depth indices of this tile's visible rows span lo..hi
    lo = tl.min(tl.where(vis, idx, V), axis=0)
    hi = tl.max(tl.where(vis, idx, -1), axis=0)
    has = hi >= 0
    # a column whose latest index changes flushes its carry (one atomic row) and carries hi
    switch = has & (hi != cur)
    p_c = dfeat + tl.maximum(cur, 0)[:, None] * SF + o_w[None, :]
    tl.atomic_add(p_c, carry, mask=(switch & (cur >= 0))[:, None] & m_w[None, :], sem="relaxed")
    carry = tl.where(switch[:, None], 0.0, carry)
    cur = tl.where(switch, hi, cur)
    span = tl.max(tl.where(has, hi - lo, 0), axis=0)
    if span == 0:
        carry += xs  # one index per column, the carried one
    else:
        for r in range(0, span + 1):
            v = lo + r
            sel = vis & (idx == v[None, :])
            y = tl.sum(tl.where(sel[:, :, None], x, 0.0), axis=0)
            keep = v == cur
            carry += tl.where(keep[:, None], y, 0.0)
            flush = (~keep) & (tl.max(sel.to(tl.int32), axis=0) > 0)
            p_v = dfeat + tl.minimum(v, V - 1)[:, None] * SF + o_w[None, :]
            tl.atomic_add(p_v, y, mask=flush[:, None] & m_w[None, :], sem="relaxed")
    return b_dk, carry, cur, G


@triton.autotune(configs=_configs(DKF_TILES), key=_KEY, reset_to_zero=["dfeat"])
@triton.jit(do_not_specialize=["Tq", "Tk", "W_BUCKET", "V_BUCKET"])
def attachment_bwd_dkf_kernel(
    g, q, keys, feat, dep, bnd, dense, dkeys, dfeat,
    Tq, Tk, W, V, SF, W_BUCKET, V_BUCKET,
    COMPACT: tl.constexpr, BINARY: tl.constexpr, SCAN: tl.constexpr,
    BT: tl.constexpr, BJ: tl.constexpr, BW: tl.constexpr,
):
    """dkeys[keys, chunk] = sum_{i: t >= j} x and dfeat (atomics into a zeroed fp32 [V, W], see the
    module docstring); x = g q [keys + feat[idx] > 0]. Grid (key blocks x w chunks, B)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n_wblk = tl.cdiv(W, BW)
    n0 = (pid // n_wblk) * BJ
    o_w = (pid % n_wblk) * BW + tl.arange(0, BW)
    m_w = o_w < W
    off = Tk - Tq
    o_j = n0 + BJ - 1 - tl.arange(0, BJ)  # reversed key order
    m_j = o_j < Tk
    b_k = _rows_chunk(keys, b, o_j, m_j, o_w, m_w, Tk, W)

    n_iblk = tl.cdiv(Tq, BT)
    mi_lo = tl.maximum(n0 - off, 0) // BT  # first query block with a row at or after the tile
    # first query block whose every row is >= every key of the tile
    mi_full = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(n0 + BJ - 1 - off, 0), BT), mi_lo), n_iblk)
    if COMPACT:
        c_k = tl.load(bnd + b * Tk + o_j, mask=m_j, other=_BIG)
        d_k = tl.load(dep + b * Tk + o_j, mask=m_j, other=0)
        sm_k = tl.associative_scan(c_k, 0, _min_combine)  # suffix min (reversed columns)
        G = _gap_min(bnd, b, n0 + BJ, off + mi_lo * BT, Tk, SCAN)  # keys between the tile and the rows
    else:
        c_k = o_j
        d_k = o_j
        sm_k = o_j
        G = tl.full([], 0, tl.int32)

    b_dk = tl.zeros([BJ, BW], tl.float32)
    carry = tl.zeros([BJ, BW], tl.float32)  # dfeat of row cur[j], not yet added
    cur = tl.full([BJ], -1, tl.int32)
    for mi in range(mi_lo, mi_full):  # blocks crossing the diagonal
        b_dk, carry, cur, G = _dkf_tile(b_dk, carry, cur, G, b_k, c_k, d_k, sm_k, g, q, feat, bnd, dense, dfeat,
                                        b, mi, n0, o_j, o_w, m_w, Tq, Tk, W, V, SF,
                                        COMPACT, BINARY, True, BT, BJ)
    for mi in range(mi_full, n_iblk):  # blocks below the tile
        b_dk, carry, cur, G = _dkf_tile(b_dk, carry, cur, G, b_k, c_k, d_k, sm_k, g, q, feat, bnd, dense, dfeat,
                                        b, mi, n0, o_j, o_w, m_w, Tq, Tk, W, V, SF,
                                        COMPACT, BINARY, False, BT, BJ)
    p_c = dfeat + tl.maximum(cur, 0)[:, None] * SF + o_w[None, :]
    tl.atomic_add(p_c, carry, mask=(cur >= 0)[:, None] & m_w[None, :], sem="relaxed")
    tl.store(dkeys + (b * Tk + o_j[:, None]) * W + o_w[None, :], b_dk, mask=m_j[:, None] & m_w[None, :])


# ---------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------


_DENSE_DTYPES = (torch.int8, torch.int16, torch.int32)


def _common(q, keys, feat, depth, boundary, dense, binary):
    """Shapes, the tape pointers and the launch constexprs; validates the layout contract (the
    public op validates values)."""
    if q.dim() != 3 or keys.dim() != 3 or feat.dim() != 2:
        raise ValueError(f"attachment kernels: expected q [B, Tq, W], keys [B, Tk, W], feat [V, W], got "
                         f"{list(q.shape)}, {list(keys.shape)}, {list(feat.shape)}")
    B, Tq, W = q.shape
    Tk, V = keys.shape[1], feat.shape[0]
    if keys.shape[0] != B or keys.shape[2] != W or feat.shape[1] != W:
        raise ValueError(f"attachment kernels: keys must be [B={B}, Tk, W={W}] and feat [V, W={W}], got "
                         f"{list(keys.shape)} and {list(feat.shape)}")
    if not (q.dtype == keys.dtype == feat.dtype):
        raise TypeError(f"attachment kernels: q, keys and feat must share one dtype, got {q.dtype}, {keys.dtype}, {feat.dtype}")
    if Tq > Tk:
        raise ValueError(f"attachment kernels: Tq={Tq} must be <= Tk={Tk}")
    if V < 1:
        raise ValueError("attachment kernels: feat needs at least one row (V >= 1)")
    if B > MAX_GRID_YZ:  # the grids are (blocks, B)
        raise ValueError(f"attachment kernels: batch size B must be <= {MAX_GRID_YZ}, got B={B}")
    compact = dense is None
    if compact:
        if depth is None or boundary is None:
            raise ValueError("attachment kernels: pass either dense or (depth, boundary)")
        if depth.shape != (B, Tk) or boundary.shape != (B, Tk):
            raise ValueError(f"attachment kernels: depth and boundary must be [B, Tk]={[B, Tk]}, got "
                             f"{list(depth.shape)} and {list(boundary.shape)}")
        depth = depth.to(torch.int32).contiguous()
        boundary = boundary.to(torch.int32).contiguous()
        dense = depth  # unused placeholder pointer
    else:
        if depth is not None or boundary is not None:
            raise ValueError("attachment kernels: pass either dense or (depth, boundary), not both")
        if dense.shape != (B, Tq, Tk):
            raise ValueError(f"attachment kernels: dense tape must be [B, Tq, Tk]={[B, Tq, Tk]}, got {list(dense.shape)}")
        if dense.dtype not in _DENSE_DTYPES:  # int64 and friends saturate into int32
            dense = dense.to(torch.int64).clamp(-2**31, 2**31 - 1).to(torch.int32)
        dense = dense.contiguous()
        depth = boundary = dense  # unused placeholder pointers
    meta = dict(COMPACT=compact, BINARY=bool(binary))
    buckets = (next_power_of_2(W), next_power_of_2(V))
    return B, Tq, Tk, W, V, depth, boundary, dense, buckets, meta


def _padded_table(feat):
    """feat with its row stride SF rounded up to a multiple of 16 elements (a zero-padded copy of
    the small [V, W] table when W is not one already), so the per-element gathers of feat rows,
    and the dfeat atomics, vectorize (Triton proves 16-element alignment from SF's
    specialization); at W = 60 unpadded gathers cost 200 B of register spills in the forward's
    32 x 32 x 8 tile. Returns (table, SF)."""
    V, W = feat.shape
    SF = cdiv(W, 16) * 16
    if SF == W:
        return feat, SF
    padded = torch.zeros((V, SF), device=feat.device, dtype=feat.dtype)
    padded[:, :W] = feat
    return padded, SF


@on_tensor_device
def attachment_fwd(q, keys, feat, depth, boundary, dense, binary: bool) -> torch.Tensor:
    """Scores [B, Tq, Tk] fp32 (-inf where j > t).

    q [B, Tq, W], keys [B, Tk, W], feat [V, W] contiguous, one dtype (fp32/fp16/bf16); tape either
    compact (depth, boundary [B, Tk] int; dense None) or dense ([B, Tq, Tk] int8/16/32)."""
    B, Tq, Tk, W, V, depth, boundary, dense, buckets, meta = _common(q, keys, feat, depth, boundary, dense, binary)
    q, keys = q.contiguous(), keys.contiguous()
    out = torch.empty((B, Tq, Tk), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    feat, SF = _padded_table(feat.contiguous())
    grid = lambda META: (cdiv(Tq, META["BT"]) * cdiv(Tk, META["BJ"]), B)  # noqa: E731
    attachment_fwd_kernel[grid](q, keys, feat, depth, boundary, dense, out, Tq, Tk, W, V, SF, *buckets,
                                SCAN=_SCAN, **meta, **LAUNCH_OPTIONS)
    return out


@on_tensor_device
def attachment_bwd(g, q, keys, feat, depth, boundary, dense, binary: bool):
    """(dq [B, Tq, W], dkeys [B, Tk, W], dfeat [V, W]) in fp32 for upstream g [B, Tq, Tk] (its
    entries above the diagonal are never read, so they may hold anything, NaN included).
    dfeat's summation order is not deterministic on GPU (atomics; see the module docstring)."""
    B, Tq, Tk, W, V, depth, boundary, dense, buckets, meta = _common(q, keys, feat, depth, boundary, dense, binary)
    if g.shape != (B, Tq, Tk):
        raise ValueError(f"attachment kernels: g must be [B, Tq, Tk]={[B, Tq, Tk]}, got {list(g.shape)}")
    g, q, keys = g.contiguous(), q.contiguous(), keys.contiguous()
    feat, SF = _padded_table(feat.contiguous())
    dev = q.device
    dq = torch.empty((B, Tq, W), device=dev, dtype=torch.float32)
    dkeys = torch.empty((B, Tk, W), device=dev, dtype=torch.float32)
    dfeat = torch.zeros((V, SF), device=dev, dtype=torch.float32)  # atomics add into it
    if dq.numel():
        grid_q = lambda META: (cdiv(Tq, META["BT"]) * cdiv(W, META["BW"]), B)  # noqa: E731
        attachment_bwd_dq_kernel[grid_q](g, keys, feat, depth, boundary, dense, dq, Tq, Tk, W, V, SF, *buckets, **meta, **LAUNCH_OPTIONS)
    if dkeys.numel():  # also with Tq = 0: keys no query reaches get zeros
        grid_k = lambda META: (cdiv(Tk, META["BJ"]) * cdiv(W, META["BW"]), B)  # noqa: E731
        attachment_bwd_dkf_kernel[grid_k](g, q, keys, feat, depth, boundary, dense, dkeys, dfeat,
                                          Tq, Tk, W, V, SF, *buckets, SCAN=_SCAN, **meta, **LAUNCH_OPTIONS)
    return dq, dkeys, (dfeat if SF == W else dfeat[:, :W].contiguous())

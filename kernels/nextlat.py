"""Triton kernels for the fused linear cross-entropy + KL loss of NextLat (fastmodels.ops.nextlat).

Notation (spec ../shared/specs/nextlat.md, sections 2-3): hidden rows h_s [N, D] with targets y_s,
predicted rows h^_m [M, D] whose KL teacher is row t = teacher_index[m], LM head W [V, D] and bias
b [V]. Logits z = h W^T + b are accumulated and softmaxed in fp32 and never stored: every kernel
recomputes the [BM, BV] logit tiles it needs from h and W (Cut-Cross-Entropy style).

Forward (two passes, deterministic):
  1. ``nextlat_ce_fwd_kernel``: grid (row blocks of N, V splits). Online log-sum-exp over the V
     tiles of the program's split plus the target logit; the host merges the splits
     (logsumexp over at most a few partials per row) into lse [N] and ce_rows [N].
  2. ``nextlat_kl_fwd_kernel``: grid (row blocks of M, V splits). Each predicted row is stacked
     with its teacher row, so one W tile load feeds both dots; the teacher's softmax reuses lse_t
     from pass 1. Partials: LSE of the student logits and sum_v p_t,v (z_t,v - z^_m,v).
     kl_m = that sum - lse_t + lse_pred_m.

Backward, with dz = g_s (p_s - onehot(y_s)) for CE rows and dz = w_m (q_m - p_t) for KL rows:
  deterministic=True (no atomics; every output element is owned by one program):
    ``nextlat_bwd_rows_kernel``: grid (row blocks, D slices of width BDO); loops over V,
        dX[rows, slice] += dz @ W[:, slice]  (used for dhidden and, with KL=True, dpred).
    ``nextlat_bwd_dw_kernel``: grid (V tiles, D slices); loops over all N rows,
        dW[tile, slice] += dz^T @ h[:, slice], dbias[tile] += sum_rows dz.
    Both recompute the logit tile once per D slice (cdiv(D, BDO) times).
  deterministic=False: ``nextlat_bwd_atomic_kernel``: grid (row blocks, V tiles); one logit tile
    per program, then fp32 atomic adds of dz @ W into dX and dz^T @ X into dW (CCE's scheme).
  Row blocks whose upstream factors are all zero (ignored targets, zero KL weights) are skipped.

Inputs fp32/fp16/bf16. On GPU low-precision dots run natively (dz is rounded to the input dtype
for the two gradient matmuls, as PyTorch's own backward would) with fp32 accumulators; fp32
inputs use IEEE fp32 dots. Under TRITON_INTERPRET=1 everything is upcast to fp32 after tl.load
(the interpreter cannot compute bf16 dots) and a single small config is used.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from ._host import LAUNCH_OPTIONS, cdiv, interpreting, next_power_of_2, on_tensor_device
from ._tuning import gpu_configs

_INTERPRET = interpreting()

# Under the interpreter: small blocks so that tiny test shapes still exercise multi-tile loops,
# masks on every dimension and (via _interp_v_chunk) more than one V split.
_INTERP_BLOCKS = dict(BM=16, BV=32, BD=16)
_INTERP_V_CHUNK = 64  # multiple of _INTERP_BLOCKS["BV"]
_GPU_V_CHUNK_MULTIPLE = 128  # largest BV of any GPU config: splits are whole tiles


def _configs(gpu):
    """A single config under the interpreter, else the (<= 4) GPU configs ``gpu``."""
    if _INTERPRET:
        return [triton.Config(dict(_INTERP_BLOCKS), num_warps=1, num_stages=1)]
    return gpu_configs([triton.Config(dict(BM=bm, BV=bv, BD=bd), num_warps=w, num_stages=s) for bm, bv, bd, w, s in gpu])


# GPU configs were timed on an H200 (Triton 3.6) at N=8192, D=768, V=50257, bf16; the winners
# there are listed first. Forward CE pass: one logit tile per step.
_FWD_CONFIGS = _configs([(128, 128, 32, 4, 4), (256, 128, 64, 8, 3), (64, 64, 64, 4, 4), (128, 256, 64, 8, 3)])
# KL pass: two logit tiles (student + teacher) per program, so fewer rows and wider V tiles.
_KL_FWD_CONFIGS = _configs([(64, 256, 64, 8, 3), (64, 128, 32, 4, 4), (64, 128, 64, 8, 3), (32, 128, 64, 4, 3)])
# Deterministic backward: the accumulator is [BM, BDO] (rows) or [BV, BDO] (dW) on top of a
# logit tile; keep the tiles moderate.
_BWD_CONFIGS = _configs([(64, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 64, 64, 8, 3), (32, 64, 64, 4, 3)])
# Atomic backward: one logit tile per program, then a D loop of two dots + fp32 atomics; larger
# tiles mean fewer atomics (dX traffic ~ V/BV, dW traffic ~ N/BM); 256-wide tiles spill.
_ATOMIC_CONFIGS = _configs([(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 64, 8, 3), (64, 64, 64, 4, 3)])


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr):
    """acc + a @ b with an fp32 accumulator (IEEE fp32 inputs, or native fp16/bf16 inputs)."""
    if DOT_F32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a.to(b.dtype), b, acc)
    return acc


@triton.jit
def _logit_tile(x_ptr, o_r, m_r, w_ptr, b_ptr, o_v, m_v, D,
                HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
                BM: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr):
    """fp32 logits z[BM, BV] = x[o_r] @ W[o_v]^T (+ b[o_v]); masked rows/columns give 0 (+ b)."""
    b_z = tl.zeros([BM, BV], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        b_x = tl.load(x_ptr + o_r[:, None] * D + o_d[None, :], mask=m_r[:, None] & m_d[None, :], other=0.0)
        b_w = tl.load(w_ptr + o_v[:, None] * D + o_d[None, :], mask=m_v[:, None] & m_d[None, :], other=0.0)
        b_z = _dot(b_x, tl.trans(b_w), b_z, DOT_F32)
    if HAS_BIAS:
        b_z += tl.load(b_ptr + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :]
    return b_z


@triton.jit
def _logit_tile_pair(x_ptr, o_r, t_ptr, o_t, m_r, w_ptr, b_ptr, o_v, m_v, D,
                     HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
                     BM: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr):
    """Student logits x[o_r] W^T and teacher logits t[o_t] W^T, sharing every W tile load."""
    b_zq = tl.zeros([BM, BV], dtype=tl.float32)
    b_zt = tl.zeros([BM, BV], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        m_rd = m_r[:, None] & m_d[None, :]
        b_w = tl.trans(tl.load(w_ptr + o_v[:, None] * D + o_d[None, :], mask=m_v[:, None] & m_d[None, :], other=0.0))
        b_x = tl.load(x_ptr + o_r[:, None] * D + o_d[None, :], mask=m_rd, other=0.0)
        b_zq = _dot(b_x, b_w, b_zq, DOT_F32)
        b_t = tl.load(t_ptr + o_t[:, None] * D + o_d[None, :], mask=m_rd, other=0.0)
        b_zt = _dot(b_t, b_w, b_zt, DOT_F32)
    if HAS_BIAS:
        b_b = tl.load(b_ptr + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :]
        b_zq += b_b
        b_zt += b_b
    return b_zq, b_zt


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.autotune(configs=_FWD_CONFIGS, key=["D", "V", "HAS_BIAS", "DOT_F32"])
@triton.jit(do_not_specialize=["N"])
def nextlat_ce_fwd_kernel(h_ptr, w_ptr, b_ptr, y_ptr, lse_part_ptr, zy_part_ptr,
                          N, D, V, V_CHUNK, ignore_index,
                          HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
                          BM: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    o_r = pid_r.to(tl.int64) * BM + tl.arange(0, BM)
    m_r = o_r < N
    b_y = tl.load(y_ptr + o_r, mask=m_r, other=ignore_index)
    v_start = pid_s * V_CHUNK
    v_end = tl.minimum(v_start + V_CHUNK, V)

    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_s = tl.zeros([BM], dtype=tl.float32)
    b_zy = tl.zeros([BM], dtype=tl.float32)
    for v0 in range(v_start, v_end, BV):
        o_v = (v0 + tl.arange(0, BV)).to(tl.int64)
        m_v = o_v < v_end
        b_z = _logit_tile(h_ptr, o_r, m_r, w_ptr, b_ptr, o_v, m_v, D, HAS_BIAS, DOT_F32, BM, BV, BD)
        b_z = tl.where(m_v[None, :], b_z, float("-inf"))
        b_zy += tl.sum(tl.where((o_v[None, :] == b_y[:, None]) & m_v[None, :], b_z, 0.0), axis=1)
        b_m_new = tl.maximum(b_m, tl.max(b_z, axis=1))
        b_s = b_s * tl.exp(b_m - b_m_new) + tl.sum(tl.exp(b_z - b_m_new[:, None]), axis=1)
        b_m = b_m_new
    tl.store(lse_part_ptr + pid_s.to(tl.int64) * N + o_r, b_m + tl.log(b_s), mask=m_r)
    tl.store(zy_part_ptr + pid_s.to(tl.int64) * N + o_r, b_zy, mask=m_r)


@triton.autotune(configs=_KL_FWD_CONFIGS, key=["D", "V", "HAS_BIAS", "DOT_F32"])
@triton.jit(do_not_specialize=["M"])
def nextlat_kl_fwd_kernel(pred_ptr, h_ptr, t_ptr, w_ptr, b_ptr, lse_ptr, lseq_part_ptr, cross_part_ptr,
                          M, D, V, V_CHUNK,
                          HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
                          BM: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    o_r = pid_r.to(tl.int64) * BM + tl.arange(0, BM)
    m_r = o_r < M
    o_t = tl.load(t_ptr + o_r, mask=m_r, other=0).to(tl.int64)
    b_lse_t = tl.load(lse_ptr + o_t, mask=m_r, other=0.0)
    v_start = pid_s * V_CHUNK
    v_end = tl.minimum(v_start + V_CHUNK, V)

    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_s = tl.zeros([BM], dtype=tl.float32)
    b_cross = tl.zeros([BM], dtype=tl.float32)  # sum_v p_t,v (z_t,v - z^_v) over this split
    for v0 in range(v_start, v_end, BV):
        o_v = (v0 + tl.arange(0, BV)).to(tl.int64)
        m_v = o_v < v_end
        b_zq, b_zt = _logit_tile_pair(pred_ptr, o_r, h_ptr, o_t, m_r, w_ptr, b_ptr, o_v, m_v, D,
                                      HAS_BIAS, DOT_F32, BM, BV, BD)
        b_p = tl.where(m_v[None, :], tl.exp(b_zt - b_lse_t[:, None]), 0.0)
        b_cross += tl.sum(b_p * (b_zt - b_zq), axis=1)
        b_zq = tl.where(m_v[None, :], b_zq, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_zq, axis=1))
        b_s = b_s * tl.exp(b_m - b_m_new) + tl.sum(tl.exp(b_zq - b_m_new[:, None]), axis=1)
        b_m = b_m_new
    tl.store(lseq_part_ptr + pid_s.to(tl.int64) * M + o_r, b_m + tl.log(b_s), mask=m_r)
    tl.store(cross_part_ptr + pid_s.to(tl.int64) * M + o_r, b_cross, mask=m_r)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dlogits(x_ptr, h_ptr, o_r, m_r, o_t, w_ptr, b_ptr, o_v, m_v, D, b_y, b_g, b_lse, b_lse_t,
             KL: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
             BM: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr):
    """Gradient of the loss w.r.t. one fp32 logit tile (0 on masked columns and zero-g rows).

    CE rows (KL=False): g_s (softmax(z_s) - onehot(y_s)); KL rows: w_m (softmax(z^_m) - p_t)."""
    if KL:
        b_zq, b_zt = _logit_tile_pair(x_ptr, o_r, h_ptr, o_t, m_r, w_ptr, b_ptr, o_v, m_v, D,
                                      HAS_BIAS, DOT_F32, BM, BV, BD)
        b_dz = tl.exp(b_zq - b_lse[:, None]) - tl.exp(b_zt - b_lse_t[:, None])
    else:
        b_z = _logit_tile(x_ptr, o_r, m_r, w_ptr, b_ptr, o_v, m_v, D, HAS_BIAS, DOT_F32, BM, BV, BD)
        b_dz = tl.exp(b_z - b_lse[:, None]) - tl.where(o_v[None, :] == b_y[:, None], 1.0, 0.0)
    return tl.where(m_v[None, :], b_dz, 0.0) * b_g[:, None]


@triton.jit
def _row_factors(g_ptr, y_ptr, lse_ptr, t_ptr, lse_t_ptr, o_r, m_r, ignore_index, KL: tl.constexpr):
    """Per-row upstream factor (0 for masked and ignored rows, whatever was passed), target,
    row LSE, teacher index and teacher LSE (the last two only for KL rows)."""
    b_g = tl.load(g_ptr + o_r, mask=m_r, other=0.0).to(tl.float32)
    b_lse = tl.load(lse_ptr + o_r, mask=m_r, other=0.0)
    if KL:
        b_y = tl.zeros_like(o_r)
        o_t = tl.load(t_ptr + o_r, mask=m_r, other=0).to(tl.int64)
        b_lse_t = tl.load(lse_t_ptr + o_t, mask=m_r, other=0.0)
        b_g = tl.where(m_r, b_g, 0.0)
    else:
        b_y = tl.load(y_ptr + o_r, mask=m_r, other=ignore_index)
        o_t = o_r
        b_lse_t = b_lse
        b_g = tl.where(m_r & (b_y != ignore_index), b_g, 0.0)
    return b_g, b_y, b_lse, o_t, b_lse_t


@triton.autotune(configs=_BWD_CONFIGS, key=["D", "V", "KL", "HAS_BIAS", "DOT_F32", "BDO"])
@triton.jit(do_not_specialize=["R"])
def nextlat_bwd_rows_kernel(x_ptr, h_ptr, t_ptr, w_ptr, b_ptr, y_ptr, g_ptr, lse_ptr, lse_t_ptr, dx_ptr,
                            R, D, V, ignore_index,
                            KL: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, BDO: tl.constexpr,
                            BM: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr):
    """dX[rows, D slice] = sum over V tiles of dz @ W[tile, slice]; no atomics."""
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    o_r = pid_r.to(tl.int64) * BM + tl.arange(0, BM)
    m_r = o_r < R
    o_do = pid_d.to(tl.int64) * BDO + tl.arange(0, BDO)
    m_do = o_do < D
    b_g, b_y, b_lse, o_t, b_lse_t = _row_factors(g_ptr, y_ptr, lse_ptr, t_ptr, lse_t_ptr, o_r, m_r, ignore_index, KL)

    b_dx = tl.zeros([BM, BDO], dtype=tl.float32)
    if tl.max(tl.abs(b_g), axis=0) > 0.0:  # skip blocks of ignored / zero-weight rows
        for v0 in range(0, V, BV):
            o_v = (v0 + tl.arange(0, BV)).to(tl.int64)
            m_v = o_v < V
            b_dz = _dlogits(x_ptr, h_ptr, o_r, m_r, o_t, w_ptr, b_ptr, o_v, m_v, D, b_y, b_g, b_lse, b_lse_t,
                            KL, HAS_BIAS, DOT_F32, BM, BV, BD)
            b_w = tl.load(w_ptr + o_v[:, None] * D + o_do[None, :], mask=m_v[:, None] & m_do[None, :], other=0.0)
            b_dx = _dot(b_dz, b_w, b_dx, DOT_F32)
    tl.store(dx_ptr + o_r[:, None] * D + o_do[None, :], b_dx.to(dx_ptr.dtype.element_ty),
             mask=m_r[:, None] & m_do[None, :])


@triton.autotune(configs=_BWD_CONFIGS, key=["D", "V", "HAS_BIAS", "DOT_F32", "BDO"])
@triton.jit(do_not_specialize=["N"])
def nextlat_bwd_dw_kernel(h_ptr, w_ptr, b_ptr, y_ptr, g_ptr, lse_ptr, dw_ptr, db_ptr,
                          N, D, V, ignore_index,
                          HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, BDO: tl.constexpr,
                          BM: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr):
    """dW[V tile, D slice] = sum over all row blocks of dz^T @ h[rows, slice] (+ dbias); no atomics."""
    pid_v = tl.program_id(0)
    pid_d = tl.program_id(1)
    o_v = pid_v.to(tl.int64) * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_do = pid_d.to(tl.int64) * BDO + tl.arange(0, BDO)
    m_do = o_do < D

    b_dw = tl.zeros([BV, BDO], dtype=tl.float32)
    b_db = tl.zeros([BV], dtype=tl.float32)
    for r0 in range(0, N, BM):
        o_r = r0 + tl.arange(0, BM).to(tl.int64)
        m_r = o_r < N
        b_g, b_y, b_lse, o_t, b_lse_t = _row_factors(g_ptr, y_ptr, lse_ptr, g_ptr, lse_ptr, o_r, m_r,
                                                     ignore_index, False)
        if tl.max(tl.abs(b_g), axis=0) > 0.0:  # skip blocks of ignored / zero-weight rows
            b_dz = _dlogits(h_ptr, h_ptr, o_r, m_r, o_t, w_ptr, b_ptr, o_v, m_v, D, b_y, b_g, b_lse, b_lse_t,
                            False, HAS_BIAS, DOT_F32, BM, BV, BD)
            b_h = tl.load(h_ptr + o_r[:, None] * D + o_do[None, :], mask=m_r[:, None] & m_do[None, :], other=0.0)
            b_dw = _dot(tl.trans(b_dz), b_h, b_dw, DOT_F32)
            if HAS_BIAS:
                b_db += tl.sum(b_dz, axis=0)
    tl.store(dw_ptr + o_v[:, None] * D + o_do[None, :], b_dw.to(dw_ptr.dtype.element_ty),
             mask=m_v[:, None] & m_do[None, :])
    if HAS_BIAS:
        tl.store(db_ptr + o_v, b_db.to(db_ptr.dtype.element_ty), mask=m_v & ((tl.zeros([BV], dtype=tl.int32) + pid_d) == 0))


@triton.autotune(configs=_ATOMIC_CONFIGS, key=["D", "V", "KL", "HAS_BIAS", "DOT_F32"],
                 reset_to_zero=["dx_ptr", "dw_ptr", "db_ptr"])
@triton.jit(do_not_specialize=["R"])
def nextlat_bwd_atomic_kernel(x_ptr, h_ptr, t_ptr, w_ptr, b_ptr, y_ptr, g_ptr, lse_ptr, lse_t_ptr,
                              dx_ptr, dw_ptr, db_ptr,
                              R, D, V, ignore_index,
                              KL: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
                              BM: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr):
    """One (row block, V tile) logit tile; fp32 atomic adds of dz @ W into dX and, for CE rows,
    dz^T @ X into dW and column sums of dz into dbias."""
    pid_r = tl.program_id(0)
    pid_v = tl.program_id(1)
    o_r = pid_r.to(tl.int64) * BM + tl.arange(0, BM)
    m_r = o_r < R
    o_v = pid_v.to(tl.int64) * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_g, b_y, b_lse, o_t, b_lse_t = _row_factors(g_ptr, y_ptr, lse_ptr, t_ptr, lse_t_ptr, o_r, m_r, ignore_index, KL)
    if tl.max(tl.abs(b_g), axis=0) > 0.0:  # skip blocks of ignored / zero-weight rows
        b_dz = _dlogits(x_ptr, h_ptr, o_r, m_r, o_t, w_ptr, b_ptr, o_v, m_v, D, b_y, b_g, b_lse, b_lse_t,
                        KL, HAS_BIAS, DOT_F32, BM, BV, BD)
        for d0 in range(0, D, BD):
            o_d = d0 + tl.arange(0, BD)
            m_d = o_d < D
            m_rd = m_r[:, None] & m_d[None, :]
            m_vd = m_v[:, None] & m_d[None, :]
            b_w = tl.load(w_ptr + o_v[:, None] * D + o_d[None, :], mask=m_vd, other=0.0)
            b_dx = _dot(b_dz, b_w, tl.zeros([BM, BD], dtype=tl.float32), DOT_F32)
            tl.atomic_add(dx_ptr + o_r[:, None] * D + o_d[None, :], b_dx, mask=m_rd, sem="relaxed")
            if not KL:
                b_x = tl.load(x_ptr + o_r[:, None] * D + o_d[None, :], mask=m_rd, other=0.0)
                b_dw = _dot(tl.trans(b_dz), b_x, tl.zeros([BV, BD], dtype=tl.float32), DOT_F32)
                tl.atomic_add(dw_ptr + o_v[:, None] * D + o_d[None, :], b_dw, mask=m_vd, sem="relaxed")
        if HAS_BIAS and not KL:
            tl.atomic_add(db_ptr + o_v, tl.sum(b_dz, axis=0), mask=m_v, sem="relaxed")


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------


def _dot_f32(dtype: torch.dtype) -> bool:
    return _INTERPRET or dtype == torch.float32


def _v_chunk(rows: int, V: int, device: torch.device) -> tuple[int, int]:
    """(V_CHUNK, number of V splits) for the forward passes: split the vocabulary when there are
    too few row blocks to fill the GPU (about two programs per SM), in whole 128-column tiles."""
    if _INTERPRET or device.type != "cuda":
        chunk = _INTERP_V_CHUNK
    else:
        n_sm = torch.cuda.get_device_properties(device).multi_processor_count
        row_blocks = cdiv(max(rows, 1), 64)
        splits = max(1, min(cdiv(2 * n_sm, row_blocks), cdiv(V, 2048)))
        chunk = cdiv(cdiv(V, splits), _GPU_V_CHUNK_MULTIPLE) * _GPU_V_CHUNK_MULTIPLE
    return chunk, cdiv(V, chunk)


def _bdo(D: int) -> int:
    """Width of the D slice owned by one program of the deterministic backward kernels."""
    cap = 32 if _INTERPRET else 256
    return min(cap, max(16, next_power_of_2(D)))


def _merge_lse(parts: torch.Tensor) -> torch.Tensor:
    return parts[0] if parts.shape[0] == 1 else torch.logsumexp(parts, dim=0)


@on_tensor_device
def lce_kl_fwd(hidden, weight, bias, targets, pred, teacher_index, ignore_index: int):
    """Forward of the fused linear CE + KL loss; see the module docstring.

    Returns (ce_rows [N], lse [N], kl_rows [M], lse_pred [M]), all fp32; ce_rows is 0 on rows
    whose target is ``ignore_index``; kl_rows is the unweighted KL(teacher || student) per row."""
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    M = 0 if pred is None else pred.shape[0]
    has_bias = bias is not None
    dot_f32 = _dot_f32(hidden.dtype)
    b_arg = bias if has_bias else weight  # never read when HAS_BIAS is False

    lse = torch.empty(N, device=dev, dtype=torch.float32)
    ce_rows = torch.empty(N, device=dev, dtype=torch.float32)
    if N > 0:
        chunk, splits = _v_chunk(N, V, dev)
        lse_part = torch.empty(splits, N, device=dev, dtype=torch.float32)
        zy_part = torch.empty(splits, N, device=dev, dtype=torch.float32)
        grid = lambda meta: (cdiv(N, meta["BM"]), splits)  # noqa: E731
        nextlat_ce_fwd_kernel[grid](hidden, weight, b_arg, targets, lse_part, zy_part,
                                    N, D, V, chunk, ignore_index, HAS_BIAS=has_bias, DOT_F32=dot_f32, **LAUNCH_OPTIONS)
        lse.copy_(_merge_lse(lse_part))
        ce_rows.copy_(torch.where(targets != ignore_index, lse - zy_part.sum(0), 0.0))

    kl_rows = torch.empty(M, device=dev, dtype=torch.float32)
    lse_pred = torch.empty(M, device=dev, dtype=torch.float32)
    if M > 0:
        chunk, splits = _v_chunk(M, V, dev)
        lseq_part = torch.empty(splits, M, device=dev, dtype=torch.float32)
        cross_part = torch.empty(splits, M, device=dev, dtype=torch.float32)
        grid = lambda meta: (cdiv(M, meta["BM"]), splits)  # noqa: E731
        nextlat_kl_fwd_kernel[grid](pred, hidden, teacher_index, weight, b_arg, lse, lseq_part, cross_part,
                                    M, D, V, chunk, HAS_BIAS=has_bias, DOT_F32=dot_f32, **LAUNCH_OPTIONS)
        lse_pred.copy_(_merge_lse(lseq_part))
        kl_rows.copy_(cross_part.sum(0) - lse[teacher_index] + lse_pred)
    return ce_rows, lse, kl_rows, lse_pred


@on_tensor_device
def lce_kl_bwd(grad_ce_rows, grad_kl_rows, hidden, weight, bias, targets, pred, teacher_index,
               lse, lse_pred, ignore_index: int, deterministic: bool):
    """Backward of ``lce_kl_fwd`` for upstream per-row factors; logits recomputed tile by tile.

    Returns (dhidden [N, D], dweight [V, D], dbias [V] or None, dpred [M, D]) in the input dtypes.
    The CE part feeds dhidden/dweight/dbias, the KL part only dpred (head and teacher frozen).
    ``grad_ce_rows`` is treated as 0 on ignored rows whatever it holds."""
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    M = 0 if pred is None else pred.shape[0]
    has_bias = bias is not None
    dot_f32 = _dot_f32(hidden.dtype)
    b_arg = bias if has_bias else weight
    g = grad_ce_rows.to(torch.float32).contiguous()
    w_kl = grad_kl_rows.to(torch.float32).contiguous() if M > 0 else None
    t_arg = teacher_index if M > 0 else targets

    if deterministic:
        bdo = _bdo(D)
        n_dslices = cdiv(D, bdo)
        dhidden = torch.empty_like(hidden)
        dweight = torch.empty_like(weight)
        dbias = torch.empty_like(bias) if has_bias else None
        if N > 0:
            grid = lambda meta: (cdiv(N, meta["BM"]), n_dslices)  # noqa: E731
            nextlat_bwd_rows_kernel[grid](hidden, hidden, t_arg, weight, b_arg, targets, g, lse, lse, dhidden,
                                          N, D, V, ignore_index, KL=False, HAS_BIAS=has_bias, DOT_F32=dot_f32,
                                          BDO=bdo, **LAUNCH_OPTIONS)
            grid = lambda meta: (cdiv(V, meta["BV"]), n_dslices)  # noqa: E731
            nextlat_bwd_dw_kernel[grid](hidden, weight, b_arg, targets, g, lse, dweight,
                                        dbias if has_bias else dweight,
                                        N, D, V, ignore_index, HAS_BIAS=has_bias, DOT_F32=dot_f32, BDO=bdo, **LAUNCH_OPTIONS)
        else:
            dweight.zero_()
            if has_bias:
                dbias.zero_()
        if M > 0:
            dpred = torch.empty_like(pred)
            grid = lambda meta: (cdiv(M, meta["BM"]), n_dslices)  # noqa: E731
            nextlat_bwd_rows_kernel[grid](pred, hidden, teacher_index, weight, b_arg, targets, w_kl, lse_pred, lse,
                                          dpred, M, D, V, ignore_index, KL=True, HAS_BIAS=has_bias,
                                          DOT_F32=dot_f32, BDO=bdo, **LAUNCH_OPTIONS)
        else:
            dpred = hidden.new_empty((0, D))
        return dhidden, dweight, dbias, dpred

    # Non-deterministic: fp32 accumulation buffers filled by atomics, cast at the end.
    f32 = torch.float32
    dhidden32 = torch.zeros(N, D, device=dev, dtype=f32)
    dweight32 = torch.zeros(V, D, device=dev, dtype=f32)
    dbias32 = torch.zeros(V, device=dev, dtype=f32) if has_bias else dweight32
    if N > 0:
        grid = lambda meta: (cdiv(N, meta["BM"]), cdiv(V, meta["BV"]))  # noqa: E731
        nextlat_bwd_atomic_kernel[grid](hidden, hidden, t_arg, weight, b_arg, targets, g, lse, lse,
                                        dhidden32, dweight32, dbias32, N, D, V, ignore_index,
                                        KL=False, HAS_BIAS=has_bias, DOT_F32=dot_f32, **LAUNCH_OPTIONS)
    if M > 0:
        dpred32 = torch.zeros(M, D, device=dev, dtype=f32)
        grid = lambda meta: (cdiv(M, meta["BM"]), cdiv(V, meta["BV"]))  # noqa: E731
        nextlat_bwd_atomic_kernel[grid](pred, hidden, teacher_index, weight, b_arg, targets, w_kl, lse_pred, lse,
                                        dpred32, dpred32, dpred32, M, D, V, ignore_index,
                                        KL=True, HAS_BIAS=has_bias, DOT_F32=dot_f32, **LAUNCH_OPTIONS)
        dpred = dpred32.to(pred.dtype)
    else:
        dpred = hidden.new_empty((0, D))
    dbias = dbias32.to(bias.dtype) if has_bias else None
    return dhidden32.to(hidden.dtype), dweight32.to(weight.dtype), dbias, dpred

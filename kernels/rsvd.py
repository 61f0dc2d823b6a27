"""Triton kernels for the batched randomized SVD (range finder).

Two memory-bound passes over the batch of matrices A [b, m, n]:

* ``sketch_matmul``: Y = A @ Omega_i (or A^T @ Omega_i), where Omega_i ~ N(0, 1) is generated inside
  the kernel with Philox (``tl.randn4x``) and never stored. Entries (row r, cols 4g..4g+3) of
  Omega_i are the four normals of ``randn4x(key, r * ceil(l / 4) + g)`` with the 64-bit Philox key
  ``key = (seed mod 2**32) + (i << 32)``: a pure function of (seed, matrix index i, row, col),
  independent of block sizes and autotuning, so ``sketch_omega`` can materialize exactly the same
  matrix for tests. Cost note: a program regenerates its [BK, BL] tile of Omega for every row block
  of BM rows, so the sketch does m / BM * n * BL normal draws per matrix (one Philox call and two
  Box-Muller transforms per 4 of them); larger BM configs amortize it.
* ``power_pass``: Z = A @ (A^T @ Y) fused over column panels of A. For each panel of BN columns a
  program computes W = A_panel^T @ Y ([BN, l], fp32, registers) and then adds A_panel @ W into Z.
  The second read of A_panel comes right after the first (from L2), so A is read from memory once
  per pass. The partial products of different panels are summed in one of two ways:
    - ``deterministic=True`` (default): a program owns a contiguous group of panels and its own
      slice of a split-K buffer ``part[s, b, m, l]`` (plain read-modify-write per panel, the first
      panel overwrites); ``part.sum(0)`` reduces afterwards. Bit-identical results run to run. Cost:
      each panel reads and writes an [m, l] fp32 slice (8 m l bytes against 2 m BN bytes of bf16 A),
      which goes to HBM when the live slices exceed L2 -- at l ~ 64-128 this traffic exceeds A's.
    - ``deterministic=False``: one panel per program, ``tl.atomic_add`` (fp32) into a zeroed Z. The
      grid runs the panels of one matrix next to each other, so the live part of Z (m l 4 bytes per
      matrix) stays in L2 and A really is read once; the summation order (hence the last bits)
      varies between runs.
  The panel index is the fastest grid axis, so concurrently running programs share a matrix's Y.

Precision: fp32 accumulation everywhere. For fp16/bf16 A the tl.dot operands are A's native dtype:
Omega, Y and W are cast to A's dtype before tl.dot (W = A^T Y is rounded to bf16/fp16 before the
second product; randomization error dominates this, see the spec). For fp32 A, tl.dot runs with
``input_precision="ieee"`` (no TF32). Under the Triton interpreter bf16 arithmetic is wrong, so a bf16
tile is upcast to fp32 right after the load and the product is done in fp32 there.

Block sizes: every tl.dot dimension is >= 16; l is padded to a power of two >= 16 (BL) with masks,
and tiled over a third grid axis when it exceeds 128 (W for a column tile of Y only needs that tile).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from ._host import LAUNCH_OPTIONS, MAX_GRID_YZ, cdiv, interpreting, next_power_of_2, on_tensor_device
from . import _tuning as tuning

_INTERPRET = interpreting()


def _pick(gpu_configs, interp_config):
    """A small autotune grid on GPU, one config under the interpreter (no do_bench there)."""
    return [interp_config] if _INTERPRET else tuning.gpu_configs(gpu_configs)


# ----------------------------------------------------------------------------------------------
# Gaussian test matrix
# ----------------------------------------------------------------------------------------------


@triton.jit
def _omega_tile(seed, mat, o_r, c0, L, BR: tl.constexpr, BC: tl.constexpr):
    """Omega_mat[o_r, c0 : c0 + BC] ~ N(0, 1) as a [BR, BC] tile (c0 and BC multiples of 4).

    Philox-4x32 keyed by (seed, matrix index); counter r * ceil(L / 4) + c // 4 gives the four
    normals of columns 4 (c // 4) .. 4 (c // 4) + 3 (Box-Muller on both pairs of its 4 uniforms:
    tl.randn would use 2 of the 4 words and one of the 2 normals, 4x the Philox work per value)."""
    key = seed.to(tl.int64) + (mat.to(tl.int64) << 32)
    o_g = c0 // 4 + tl.arange(0, BC // 4)
    offs = o_r.to(tl.int32)[:, None] * ((L + 3) // 4) + o_g.to(tl.int32)[None, :]
    n0, n1, n2, n3 = tl.randn4x(key, offs)
    # [BR, BC/4, 2, 2] indexed (group, i, k) -> column 4 group + 2 i + k
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), [BR, BC])


@triton.jit(do_not_specialize=["seed"])
def sketch_omega_kernel(o_ptr, seed, R, L, BR: tl.constexpr, BL: tl.constexpr):
    i_b = tl.program_id(0).to(tl.int64)
    i_r = tl.program_id(1)
    i_l = tl.program_id(2)
    o_r = i_r * BR + tl.arange(0, BR)
    o_c = i_l * BL + tl.arange(0, BL)
    b_o = _omega_tile(seed, i_b, o_r, i_l * BL, L, BR, BL)
    m = (o_r < R)[:, None] & (o_c < L)[None, :]
    p_o = o_ptr + (i_b * R + o_r.to(tl.int64)[:, None]) * L + o_c.to(tl.int64)[None, :]
    tl.store(p_o, b_o, mask=m)


# ----------------------------------------------------------------------------------------------
# Sketch: Y = op(A) @ Omega
# ----------------------------------------------------------------------------------------------


@triton.autotune(
    configs=_pick(
        [
            triton.Config({"BM": 64, "BK": 64}, num_warps=4, num_stages=3),
            triton.Config({"BM": 128, "BK": 64}, num_warps=8, num_stages=3),
            triton.Config({"BM": 64, "BK": 128}, num_warps=4, num_stages=3),
            triton.Config({"BM": 128, "BK": 32}, num_warps=4, num_stages=4),
        ],
        triton.Config({"BM": 16, "BK": 16}, num_warps=4, num_stages=1),
    ),
    key=["M", "K", "L", "BL", "DOT_FP32"],
)
@triton.heuristics({"EVEN_M": lambda args: args["M"] % args["BM"] == 0, "EVEN_K": lambda args: args["K"] % args["BK"] == 0})
@triton.jit(do_not_specialize=["seed"])  # a seed of 1 must not become a constexpr
def sketch_matmul_kernel(
    a_ptr, y_ptr, seed, M, K, L,
    stride_ab, stride_am, stride_ak,
    DOT_FP32: tl.constexpr, EVEN_M: tl.constexpr, EVEN_K: tl.constexpr,
    BL: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
):
    """Y[i] (M x L) = opA[i] (M x K) @ Omega_i (K x L); opA is A or A^T through the strides.
    The A tile is addressed by a scalar base that advances by BK columns and loop-invariant int32
    offsets inside the tile; masks only where M or K is not a multiple of the tile."""
    i_b = tl.program_id(0).to(tl.int64)
    i_m = tl.program_id(1)
    i_l = tl.program_id(2)
    o_r = tl.arange(0, BM)
    o_m = i_m * BM + o_r
    o_l = i_l * BL + tl.arange(0, BL)
    o_kt = tl.arange(0, BK)
    m_m = o_m < M
    m_l = o_l < L
    a_off = o_r[:, None] * stride_am + o_kt[None, :] * stride_ak
    a_cur = a_ptr + i_b * stride_ab + (i_m * BM).to(tl.int64) * stride_am
    acc = tl.zeros([BM, BL], dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + o_kt
        b_o = _omega_tile(seed, i_b, o_k, i_l * BL, L, BK, BL)
        if EVEN_M and EVEN_K:
            b_a = tl.load(a_cur + a_off)
        elif EVEN_K:
            b_a = tl.load(a_cur + a_off, mask=m_m[:, None], other=0.0)
        else:
            m_k = o_k < K
            b_a = tl.load(a_cur + a_off, mask=m_m[:, None] & m_k[None, :], other=0.0)
            b_o = tl.where(m_k[:, None], b_o, 0.0)  # rows of Omega past K
        if DOT_FP32:
            acc += tl.dot(b_a.to(tl.float32), b_o, input_precision="ieee")
        else:
            acc += tl.dot(b_a, b_o.to(b_a.dtype))
        a_cur += BK * stride_ak
    p_y = y_ptr + (i_b * M + o_m[:, None]) * L + o_l[None, :]
    tl.store(p_y, acc, mask=m_m[:, None] & m_l[None, :])


# ----------------------------------------------------------------------------------------------
# Fused power pass: Z = A @ (A^T @ Y)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_panel(p_a, rows_left, o_r, m_n, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr):
    """The [BM, BN] tile of A at p_a; masks only where the shapes are not multiples of the tile."""
    if EVEN_M and EVEN_N:
        b_a = tl.load(p_a)
    elif EVEN_M:
        b_a = tl.load(p_a, mask=m_n[None, :], other=0.0)
    else:
        b_a = tl.load(p_a, mask=(o_r < rows_left)[:, None] & m_n[None, :], other=0.0)
    return b_a


@triton.jit
def _rows_mask(rows_left, o_r, m_l, EVEN_M: tl.constexpr):
    """[BM, BL] mask of a Y / part tile: its columns < L, and its rows < M unless EVEN_M."""
    if EVEN_M:
        m = m_l[None, :] & (o_r >= 0)[:, None]
    else:
        m = m_l[None, :] & (o_r < rows_left)[:, None]
    return m


@triton.autotune(
    configs=_pick(
        [
            triton.Config({"BM": 64}, num_warps=4, num_stages=3),
            triton.Config({"BM": 128}, num_warps=8, num_stages=3),
            triton.Config({"BM": 32}, num_warps=4, num_stages=4),
            triton.Config({"BM": 64}, num_warps=8, num_stages=4),
        ],
        triton.Config({"BM": 16}, num_warps=4, num_stages=1),
    ),
    key=["M", "N", "L", "BN", "BL", "DOT_FP32", "USE_ATOMIC"],
    reset_to_zero=["part_ptr"],  # the atomic variant accumulates: benchmark runs must start from zero
)
@triton.heuristics({"EVEN_M": lambda args: args["M"] % args["BM"] == 0})
@triton.jit
def power_pass_kernel(
    a_ptr, y_ptr, part_ptr, B, M, N, L, PANELS_PER_SPLIT,
    DOT_FP32: tl.constexpr, USE_ATOMIC: tl.constexpr, EVEN_N: tl.constexpr, EVEN_M: tl.constexpr,
    BN: tl.constexpr, BL: tl.constexpr, BM: tl.constexpr,
):
    """part[s, i] (M x L) = sum over the panels P of split s of A[i][:, P] @ (A[i][:, P]^T @ Y[i]).

    USE_ATOMIC: part is a zeroed [1, B, M, L] and every program atomically adds its panels into it.
    The row loops advance tile pointers by BM rows (int32 offsets inside a tile, the 64-bit matrix
    base added once), and masks are built only for shapes that are not multiples of the tile
    (EVEN_M, EVEN_N): the loops are then loads, two dots and pointer increments.
    """
    i_s = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    i_l = tl.program_id(2)
    o_l = i_l * BL + tl.arange(0, BL)
    m_l = o_l < L
    o_r = tl.arange(0, BM)
    o_c = tl.arange(0, BN)
    # loop-invariant int32 offsets inside a tile; the scalar base pointers advance by BM rows
    a_off = o_r[:, None] * N + o_c[None, :]
    y_off = o_r[:, None] * L + o_l[None, :]
    a_base = a_ptr + i_b * M * N
    y_base = y_ptr + i_b * M * L
    if USE_ATOMIC:
        z_base = part_ptr + i_b * M * L
    else:
        z_base = part_ptr + (i_s * B + i_b) * M * L
    for p in range(0, PANELS_PER_SPLIT):
        n0 = (i_s * PANELS_PER_SPLIT + p) * BN
        if n0 < N:  # the last split may end in panels past N (no empty split, but a partial one)
            m_n = (n0 + o_c) < N
            # W = A_panel^T @ Y  ([BN, BL], fp32 accumulator)
            b_w = tl.zeros([BN, BL], dtype=tl.float32)
            a_cur = a_base + n0
            y_cur = y_base
            for m0 in range(0, M, BM):
                b_a = _load_panel(a_cur + a_off, M - m0, o_r, m_n, EVEN_M, EVEN_N)
                b_y = tl.load(y_cur + y_off, mask=_rows_mask(M - m0, o_r, m_l, EVEN_M), other=0.0)
                if DOT_FP32:
                    b_w += tl.dot(tl.trans(b_a.to(tl.float32)), b_y, input_precision="ieee")
                else:
                    b_w += tl.dot(tl.trans(b_a), b_y.to(b_a.dtype))
                a_cur += BM * N
                y_cur += BM * L
            # part[s] += A_panel @ W  (this program owns its slice: plain read-modify-write, first panel overwrites)
            a_cur = a_base + n0
            z_cur = z_base
            for m0 in range(0, M, BM):
                b_a = _load_panel(a_cur + a_off, M - m0, o_r, m_n, EVEN_M, EVEN_N)
                if DOT_FP32:
                    b_z = tl.dot(b_a.to(tl.float32), b_w, input_precision="ieee")
                else:
                    b_z = tl.dot(b_a, b_w.to(b_a.dtype))
                m_z = _rows_mask(M - m0, o_r, m_l, EVEN_M)
                if USE_ATOMIC:
                    tl.atomic_add(z_cur + y_off, b_z, mask=m_z)
                else:
                    b_z += tl.load(z_cur + y_off, mask=m_z & (p > 0), other=0.0)
                    tl.store(z_cur + y_off, b_z, mask=m_z)
                a_cur += BM * N
                z_cur += BM * L


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def _check_a(A: torch.Tensor, name: str = "A") -> None:
    if not isinstance(A, torch.Tensor) or A.dim() != 3:
        raise ValueError(f"{name} must be a 3-D tensor [b, m, n], got {getattr(A, 'shape', type(A))}")
    if A.dtype not in _SUPPORTED:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {A.dtype}")
    if not A.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if max(A.shape[1], A.shape[2]) * 128 >= 2**31:
        raise ValueError(f"{name}'s sides must be shorter than 2**24 (int32 tile offsets), got {A.shape[1]} x {A.shape[2]}")
    if not grid_ok(*A.shape):
        raise ValueError(f"{name}: at most {_MAX_GRID_YZ} matrices with sides of at most {_MAX_SIDE} (CUDA grid "
                         f"limits of these kernels), got {list(A.shape)}")


_MAX_GRID_YZ = MAX_GRID_YZ  # module-level, so a test can shrink it
_MAX_SIDE = 16 * _MAX_GRID_YZ  # sketch_omega: cdiv(rows, 16) row blocks on axis 1


def grid_ok(b: int, m: int, n: int) -> bool:
    """Whether a [b, m, n] batch fits the launch grids: power_pass puts the batch on axis 1,
    the sketches put row blocks (16 rows, or BM >= 16) on axis 1."""
    return b <= _MAX_GRID_YZ and max(m, n) <= _MAX_SIDE


def _block_l(L: int) -> int:
    """Width of a column tile of the sketch: l padded to a power of two >= 16, at most 128."""
    return min(max(16, next_power_of_2(L)), 128)


def _gpu_panel_width(BL: int) -> int:
    """Columns of A per panel of the fused power pass on GPU (W = A_panel^T Y is [BN, BL] fp32)."""
    return 128 if BL <= 64 else 64


def partial_traffic_ratio(l: int) -> float:
    """Bytes of split-K partial sums the deterministic fused power pass moves per byte of (2-byte)
    A it reads, with the GPU tiles: each BN-column panel reads and writes an [m, BL] fp32 slice
    (8 m BL bytes) against 2 m BN bytes of A, so 4 BL / BN. Above 1 the fused pass moves more
    bytes than two plain GEMMs (A read twice) do."""
    BL = _block_l(l)
    return 4 * BL / _gpu_panel_width(BL)


def _dot_fp32(dtype: torch.dtype) -> bool:
    # fp32 inputs: IEEE fp32 dot. bf16 under the interpreter: upcast (its bf16 arithmetic is wrong).
    return dtype == torch.float32 or (_INTERPRET and dtype == torch.bfloat16)


def _check_seed(seed: int) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return seed % (1 << 32)


@on_tensor_device
def sketch_omega(b: int, rows: int, l: int, seed: int, device) -> torch.Tensor:
    """The Gaussian test matrices [b, rows, l] (fp32) that ``sketch_matmul`` uses, materialized."""
    if rows * l >= 2**31:
        raise ValueError(f"rows * l must be < 2**31 (Philox counter), got {rows} * {l}")
    seed = _check_seed(seed)
    out = torch.empty((b, rows, l), device=device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    BR, BL = 16, _block_l(l)
    grid = (b, cdiv(rows, BR), cdiv(l, BL))
    sketch_omega_kernel[grid](out, seed, rows, l, BR=BR, BL=BL, **LAUNCH_OPTIONS)
    return out


@on_tensor_device
def sketch_matmul(A: torch.Tensor, l: int, seed: int, transpose: bool = False) -> torch.Tensor:
    """Y = A @ Omega_i ([b, m, l]), or A^T @ Omega_i ([b, n, l]) with ``transpose=True``; fp32.

    Omega_i (n x l, or m x l transposed) is generated in-kernel from (seed, i, row, col); see
    ``sketch_omega``.
    """
    _check_a(A)
    if not isinstance(l, int) or l < 1:
        raise ValueError(f"l must be a positive int, got {l!r}")
    seed = _check_seed(seed)
    b, m, n = A.shape
    M, K = (n, m) if transpose else (m, n)
    stride_am, stride_ak = (1, n) if transpose else (n, 1)
    if K * l >= 2**31:
        raise ValueError(f"rows of Omega * l must be < 2**31 (Philox counter), got {K} * {l}")
    Y = torch.empty((b, M, l), device=A.device, dtype=torch.float32)
    if Y.numel() == 0:
        return Y
    if K == 0:
        return Y.zero_()
    BL = _block_l(l)
    grid = lambda meta: (b, cdiv(M, meta["BM"]), cdiv(l, BL))  # noqa: E731
    sketch_matmul_kernel[grid](A, Y, seed, M, K, l, m * n, stride_am, stride_ak, DOT_FP32=_dot_fp32(A.dtype), BL=BL, **LAUNCH_OPTIONS)
    return Y


def _num_splits(b: int, panels: int, l_tiles: int, device: torch.device) -> int:
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4  # interpreter: exercise several splits and several panels per split
    return max(1, min(panels, cdiv(target, b * l_tiles)))


@on_tensor_device
def power_pass(A: torch.Tensor, Y: torch.Tensor, *, deterministic: bool = True, num_splits: int | None = None) -> torch.Tensor:
    """Z = A @ (A^T @ Y) for A [b, m, n], Y [b, m, l] fp32 -> Z [b, m, l] fp32, reading A once.

    ``deterministic=True``: partial products of ``num_splits`` column groups (default: about two
    programs per SM) go to a split-K buffer reduced afterwards, bit-identical run to run.
    ``deterministic=False``: fp32 atomics into Z, one panel per program (``num_splits`` ignored);
    less memory traffic, last bits vary between runs. See the module docstring for the costs.
    """
    _check_a(A)
    if not isinstance(Y, torch.Tensor) or Y.dim() != 3 or Y.shape[:2] != A.shape[:2]:
        raise ValueError(f"Y must be [b, m, l] = [{A.shape[0]}, {A.shape[1]}, l], got {getattr(Y, 'shape', type(Y))}")
    if Y.dtype != torch.float32:
        raise TypeError(f"Y must be float32, got {Y.dtype}")
    if Y.device != A.device:
        raise ValueError(f"Y must be on A's device {A.device}, got {Y.device}")
    Y = Y.contiguous()
    b, m, n = A.shape
    L = Y.shape[2]
    if b * m * L == 0:
        return torch.empty((b, m, L), device=A.device, dtype=torch.float32)
    if n == 0:
        return torch.zeros((b, m, L), device=A.device, dtype=torch.float32)
    BL = _block_l(L)
    BN = 16 if _INTERPRET else _gpu_panel_width(BL)
    panels = cdiv(n, BN)
    l_tiles = cdiv(L, BL)
    if deterministic:
        S = num_splits if num_splits is not None else _num_splits(b, panels, l_tiles, A.device)
        S = max(1, min(int(S), panels))
        per_split = cdiv(panels, S)
        S = cdiv(panels, per_split)  # no empty split
        part = torch.empty((S, b, m, L), device=A.device, dtype=torch.float32)
    else:
        S, per_split = panels, 1
        part = torch.zeros((1, b, m, L), device=A.device, dtype=torch.float32)
    power_pass_kernel[(S, b, l_tiles)](
        A, Y, part, b, m, n, L, per_split, DOT_FP32=_dot_fp32(A.dtype), USE_ATOMIC=not deterministic,
        EVEN_N=n % BN == 0, BN=BN, BL=BL, **LAUNCH_OPTIONS,
    )
    return part[0] if part.shape[0] == 1 else part.sum(dim=0)

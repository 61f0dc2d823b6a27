"""Electric images in Triton (fp32): one program per (environment, fish, block of up to 64
receptors), receptors across lanes.

Same math as csrc/include/efield_math.h (the C++ and CUDA backends): pole signal
n . q d / rho^3 and dipole signal ((P.d)(n3.d) - (n.P)|d|^2) / (|d|^2 rho^3 + 1e-30) with
n3 = 3 n, rho = |d| + eps, one hardware reciprocal (rcp.approx.ftz) per source on the GPU;
displacements formed as (fish i - source anchor) - source offset + receptor offset so large arena
coordinates never round the small offsets. The induced dipoles P_m = chi a^3 E_eod(c_m) are
recomputed by every fish's program (2N M pole evaluations per receptor block, negligible next to
its BLOCK_R (N + M) x 5 source-receptor pairs). Dipole signals of each [BLOCK_R, BLOCK_M] tile (and
its four wall images) are summed elementwise into one [BLOCK_R, BLOCK_M] accumulator, reduced over
objects once at the end.
"""

from __future__ import annotations


import triton
import triton.language as tl

from ._host import LAUNCH_OPTIONS, cdiv, interpreting, next_power_of_2, on_tensor_device
from ._tuning import gpu_configs

_INTERPRET = interpreting()
# Receptors per program: a [BLOCK_R, BLOCK_M] fp32 accumulator lives in registers (no spills at 64
# with the configs below; at R = 1024 in one program they spilled ~100 KB per thread). Small under
# the interpreter so the CPU tests run several receptor blocks.
_MAX_BLOCK_R = 8 if _INTERPRET else 64

if _INTERPRET:
    _CONFIGS = [triton.Config({"BLOCK_M": 16}, num_warps=1)]
else:
    _CONFIGS = gpu_configs([
        triton.Config({"BLOCK_M": 16}, num_warps=2),
        triton.Config({"BLOCK_M": 32}, num_warps=2),
        triton.Config({"BLOCK_M": 32}, num_warps=4),
        triton.Config({"BLOCK_M": 64}, num_warps=4),
    ])


@triton.jit
def _rcp(x, FAST: tl.constexpr):
    """1 / x for positive x: one MUFU.RCP on the GPU (rcp.approx.ftz, ~1 ulp) instead of the range
    checks of a full-precision division; plain division under the interpreter."""
    if FAST:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 / x


@triton.jit
def _inv_rho3(r2, eps, FAST: tl.constexpr):
    rho = tl.sqrt(r2) + eps
    return _rcp(rho * rho * rho, FAST)


@triton.jit
def _pole_signal(dx, dy, nx, ny, q, eps, FAST: tl.constexpr):
    return q * (nx * dx + ny * dy) * _inv_rho3(dx * dx + dy * dy, eps, FAST)


@triton.jit
def _dipole_signal(dx, dy, nx, ny, n3x, n3y, px, py, eps, FAST: tl.constexpr):
    """((P.d)(n3.d) - (n.P)|d|^2) / (|d|^2 rho^3 + 1e-30) with n3 = 3 n: efield_math.h's form."""
    r2 = dx * dx + dy * dy
    rho = tl.sqrt(r2) + eps
    den = r2 * (rho * rho * rho) + 1e-30
    return ((px * dx + py * dy) * (n3x * dx + n3y * dy) - (nx * px + ny * py) * r2) * _rcp(den, FAST)


@triton.jit
def _fish(fish_pos, heading, eod, fj, half):
    """Fish fj's centre, EOD amplitude and half pole-separation vector (fp32)."""
    xj = tl.load(fish_pos + 2 * fj).to(tl.float32)
    yj = tl.load(fish_pos + 2 * fj + 1).to(tl.float32)
    thj = tl.load(heading + fj).to(tl.float32)
    ej = tl.load(eod + fj).to(tl.float32)
    return xj, yj, ej, half * tl.cos(thj), half * tl.sin(thj)


@triton.jit
def _image(k: tl.constexpr, W, H):
    """(sign_x, sign_y, shift_x, shift_y) of wall image k: x = 0, x = W, y = 0, y = H."""
    if k == 0:
        return -1.0, 1.0, 0.0, 0.0
    elif k == 1:
        return -1.0, 1.0, 2.0 * W, 0.0
    elif k == 2:
        return 1.0, -1.0, 0.0, 0.0
    else:
        return 1.0, -1.0, 0.0, 2.0 * H


@triton.autotune(configs=_CONFIGS, key=["N", "M", "R", "HAS_WALLS"])
@triton.jit
def efield_fwd_kernel(fish_pos, heading, eod, obj_pos, obj_radius, obj_contrast, obj_mask, rec_pos, rec_nrm, arena,
                      active, comm, N, M, R, half, eps, gamma,
                      HAS_WALLS: tl.constexpr, HAS_COMM: tl.constexpr, FAST: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // N
    i = pid - b * N
    o_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # this program's block of receptors
    m_r = o_r < R
    # receptor offsets and normals of fish i in the world frame; n3 = 3 n (see _dipole_signal)
    th = tl.load(heading + pid).to(tl.float32)
    c = tl.cos(th)
    s = tl.sin(th)
    b_rx = tl.load(rec_pos + 2 * o_r, mask=m_r, other=0.0).to(tl.float32)
    b_ry = tl.load(rec_pos + 2 * o_r + 1, mask=m_r, other=0.0).to(tl.float32)
    b_qx = tl.load(rec_nrm + 2 * o_r, mask=m_r, other=0.0).to(tl.float32)
    b_qy = tl.load(rec_nrm + 2 * o_r + 1, mask=m_r, other=0.0).to(tl.float32)
    ox = c * b_rx - s * b_ry
    oy = s * b_rx + c * b_ry
    nx = c * b_qx - s * b_qy
    ny = s * b_qx + c * b_qy
    n3x = (3.0 * nx)[:, None]
    n3y = (3.0 * ny)[:, None]
    xi = tl.load(fish_pos + 2 * pid).to(tl.float32)
    yi = tl.load(fish_pos + 2 * pid + 1).to(tl.float32)
    if HAS_WALLS:
        W = tl.load(arena + 2 * b).to(tl.float32)
        H = tl.load(arena + 2 * b + 1).to(tl.float32)
    else:
        W = 0.0
        H = 0.0
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)

    # direct poles of every fish j (comm), and their images
    for j in range(0, N):
        xj, yj, ej, ux, uy = _fish(fish_pos, heading, eod, b * N + j, half)
        dx = xi - xj
        dy = yi - yj
        v = _pole_signal((dx - ux) + ox, (dy - uy) + oy, nx, ny, ej, eps, FAST) + \
            _pole_signal((dx + ux) + ox, (dy + uy) + oy, nx, ny, -ej, eps, FAST)
        v = tl.where(j == i, 0.0, v)
        acc += v
        if HAS_COMM:
            tl.store(comm + (pid * N + j) * R + o_r, v, mask=m_r)
        if HAS_WALLS:
            for k in tl.static_range(4):
                sx, sy, tx, ty = _image(k, W, H)
                ix = xi - (sx * xj + tx)
                iy = yi - (sy * yj + ty)
                acc += _pole_signal((ix - sx * ux) + ox, (iy - sy * uy) + oy, nx, ny, gamma * ej, eps, FAST)
                acc += _pole_signal((ix + sx * ux) + ox, (iy + sy * uy) + oy, nx, ny, -gamma * ej, eps, FAST)

    # induced dipoles, a block of objects at a time, summed elementwise into a [BLOCK_R, BLOCK_M]
    # accumulator (one reduction over objects at the end, not one per block and image)
    acc2 = tl.zeros([BLOCK_R, BLOCK_M], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        o_m = m0 + tl.arange(0, BLOCK_M)
        m_m = o_m < M
        p_m = b * M + o_m
        b_cx = tl.load(obj_pos + 2 * p_m, mask=m_m, other=0.0).to(tl.float32)
        b_cy = tl.load(obj_pos + 2 * p_m + 1, mask=m_m, other=0.0).to(tl.float32)
        # strength chi a^3 of the live objects (csrc/include/efield_math.h: object_strength)
        b_a = tl.load(obj_radius + p_m, mask=m_m, other=0.0).to(tl.float32)
        b_chi = tl.load(obj_contrast + p_m, mask=m_m, other=0.0).to(tl.float32)
        b_live = tl.load(obj_mask + p_m, mask=m_m, other=0) != 0
        b_st = b_chi * (b_a * b_a * b_a)
        ex = tl.zeros([BLOCK_M], dtype=tl.float32)
        ey = tl.zeros([BLOCK_M], dtype=tl.float32)
        for j in range(0, N):
            xj, yj, ej, ux, uy = _fish(fish_pos, heading, eod, b * N + j, half)
            for p in tl.static_range(2):
                sg = 1.0 - 2.0 * p
                dx = (b_cx - xj) - sg * ux
                dy = (b_cy - yj) - sg * uy
                w = sg * ej * _inv_rho3(dx * dx + dy * dy, eps, FAST)
                ex += w * dx
                ey += w * dy
        # masked objects: exactly 0, even where ex = 0/0 (eps = 0, a padding object on a pole)
        b_px = tl.where(b_live, b_st * ex, 0.0)[None, :]
        b_py = tl.where(b_live, b_st * ey, 0.0)[None, :]
        acc2 += _dipole_signal((xi - b_cx)[None, :] + ox[:, None], (yi - b_cy)[None, :] + oy[:, None],
                               nx[:, None], ny[:, None], n3x, n3y, b_px, b_py, eps, FAST)
        if HAS_WALLS:
            for k in tl.static_range(4):
                sx, sy, tx, ty = _image(k, W, H)
                acc2 += _dipole_signal((xi - (sx * b_cx + tx))[None, :] + ox[:, None],
                                       (yi - (sy * b_cy + ty))[None, :] + oy[:, None],
                                       nx[:, None], ny[:, None], n3x, n3y, (gamma * sx) * b_px, (gamma * sy) * b_py,
                                       eps, FAST)
    acc += tl.sum(acc2, axis=1)
    tl.store(active + pid * R + o_r, acc, mask=m_r)


@on_tensor_device
def efield_fwd(fish_pos, heading, eod, obj_pos, obj_radius, obj_contrast, obj_mask, rec_pos, rec_nrm, arena, active,
               comm, pole_separation: float, eps: float, image_strength: float) -> None:
    """Fill ``active`` [B, N, R] and ``comm`` [B, N, N, R] (or None); fp32 contiguous inputs, a
    contiguous bool ``obj_mask``."""
    B, N, _ = fish_pos.shape
    M = obj_pos.shape[1]
    R = rec_pos.shape[0]
    if B * N == 0 or R == 0:
        return
    has_walls = arena is not None
    has_comm = comm is not None
    # one program per (environment, fish, block of receptors): R beyond _MAX_BLOCK_R takes more
    # programs instead of a [BLOCK_R, BLOCK_M] accumulator too big for registers
    block_r = min(next_power_of_2(R), _MAX_BLOCK_R)
    efield_fwd_kernel[(B * N, cdiv(R, block_r))](
        fish_pos, heading, eod, obj_pos, obj_radius, obj_contrast, obj_mask, rec_pos, rec_nrm,
        arena if has_walls else fish_pos, active, comm if has_comm else active, N, M, R, 0.5 * float(pole_separation), float(eps), float(image_strength),
        HAS_WALLS=has_walls, HAS_COMM=has_comm, FAST=not _INTERPRET, BLOCK_R=block_r, **LAUNCH_OPTIONS,
    )

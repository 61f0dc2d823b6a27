"""Electric images for weakly electric fish: one fused step for many environments.

The physics and the definition of both outputs are in ``docs/efield.md`` (quasi-static point
sources in the plane, induced object dipoles, first-order wall images, receptors on the fish's
skin). In short, for environment b, fish i and receptor r (world position p, unit normal n):

* ``active[b, i, r] = n . E`` where E is everything except fish i's own direct EOD poles: the other
  fish's poles, every object's induced dipole and, with walls, the images of every pole (fish i's
  own included) and of every induced dipole;
* ``comm[b, i, j, r] = n . E_j`` with E_j the field of fish j's two poles alone (no images); zero
  for j = i.

``active`` is computed directly as a sum of perturbations, never as "total field minus the fish's
own field", so fp32 is enough: an echo at 5 cm is ~2e-6 of the fish's own field, below fp32's
resolution of a subtraction.

Backends: ``reference`` (PyTorch broadcasting, float64-capable), ``cpu`` (C++/OpenMP, fp32),
``cuda`` (CUDA C++, fp32), ``triton`` (fp32). The fused backends always compute in fp32; a float64
input is rounded to fp32 and the outputs are returned as float64. On the rounded inputs they agree
with float64 to ~1e-6 RMS-relative; against the float64 reference on the original inputs, the
rounding of absolute positions (6e-8 of the coordinate, 3e-5 cm at 500 cm) moves near-field echoes
by up to ~1e-4 RMS-relative in a 600 cm arena. Use ``backend="reference"`` for a float64
computation.
"""

from __future__ import annotations

import contextlib

import torch

from fastmodels._autocast import autocast_off
from fastmodels._dispatch import register_op, select_backend
from fastmodels._validation import check_bool, check_float, check_tensor, has_nonfinite

__all__ = ["electric_image", "electric_image_reference"]

OP = "electric_image"
_DTYPES = (torch.float32, torch.float64)

register_op(OP, ("reference", "cpu", "cuda", "triton"), cpu=("cpu", "reference"), cuda=("cuda", "triton", "reference"))

# Wall images: (sign_x, sign_y) applied to the source and, for dipoles, to the moment; the image
# position is (sign_x * x + shift_x * W, sign_y * y + shift_y * H).
_IMAGE_SIGN = ((-1.0, 1.0), (-1.0, 1.0), (1.0, -1.0), (1.0, -1.0))
_IMAGE_SHIFT = ((0.0, 0.0), (2.0, 0.0), (0.0, 0.0), (0.0, 2.0))  # x = 0, x = W, y = 0, y = H


# ------------------------------------------------------------------------------------------------
# Reference (the math as written in the spec, PyTorch broadcasting, any float dtype)
# ------------------------------------------------------------------------------------------------


def _images(pos: torch.Tensor, arena: torch.Tensor) -> torch.Tensor:
    """Mirror points ``pos [B, ..., 2]`` across the four walls of ``arena [B, 2]``: [B, ..., 4, 2]."""
    sign = pos.new_tensor(_IMAGE_SIGN)
    shift = pos.new_tensor(_IMAGE_SHIFT)
    wh = arena.reshape(arena.shape[0], *([1] * (pos.dim() - 2)), 1, 2)
    return sign * pos.unsqueeze(-2) + shift * wh


def _pole_field(points: torch.Tensor, src: torch.Tensor, q: torch.Tensor, eps: float) -> torch.Tensor:
    """Field q d / rho^3 (d = points - src, rho = |d| + eps), broadcasting; [..., 2]."""
    d = points - src
    rho = torch.linalg.vector_norm(d, dim=-1, keepdim=True) + eps
    return q.unsqueeze(-1) * d / rho**3


def _dipole_signal(points, normals, centre, moment, eps: float) -> torch.Tensor:
    """n . (3 (P.d) d / |d|^2 - P) / rho^3, broadcasting; [...]."""
    d = points - centre
    r2 = (d * d).sum(-1)
    rho = r2.sqrt() + eps
    pd = (moment * d).sum(-1)
    nd = (normals * d).sum(-1)
    npm = (normals * moment).sum(-1)
    return (3 * pd * nd / r2.clamp_min(torch.finfo(r2.dtype).tiny) - npm) / rho**3


def electric_image_reference(fish_pos, fish_heading, eod, obj_pos, obj_radius, obj_contrast, obj_mask,
                             receptor_pos, receptor_normal, arena=None, pole_separation=1.0, eps=1e-3,
                             image_strength=1.0, per_emitter=True):
    """Pure-PyTorch electric image (see :func:`electric_image`); computes in the inputs' dtype."""
    B, N, _ = fish_pos.shape
    half = 0.5 * pole_separation
    cos, sin = fish_heading.cos(), fish_heading.sin()
    u = torch.stack((cos, sin), -1)  # [B, N, 2]
    poles = torch.stack((fish_pos + half * u, fish_pos - half * u), 2)  # [B, N, 2 poles, 2]
    charge = torch.stack((eod, -eod), -1)  # [B, N, 2]

    def rotate(v):  # fish-frame vectors [R, 2] -> world [B, N, R, 2]
        c, s = cos[..., None], sin[..., None]
        return torch.stack((c * v[:, 0] - s * v[:, 1], s * v[:, 0] + c * v[:, 1]), -1)

    rec = fish_pos[:, :, None, :] + rotate(receptor_pos)  # [B, N, R, 2]
    nrm = rotate(receptor_normal)

    # Induced dipoles: P_m = chi a^3 E_eod(c_m), E_eod = all fish's direct poles (no images).
    e_obj = _pole_field(obj_pos[:, :, None, None, :], poles[:, None], charge[:, None], eps).sum((2, 3))  # [B, M, 2]
    strength = obj_contrast * obj_radius**3
    # masked objects get exactly 0, even where e_obj = 0/0 (eps = 0, a padding object on a pole)
    moment = torch.where(obj_mask[..., None], strength[..., None] * e_obj, torch.zeros_like(e_obj))  # [B, M, 2]

    # Direct poles of every fish j at every receptor of every fish i: [B, i, j, R].
    e_dir = _pole_field(rec[:, :, None, :, None, :], poles[:, None, :, None], charge[:, None, :, None], eps).sum(-2)
    comm_all = (nrm[:, :, None] * e_dir).sum(-1)
    own = torch.eye(N, dtype=torch.bool, device=fish_pos.device)[None, :, :, None]
    comm = torch.where(own, torch.zeros_like(comm_all), comm_all)
    active = comm.sum(2)  # other fish's direct poles

    # Induced dipoles at every receptor: [B, N, R, M] -> sum over M.
    active = active + _dipole_signal(rec[..., None, :], nrm[..., None, :], obj_pos[:, None, None], moment[:, None, None], eps).sum(-1)

    if arena is not None:
        g = image_strength
        img_poles = _images(poles, arena)  # [B, N, 2, 4, 2]
        img_q = (g * charge)[..., None].expand(*charge.shape, 4)  # [B, N, 2, 4]
        e_img = _pole_field(rec[:, :, :, None, None, None, :], img_poles[:, None, None], img_q[:, None, None], eps)
        active = active + (nrm * e_img.sum((3, 4, 5))).sum(-1)
        img_c = _images(obj_pos, arena)  # [B, M, 4, 2]
        img_p = g * moment[:, :, None, :] * moment.new_tensor(_IMAGE_SIGN)  # [B, M, 4, 2]
        active = active + _dipole_signal(rec[:, :, :, None, None, :], nrm[:, :, :, None, None, :],
                                         img_c[:, None, None], img_p[:, None, None], eps).sum((-1, -2))
    return active, (comm if per_emitter else None)


# ------------------------------------------------------------------------------------------------
# Fused backends
# ------------------------------------------------------------------------------------------------


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.to(torch.float32).contiguous()


def _pack_inputs(fish_pos, fish_heading, eod, obj_pos, obj_radius, obj_contrast, obj_mask, receptor_pos,
                 receptor_normal, arena):
    """fp32 contiguous inputs for the fused kernels (no copy for ones that already are) and a
    contiguous bool mask; the kernels form each object's strength chi a^3 themselves."""
    return dict(
        fish_pos=_f32(fish_pos), heading=_f32(fish_heading), eod=_f32(eod), obj_pos=_f32(obj_pos),
        radius=_f32(obj_radius), contrast=_f32(obj_contrast), mask=obj_mask.contiguous(),
        rec_pos=_f32(receptor_pos), rec_nrm=_f32(receptor_normal), arena=None if arena is None else _f32(arena),
    )


def _run_cpu(x, active, comm, pole_separation, eps, image_strength):
    from fastmodels import _C

    B, N, _ = x["fish_pos"].shape
    M = x["obj_pos"].shape[1]
    R = x["rec_pos"].shape[0]
    _C.efield_fwd(
        x["fish_pos"].data_ptr(), x["heading"].data_ptr(), x["eod"].data_ptr(), x["obj_pos"].data_ptr(),
        x["radius"].data_ptr(), x["contrast"].data_ptr(), x["mask"].data_ptr(), x["rec_pos"].data_ptr(),
        x["rec_nrm"].data_ptr(), 0 if x["arena"] is None else x["arena"].data_ptr(), active.data_ptr(),
        0 if comm is None else comm.data_ptr(), B, N, M, R, float(pole_separation), float(eps), float(image_strength),
    )


_CUDA_LIB = None
_SMEM_LIMIT: dict[int, int] = {}  # device index -> shared memory a block may opt in to


def _cuda_lib():
    import ctypes

    from fastmodels._cuda import load_library

    global _CUDA_LIB
    if _CUDA_LIB is None:
        lib = load_library("efield", ["efield.cu"])
        lib.fm_efield_fwd.restype = ctypes.c_int
        lib.fm_efield_fwd.argtypes = [ctypes.c_void_p] * 12 + [ctypes.c_int] * 4 + [ctypes.c_float] * 3 + [ctypes.c_void_p]
        lib.fm_efield_error_string.restype = ctypes.c_char_p
        lib.fm_efield_error_string.argtypes = [ctypes.c_int]
        lib.fm_efield_shared_bytes.restype = ctypes.c_size_t
        lib.fm_efield_shared_bytes.argtypes = [ctypes.c_int, ctypes.c_int]
        _CUDA_LIB = lib
    return _CUDA_LIB


def _run_cuda(x, active, comm, pole_separation, eps, image_strength):
    from fastmodels.kernels._host import MAX_GRID_X

    B, N, _ = x["fish_pos"].shape
    M = x["obj_pos"].shape[1]
    R = x["rec_pos"].shape[0]
    if B * N > MAX_GRID_X:  # one block per (environment, fish); ctypes would also wrap B past int32
        raise ValueError(f"electric_image (cuda): B * N = {B * N} environment-fish pairs, more than the {MAX_GRID_X} "
                         "blocks of one launch; split the batch")
    lib = _cuda_lib()
    dev = active.device.index
    smem = lib.fm_efield_shared_bytes(N, M)  # what one (environment, fish) block stages (efield.cu)
    if dev not in _SMEM_LIMIT:
        _SMEM_LIMIT[dev] = torch.cuda.get_device_properties(dev).shared_memory_per_block_optin
    if smem > _SMEM_LIMIT[dev]:
        raise ValueError(f"electric_image (cuda): N={N}, M={M} need {smem} B of shared memory per environment, more "
                         f"than this GPU's {_SMEM_LIMIT[dev]} B; use backend='triton' (it streams the objects)")
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    args = (ptr(x["fish_pos"]), ptr(x["heading"]), ptr(x["eod"]), ptr(x["obj_pos"]), ptr(x["radius"]),
            ptr(x["contrast"]), ptr(x["mask"]), ptr(x["rec_pos"]), ptr(x["rec_nrm"]), ptr(x["arena"]), ptr(active),
            ptr(comm), B, N, M, R, float(pole_separation), float(eps), float(image_strength))
    # the launch goes to the current device: switch to the tensors' only when it differs
    with contextlib.nullcontext() if dev == torch.cuda.current_device() else torch.cuda.device(dev):
        err = lib.fm_efield_fwd(*args, torch.cuda.current_stream(dev).cuda_stream)
    if err != 0:
        raise RuntimeError(f"electric_image (cuda): kernel launch failed: {lib.fm_efield_error_string(err).decode()}")


def _run_triton(x, active, comm, pole_separation, eps, image_strength):
    from fastmodels.kernels.efield import efield_fwd

    efield_fwd(x["fish_pos"], x["heading"], x["eod"], x["obj_pos"], x["radius"], x["contrast"], x["mask"],
               x["rec_pos"], x["rec_nrm"], x["arena"], active, comm, pole_separation, eps, image_strength)


_FUSED = {"cpu": _run_cpu, "cuda": _run_cuda, "triton": _run_triton}


def _forward(fish_pos, fish_heading, eod, obj_pos, obj_radius, obj_contrast, obj_mask, receptor_pos,
             receptor_normal, arena, pole_separation, eps, image_strength, per_emitter, backend):
    if backend == "reference":
        return electric_image_reference(fish_pos, fish_heading, eod, obj_pos, obj_radius, obj_contrast, obj_mask,
                                        receptor_pos, receptor_normal, arena, pole_separation, eps, image_strength,
                                        per_emitter)
    B, N, _ = fish_pos.shape
    R = receptor_pos.shape[0]
    x = _pack_inputs(fish_pos, fish_heading, eod, obj_pos, obj_radius, obj_contrast, obj_mask, receptor_pos,
                     receptor_normal, arena)
    active = torch.empty(B, N, R, dtype=torch.float32, device=fish_pos.device)
    comm = torch.empty(B, N, N, R, dtype=torch.float32, device=fish_pos.device) if per_emitter else None
    if B > 0 and R > 0:
        _FUSED[backend](x, active, comm, pole_separation, eps, image_strength)
    dtype = fish_pos.dtype
    return active.to(dtype), (None if comm is None else comm.to(dtype))


# ------------------------------------------------------------------------------------------------
# Custom op (torch.compile traces through it; the op is not differentiable)
# ------------------------------------------------------------------------------------------------


def _electric_image_impl(fish_pos, fish_heading, eod, obj_pos, obj_radius, obj_contrast, obj_mask, receptor_pos,
                        receptor_normal, arena, pole_separation, eps, image_strength, per_emitter, backend):
    chosen = select_backend(OP, backend or None, fish_pos.device)
    active, comm = _forward(fish_pos, fish_heading, eod, obj_pos, obj_radius, obj_contrast, obj_mask, receptor_pos,
                            receptor_normal, arena, pole_separation, eps, image_strength, per_emitter, chosen)
    if comm is None:  # a custom op returns a fixed number of tensors: an empty one stands for None
        comm = fish_pos.new_empty(0)
    return active.contiguous(), comm.contiguous()


@torch.library.custom_op("fastmodels::electric_image", mutates_args=())
def _electric_image_op(fish_pos: torch.Tensor, fish_heading: torch.Tensor, eod: torch.Tensor, obj_pos: torch.Tensor,
                       obj_radius: torch.Tensor, obj_contrast: torch.Tensor, obj_mask: torch.Tensor,
                       receptor_pos: torch.Tensor, receptor_normal: torch.Tensor, arena: torch.Tensor | None,
                       pole_separation: float, eps: float, image_strength: float, per_emitter: bool,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _electric_image_impl(fish_pos, fish_heading, eod, obj_pos, obj_radius, obj_contrast, obj_mask, receptor_pos,
                                receptor_normal, arena, pole_separation, eps, image_strength, per_emitter, backend)


@_electric_image_op.register_fake
def _(fish_pos, fish_heading, eod, obj_pos, obj_radius, obj_contrast, obj_mask, receptor_pos, receptor_normal, arena,
      pole_separation, eps, image_strength, per_emitter, backend):
    B, N, _ = fish_pos.shape
    R = receptor_pos.shape[0]
    active = fish_pos.new_empty(B, N, R)
    comm = fish_pos.new_empty(B, N, N, R) if per_emitter else fish_pos.new_empty(0)
    return active, comm


# ------------------------------------------------------------------------------------------------
# Public function
# ------------------------------------------------------------------------------------------------


def _check_values(fish_pos, fish_heading, eod, obj_pos, obj_radius, obj_contrast, receptor_pos, receptor_normal, arena,
                  *, in_fp32: bool = False):
    """Finite inputs, radii >= 0, contrast in [-1/2, 1], arena sides > 0; one host sync when all is well.

    ``in_fp32``: float64 inputs that a fused backend will compute in fp32 must also be finite
    after that cast (a value beyond fp32's range would become inf there).

    The common case costs a handful of tensor operations (kernel launches on a GPU): one sum over
    all float inputs (NaN or inf make it non-finite; a finite overflow is a false alarm that the
    per-input pass below clears) and three range tests. Only a failure runs the per-input checks
    that name the argument."""
    floats = [fish_pos, fish_heading, eod, obj_pos, obj_radius, obj_contrast, receptor_pos, receptor_normal]
    floats += [arena] if arena is not None else []
    finite = (lambda t: torch.isfinite(t.to(torch.float32))) if in_fp32 else torch.isfinite
    flat = torch.cat([t.reshape(-1) for t in floats])
    flags = [has_nonfinite(flat.to(torch.float32) if in_fp32 else flat), (obj_radius < 0).any(),
             ((obj_contrast < -0.5) | (obj_contrast > 1.0)).any()]
    if arena is not None:
        flags.append((arena <= 0).any())
    if not bool(torch.stack(flags).any()):
        return
    checks = {
        "fish_pos": lambda: finite(fish_pos).all(),
        "fish_heading": lambda: finite(fish_heading).all(),
        "eod": lambda: finite(eod).all(),
        "obj_pos": lambda: finite(obj_pos).all(),
        "receptor_pos": lambda: finite(receptor_pos).all(),
        "receptor_normal": lambda: finite(receptor_normal).all(),
        "obj_radius": lambda: (finite(obj_radius) & (obj_radius >= 0)).all(),
        "obj_contrast": lambda: ((obj_contrast >= -0.5) & (obj_contrast <= 1.0)).all(),
    }
    if arena is not None:
        checks["arena"] = lambda: (finite(arena) & (arena > 0)).all()
    what = {
        "obj_radius": "radii >= 0 (finite)",
        "obj_contrast": "contrasts in [-0.5, 1] (chi = (s_obj - s_water) / (s_obj + 2 s_water))",
        "arena": "finite arena sides > 0",
    }
    fp32_note = (" within float32's range (the fused backends compute in float32; backend='reference' computes in "
                 "float64)") if in_fp32 else ""
    for name, ok in checks.items():
        if not bool(ok()):
            raise ValueError(f"electric_image: {name}: expected {what.get(name, 'finite values')}{fp32_note}, "
                             "found a value outside")


@autocast_off
def electric_image(fish_pos, fish_heading, eod, obj_pos, obj_radius, obj_contrast, obj_mask, receptor_pos,
                   receptor_normal, *, arena=None, pole_separation=1.0, eps=1e-3, image_strength=1.0,
                   per_emitter=True, backend=None, check_values=True):
    """Electric images at every fish's receptors, for B environments at once (normalized units).

    Args:
        fish_pos: [B, N, 2] fish positions (cm). N >= 1.
        fish_heading: [B, N] headings (radians).
        eod: [B, N] EOD amplitude of each fish this step (0/1 or any float).
        obj_pos: [B, M, 2] object centres (cm); M may be 0.
        obj_radius: [B, M] object radii a_m >= 0 (cm).
        obj_contrast: [B, M] contrasts chi_m in [-1/2, 1] (-1/2: insulator, 1: perfect conductor).
        obj_mask: [B, M] bool; False entries (padding, eaten food) contribute nothing. Their values
            must still be finite and in range (zeros work).
        receptor_pos: [R, 2] receptor positions in the fish frame (x forward); see
            :func:`fastmodels.efish.receptor_ring`.
        receptor_normal: [R, 2] receptor skin normals in the fish frame.
        arena: [B, 2] (width W, height H) with insulating walls at x = 0, W and y = 0, H, handled by
            first-order images; None: no walls.
        pole_separation: distance l between the two EOD poles (cm).
        eps: softening added to every source distance, rho = |d| + eps (cm).
        image_strength: gamma, the strength of every wall image.
        per_emitter: also return the per-emitter communication signal ``comm`` (else None).
        backend: None (default: cpu on CPU tensors, cuda then triton on GPU tensors), or one of
            "reference", "cpu", "cuda", "triton".
        check_values: check that values are finite and in range (one host sync), and float64 values
            bound for a fused backend within float32's range. Shapes are always checked. Skipped
            automatically under torch.compile.

    Returns:
        ``(active, comm)``: ``active`` [B, N, R], the signal n . E at each receptor of everything but
        the fish's own direct poles (other fish, induced object dipoles, and with walls the images
        of all poles, the fish's own included, and of all dipoles); ``comm`` [B, N, N, R] with
        ``comm[b, i, j]`` = n . (field of fish j's poles alone, no images) at fish i's receptors,
        0 for j = i; or None when ``per_emitter=False``. Same dtype as the inputs (float32 or
        float64). Fused backends compute in fp32 (float64 inputs are computed in fp32 and returned
        as float64); the reference computes in the inputs' dtype.

    The op is not differentiable (it is an RL environment's sensor model): outputs carry no
    gradient.

    Example::

        >>> import torch, fastmodels.ops
        >>> from fastmodels.efish import receptor_ring
        >>> rpos, rnrm = receptor_ring(8)
        >>> B, N, M = 2, 3, 5
        >>> active, comm = fastmodels.ops.electric_image(
        ...     torch.rand(B, N, 2) * 20, torch.rand(B, N) * 6.28, torch.ones(B, N),
        ...     torch.rand(B, M, 2) * 20, torch.full((B, M), 0.25), torch.full((B, M), -0.5),
        ...     torch.ones(B, M, dtype=torch.bool), rpos, rnrm, arena=torch.full((B, 2), 20.0))
        >>> active.shape, comm.shape
        (torch.Size([2, 3, 8]), torch.Size([2, 3, 3, 8]))
    """
    dims: dict = {}
    check_tensor(fish_pos, "fish_pos", shape=("B", "N", 2), dims=dims, dtypes=_DTYPES)
    dtype = fish_pos.dtype
    device = fish_pos.device
    if dims["N"] == 0:
        raise ValueError("fish_pos: expected at least one fish (N >= 1), got shape " + str(list(fish_pos.shape)))
    for t, name, shape in ((fish_heading, "fish_heading", ("B", "N")), (eod, "eod", ("B", "N")),
                           (obj_pos, "obj_pos", ("B", "M", 2)), (obj_radius, "obj_radius", ("B", "M")),
                           (obj_contrast, "obj_contrast", ("B", "M")), (receptor_pos, "receptor_pos", ("R", 2)),
                           (receptor_normal, "receptor_normal", ("R", 2))):
        check_tensor(t, name, shape=shape, dims=dims, dtypes=(dtype,), device=device, dtype_of="fish_pos", device_of="fish_pos")
    check_tensor(obj_mask, "obj_mask", shape=("B", "M"), dims=dims, dtypes=(torch.bool,), device=device, device_of="fish_pos")
    if arena is not None:
        check_tensor(arena, "arena", shape=("B", 2), dims=dims, dtypes=(dtype,), device=device, dtype_of="fish_pos", device_of="fish_pos")
    pole_separation = check_float(pole_separation, "pole_separation", low=0.0)
    eps = check_float(eps, "eps", low=0.0)
    image_strength = check_float(image_strength, "image_strength")
    check_bool(per_emitter, "per_emitter")
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend: expected a str or None, got {type(backend).__name__}")
    check_bool(check_values, "check_values")
    if check_values and not torch.compiler.is_compiling():
        in_fp32 = dtype == torch.float64 and select_backend(OP, backend, device) != "reference"
        _check_values(fish_pos, fish_heading, eod, obj_pos, obj_radius, obj_contrast, receptor_pos, receptor_normal, arena,
                      in_fp32=in_fp32)
    args = (fish_pos, fish_heading, eod, obj_pos, obj_radius, obj_contrast, obj_mask, receptor_pos, receptor_normal,
            arena, pole_separation, eps, image_strength, per_emitter, backend or "")
    if torch.compiler.is_compiling():
        active, comm = _electric_image_op(*args)
    else:
        # Eager calls skip the custom op's dispatch (tens of microseconds of host time, a large
        # share of a GPU step at the benchmark's size); no_grad keeps the reference backend's
        # outputs gradient-free like the op's.
        with torch.no_grad():
            active, comm = _electric_image_impl(*args)
    return active, (comm if per_emitter else None)

"""electric_image: physics checks of the reference, every backend vs the float64 reference, errors."""

import ctypes
import math

import numpy as np
import pytest
import torch
from helpers import DEVICE, assert_rms_close, backend_device, load_cuda_emulation, op_backends, pick

import fastmodels.ops  # noqa: F401 - registers the op
from fastmodels._dispatch import op_backend_unavailable_reason
from fastmodels.efish import field_scale, receptor_ring, to_volts_per_metre
from fastmodels.ops import electric_image
from fastmodels.ops.efield import _pack_inputs

ref = dict(backend="reference")


def scene(B, N, M, R=12, *, walls=True, near=False, big_objects=False, dtype=torch.float32, device="cpu", seed=0):
    """A random scene generated in fp32 (the reference then sees exactly the fused backends' inputs).

    ``near``: fish within 0.3-2 cm of a wall and objects within 0.5-3 cm of a fish.
    ``big_objects``: radii 0.4-1 cm, conductors (chi = 1) and insulators (-1/2): strong echoes and
    echo images (the same draws as the default, so the default scenes are unchanged)."""
    g = torch.Generator().manual_seed(seed)
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    arena = 10 + 40 * u(B, 2)
    fish = 2 + (arena[:, None] - 4) * u(B, N, 2)
    if near:  # push each fish's x next to the wall x = 0 or x = W
        d = 0.3 + 1.7 * u(B, N)
        left = u(B, N) < 0.5
        fish[..., 0] = torch.where(left, d, arena[:, None, 0] - d)
    heading = 2 * math.pi * u(B, N)
    eod = torch.where(u(B, N) < 0.25, torch.zeros(B, N), 0.5 + u(B, N))
    obj = 1 + (arena[:, None] - 2) * u(B, M, 2)
    if near and M:
        host = torch.randint(0, N, (B, M), generator=g)
        ang, dist = 2 * math.pi * u(B, M), 0.5 + 2.5 * u(B, M)
        obj = torch.gather(fish, 1, host[..., None].expand(B, M, 2)) + dist[..., None] * torch.stack((ang.cos(), ang.sin()), -1)
    r, c = u(B, M), u(B, M)
    radius = 0.4 + 0.6 * r if big_objects else 0.05 + 0.45 * r
    contrast = torch.where(c < 1 / 3, -0.5, 1.0) if big_objects else -0.5 + 1.5 * c
    mask = u(B, M) < 0.8
    rpos, rnrm = receptor_ring(R, 1.0, offset=0.1)
    args = [fish, heading, eod, obj, radius, contrast, mask, rpos, rnrm]
    args = [a.to(device, dtype) if a.is_floating_point() else a.to(device) for a in args]
    return args, (arena.to(device, dtype) if walls else None)


def f64(args, arena):
    conv = lambda t: t.double() if t is not None and t.is_floating_point() else t  # noqa: E731
    return [conv(a) for a in args], conv(arena)


# ------------------------------------------------------------------------------------------------
# Physics of the reference (float64)
# ------------------------------------------------------------------------------------------------


def test_sphere_in_uniform_field_closed_form():
    """An object's echo is the field of chi a^3 (E0 . r) / r^3 (E = -grad of it), E0 the EOD field at
    the object; checked against a finite-difference gradient of that closed-form potential."""
    D = torch.float64
    chi, a = -0.5, 0.25
    emitter = torch.tensor([[-150.0, 3.0]], dtype=D)  # far away: a near-uniform field at the object
    centre = torch.tensor([4.0, -2.0], dtype=D)
    observer = torch.tensor([[5.0, 0.0]], dtype=D)
    fish = torch.cat((emitter, observer))[None]
    heading = torch.tensor([[0.3, 1.1]], dtype=D)
    eod = torch.tensor([[1.0, 0.0]], dtype=D)
    R = 16
    rpos, rnrm = receptor_ring(R, 1.3, dtype=D)
    args = [fish, heading, eod, centre[None, None], torch.full((1, 1), a, dtype=D), torch.full((1, 1), chi, dtype=D),
            torch.ones(1, 1, dtype=torch.bool), rpos, rnrm]
    active, comm = electric_image(*args, eps=0.0, **ref)
    echo = active[0, 1] - comm[0, 1, 0]  # observer: other fish's direct field + the object's echo

    # E0: the emitter's two poles at the object centre (Coulomb, written out here).
    u = torch.tensor([math.cos(0.3), math.sin(0.3)], dtype=D)
    E0 = torch.zeros(2, dtype=D)
    for q, s in ((1.0, emitter[0] + 0.5 * u), (-1.0, emitter[0] - 0.5 * u)):
        d = centre - s
        E0 += q * d / d.norm() ** 3
    phi = lambda r: chi * a**3 * (E0 @ (r - centre)) / (r - centre).norm() ** 3  # noqa: E731
    c, s_ = math.cos(1.1), math.sin(1.1)
    rot = torch.tensor([[c, -s_], [s_, c]], dtype=D)
    h = 1e-5
    for r in range(R):
        p = observer[0] + rot @ rpos[r]
        n = rot @ rnrm[r]
        grad = torch.stack([(phi(p + h * e) - phi(p - h * e)) / (2 * h) for e in torch.eye(2, dtype=D)])
        expected = -(n @ grad)
        assert abs(echo[r] - expected) <= 1e-7 * abs(expected) + 1e-15, (r, echo[r].item(), expected.item())
    assert echo.abs().max() > 1e-9  # a real echo (the emitter is 150 cm away)


@pytest.mark.parametrize("wall", ["x0", "xW", "y0", "yH"])
def test_normal_field_vanishes_on_insulating_wall(wall):
    """With images on, the field normal to a wall vanishes on it. Receptors of a silent observer
    fish are placed on the wall with normals along the wall's normal; the emitter and an object sit
    near that wall, far (5000 cm) from the other walls, whose images are then negligible."""
    D = torch.float64
    L = 1e4
    arena = torch.tensor([[L, L]], dtype=D)
    along = torch.linspace(-6, 6, 25, dtype=D)
    # Work in a frame where the wall is x = 0 (x0), then map to the wall asked for.
    em, ob, obs = torch.tensor([2.0, 0.7]), torch.tensor([1.2, -1.5]), torch.tensor([0.0, 0.0])
    rpos = torch.stack((torch.zeros_like(along), along), -1)
    rnrm = torch.tensor([1.0, 0.0], dtype=D).expand(25, 2)

    def place(p):
        x, y = float(p[0]), float(p[1])
        return {"x0": (x, L / 2 + y), "xW": (L - x, L / 2 + y), "y0": (L / 2 + y, x), "yH": (L / 2 + y, L - x)}[wall]

    fish = torch.tensor([[place(em), place(obs)]], dtype=D)
    # The observer's heading turns its frame so that receptor x = 0 lies on the wall.
    obs_heading = {"x0": 0.0, "xW": math.pi, "y0": -math.pi / 2, "yH": math.pi / 2}[wall]
    heading = torch.tensor([[0.4, obs_heading]], dtype=D)
    eod = torch.tensor([[1.0, 0.0]], dtype=D)
    obj = torch.tensor([[place(ob)]], dtype=D)
    args = [fish, heading, eod, obj, torch.full((1, 1), 0.4, dtype=D), torch.full((1, 1), -0.5, dtype=D),
            torch.ones(1, 1, dtype=torch.bool), rpos, rnrm]
    active, comm = electric_image(*args, arena=arena, **ref)
    direct = comm[0, 1, 0]  # the emitter's normal field on the wall without its image
    assert direct.abs().max() > 1e-3
    assert active[0, 1].abs().max() < 1e-9 * direct.abs().max(), active[0, 1]
    # Without walls the same receptors see the emitter's and the object's fields.
    active_free, _ = electric_image(*args, **ref)
    assert active_free[0, 1].abs().max() > 0.5 * direct.abs().max()


@pytest.mark.parametrize("walls", [False, True])
def test_mirror_symmetric_scene_gives_mirrored_outputs(walls):
    """Mirroring a scene across x = W/2 (headings theta -> pi - theta) mirrors every output:
    receptor k of the ring maps to receptor (R - k) % R (the ring is symmetric about the heading)."""
    args, arena = f64(*scene(3, 4, 9, R=10, walls=True))
    rpos, rnrm = receptor_ring(10, dtype=torch.float64)
    args[7], args[8] = rpos, rnrm
    fish, heading, eod, obj, radius, contrast, mask = args[:7]
    W = arena[:, 0]
    m_args = list(args)
    m_args[0] = torch.stack((W[:, None] - fish[..., 0], fish[..., 1]), -1)
    m_args[1] = math.pi - heading
    m_args[3] = torch.stack((W[:, None] - obj[..., 0], obj[..., 1]), -1)
    kw = dict(arena=arena if walls else None, **ref)
    a, c = electric_image(*args, **kw)
    ma, mc = electric_image(*m_args, **kw)
    perm = [(10 - k) % 10 for k in range(10)]
    torch.testing.assert_close(ma, a[..., perm], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(mc, c[..., perm], rtol=1e-9, atol=1e-12)


def test_superposition_and_eod_switch():
    """Everything is linear in the EODs: switching fish j off removes exactly what fish j alone
    produces (its direct field, its images, and the object echoes it induces)."""
    args, arena = f64(*scene(2, 4, 12, walls=True))
    eod = args[2]
    full_a, full_c = electric_image(*args, arena=arena, **ref)
    for j in range(4):
        off, only = eod.clone(), torch.zeros_like(eod)
        off[:, j], only[:, j] = 0, eod[:, j]
        a_off, c_off = electric_image(*args[:2], off, *args[3:], arena=arena, **ref)
        a_only, c_only = electric_image(*args[:2], only, *args[3:], arena=arena, **ref)
        torch.testing.assert_close(full_a - a_off, a_only, rtol=1e-9, atol=1e-12)
        assert (c_off[:, :, j] == 0).all()
        keep = [k for k in range(4) if k != j]
        torch.testing.assert_close(c_off[:, :, keep], full_c[:, :, keep], rtol=0, atol=0)
        # Fish j's own active signal no longer holds other fish's direct fields when it is alone.
        torch.testing.assert_close(c_only.sum(2)[:, j], torch.zeros_like(c_only.sum(2)[:, j]))


def test_masked_objects_contribute_nothing():
    args, arena = f64(*scene(2, 3, 10, walls=True))
    mask = args[6]
    kept = mask[0].nonzero().squeeze(1)
    a, c = electric_image(*args, arena=arena, **ref)
    sub = [args[0], args[1], args[2]] + [t[:, kept] for t in args[3:7]] + args[7:]
    # Only environment 0's valid objects survive the indexing; compare environment 0.
    a2, c2 = electric_image(*[t[:1] if i < 7 else t for i, t in enumerate(sub)], arena=arena[:1], **ref)
    torch.testing.assert_close(a[:1], a2, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(c[:1], c2)


@pytest.mark.parametrize("backend", op_backends("electric_image", include_reference=True))
def test_masked_object_on_a_pole_with_eps_zero(backend):
    """eps = 0 is allowed; a masked (padding) object at the origin that sits exactly on a fish's
    pole has a 0/0 inducing field there, and must still contribute exactly nothing."""
    dev = backend_device(backend)
    fish = torch.tensor([[[0.5, 0.0], [5.0, 3.0]]], device=dev)  # fish 0's negative pole at (0, 0)
    heading, eod = torch.zeros(1, 2, device=dev), torch.ones(1, 2, device=dev)
    obj = torch.tensor([[[0.0, 0.0], [3.0, 1.0]]], device=dev)
    radius, chi = torch.tensor([[0.0, 0.25]], device=dev), torch.tensor([[0.0, -0.5]], device=dev)
    mask = torch.tensor([[False, True]], device=dev)
    rpos, rnrm = (t.to(dev) for t in receptor_ring(4))
    kw = dict(eps=0.0, backend=backend)
    a, c = electric_image(fish, heading, eod, obj, radius, chi, mask, rpos, rnrm, **kw)
    a1, c1 = electric_image(fish, heading, eod, obj[:, 1:], radius[:, 1:], chi[:, 1:], mask[:, 1:], rpos, rnrm, **kw)
    assert torch.isfinite(a).all() and torch.isfinite(c).all()
    torch.testing.assert_close(a, a1, rtol=0, atol=0)
    torch.testing.assert_close(c, c1, rtol=0, atol=0)


def test_pole_formula_and_units():
    """One fish, one receptor in front of it on the axis: n . E of a +1/-1 pole pair at distances
    d -/+ l/2 is r/(r + eps)^3 summed with signs (r = d -/+ l/2); and the unit conversion."""
    D = torch.float64
    fish = torch.tensor([[[0.0, 0.0], [10.0, 0.0]]], dtype=D)
    heading = torch.tensor([[0.0, 0.0]], dtype=D)
    eod = torch.tensor([[1.0, 0.0]], dtype=D)
    rpos = torch.tensor([[-3.0, 0.0]], dtype=D)  # observer's receptor at x = 7
    rnrm = torch.tensor([[1.0, 0.0]], dtype=D)
    e = torch.zeros(1, 0, dtype=D)
    _, comm = electric_image(fish, heading, eod, torch.zeros(1, 0, 2, dtype=D), e, e, e.bool(), rpos, rnrm, eps=1e-3, **ref)
    want = 6.5 / (6.5 + 1e-3) ** 3 - 7.5 / (7.5 + 1e-3) ** 3
    assert abs(comm[0, 1, 0, 0].item() - want) < 1e-14
    assert abs(field_scale() - 8.99e9 * 1.11e-15 / 1e-4) < 1e-12
    assert to_volts_per_metre(2.0) == pytest.approx(2 * 0.099789)


# ------------------------------------------------------------------------------------------------
# Every backend vs the float64 reference
# ------------------------------------------------------------------------------------------------

SCENES = [  # (B, N, M, R, walls, near)
    (3, 1, 0, 12, True, False),
    (2, 2, 5, 7, False, False),
    (2, 3, 17, 12, True, True),
    (2, 4, 40, 12, True, True),
    (2, 5, 33, 9, False, True),
]


@pytest.mark.parametrize("backend", op_backends("electric_image"))
@pytest.mark.parametrize("case", SCENES, ids=lambda c: "B{}N{}M{}R{}{}{}".format(c[0], c[1], c[2], c[3], "w" if c[4] else "", "near" if c[5] else ""))
def test_backend_matches_reference(backend, case):
    B, N, M, R, walls, near = case
    dev = backend_device(backend)
    args, arena = scene(B, N, M, R, walls=walls, near=near, device=dev, seed=N * 100 + M)
    a64, c64 = f64(args, arena)
    ra, rc = electric_image(*a64, arena=c64, **ref)
    a, c = electric_image(*args, arena=arena, backend=backend)
    assert a.dtype == torch.float32 and c.dtype == torch.float32
    assert_rms_close(a, ra, 1e-4, "active")
    assert_rms_close(c, rc, 1e-4, "comm")
    assert (c[:, torch.arange(N), torch.arange(N)] == 0).all()
    a2, none = electric_image(*args, arena=arena, backend=backend, per_emitter=False)
    assert none is None
    assert_rms_close(a2, ra, 1e-4, "active (per_emitter=False)")


@pytest.mark.parametrize("backend", op_backends("electric_image"))
def test_backend_float64_inputs_return_float64(backend):
    dev = backend_device(backend)
    args, arena = scene(2, 2, 3, 5, device=dev)
    a64, ar64 = f64(args, arena)
    ra, rc = electric_image(*a64, arena=ar64, **ref)
    a, c = electric_image(*a64, arena=ar64, backend=backend)
    assert a.dtype == c.dtype == torch.float64
    assert_rms_close(a, ra, 1e-4, "active")
    assert_rms_close(c, rc, 1e-4, "comm")


@pytest.mark.parametrize("backend", op_backends("electric_image"))
def test_backend_empty_batch_and_single_receptor(backend):
    dev = backend_device(backend)
    args, arena = scene(0, 2, 3, 4, device=dev)
    a, c = electric_image(*args, arena=arena, backend=backend)
    assert a.shape == (0, 2, 4) and c.shape == (0, 2, 2, 4)
    args, arena = scene(2, 3, 4, 1, device=dev)
    a, c = electric_image(*args, arena=arena, backend=backend)
    ra, rc = electric_image(*f64(args, arena)[0], arena=f64(args, arena)[1], **ref)
    assert_rms_close(a, ra, 1e-4, "active")
    assert_rms_close(c, rc, 1e-4, "comm")


@pytest.mark.parametrize("R", [1, 12, 36, 37])
def test_cpu_receptors_are_independent_lanes(R):
    """The C++ kernel runs its receptor loops over R rounded up to 16 lanes: the outputs of R
    receptors equal, bit for bit, the first R of a call with 11 more receptors (no padding lane
    leaks into a real one)."""
    reason = op_backend_unavailable_reason("electric_image", "cpu", "cpu")
    if reason:
        pytest.skip(reason)
    args, arena = scene(5, 3, 7, R + 11, near=True, seed=R)
    few = args[:7] + [args[7][:R].contiguous(), args[8][:R].contiguous()]
    a, c = electric_image(*few, arena=arena, backend="cpu")
    a_all, c_all = electric_image(*args, arena=arena, backend="cpu")
    assert torch.equal(a, a_all[..., :R]) and torch.equal(c, c_all[..., :R])


def test_large_scene_cpu_default():
    """The default backend on CPU tensors (the C++ one when built) at a larger size."""
    args, arena = scene(pick(16, 64), 4, 32, 64, near=True)
    a, c = electric_image(*args, arena=arena)
    ra, rc = electric_image(*f64(args, arena)[0], arena=f64(args, arena)[1], **ref)
    assert_rms_close(a, ra, 1e-4, "active")
    assert_rms_close(c, rc, 1e-4, "comm")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backends_at_benchmark_shape(backend):
    """The benchmark's shape (N=4, R=64, M=32, walls, fish near walls and objects) on the GPU."""
    args, arena = scene(512, 4, 32, 64, near=True, device="cuda")
    a, c = electric_image(*args, arena=arena, backend=backend)
    ra, rc = electric_image(*f64(args, arena)[0], arena=f64(args, arena)[1], **ref)
    assert_rms_close(a, ra, 1e-4, "active")
    assert_rms_close(c, rc, 1e-4, "comm")
    # many objects: more than one block of objects in Triton, a larger shared-memory layout in CUDA
    args, arena = scene(8, 3, 700, 20, device="cuda")
    a, c = electric_image(*args, arena=arena, backend=backend)
    ra, rc = electric_image(*f64(args, arena)[0], arena=f64(args, arena)[1], **ref)
    assert_rms_close(a, ra, 1e-4, "active")


# ------------------------------------------------------------------------------------------------
# The CUDA kernel's own source, run on the CPU (tests/cuda_emulation/)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda_efield_emulation(tmp_path_factory):
    """csrc/cuda/efield.cu compiled as C++ against the threaded block emulation, loaded with ctypes."""
    dll = load_cuda_emulation("efield_emulation.cpp", tmp_path_factory.mktemp("emu"))
    dll.fm_efield_emulate.restype = None
    dll.fm_efield_emulate.argtypes = [ctypes.c_void_p] * 12 + [ctypes.c_int] * 4 + [ctypes.c_float] * 3 + [ctypes.c_int]
    return dll


EMULATED = [  # (B, N, M, R, walls, threads): one and several compaction rounds and receptor rounds, 1-2 warps
    (2, 3, 17, 12, True, 32),
    (2, 4, 40, 40, True, 32),
    (1, 2, 70, 9, False, 64),
    (2, 1, 0, 5, True, 32),
    (1, 3, 100, 70, True, 64),
]


@pytest.mark.parametrize("case", EMULATED, ids=lambda c: "B{}N{}M{}R{}{}T{}".format(c[0], c[1], c[2], c[3], "w" if c[4] else "", c[5]))
@pytest.mark.parametrize("per_emitter", [True, False])
def test_cuda_kernel_source_under_emulation(cuda_efield_emulation, case, per_emitter):
    """The CUDA kernel (per-block staging, in-order compaction of live objects across warps and
    rounds, relative source layout, receptor striding) vs the float64 reference; the outputs and
    the block's shared memory start as NaN, so anything unwritten or read before written fails."""
    B, N, M, R, walls, threads = case
    args, arena = scene(B, N, M, R, walls=walls, near=True, seed=7 * M + R)
    ra, rc = electric_image(*f64(args, arena)[0], arena=f64(args, arena)[1], **ref)
    x = _pack_inputs(*args, arena)
    active = torch.full((B, N, R), float("nan"))
    comm = torch.full((B, N, N, R), float("nan")) if per_emitter else None
    ptr = lambda t: None if t is None else ctypes.c_void_p(t.data_ptr())  # noqa: E731
    cuda_efield_emulation.fm_efield_emulate(
        ptr(x["fish_pos"]), ptr(x["heading"]), ptr(x["eod"]), ptr(x["obj_pos"]), ptr(x["radius"]),
        ptr(x["contrast"]), ptr(x["mask"]), ptr(x["rec_pos"]), ptr(x["rec_nrm"]), ptr(x["arena"]), ptr(active), ptr(comm),
        B, N, M, R, 1.0, 1e-3, 1.0, threads)
    assert_rms_close(active, ra, 1e-4, "active")
    if per_emitter:
        assert_rms_close(comm, rc, 1e-4, "comm")


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def _bad(args, arena, i, value):
    args = list(args)
    args[i] = value
    return args, arena


def test_bad_inputs():
    args, arena = scene(2, 3, 4, 5)
    names = ["fish_pos", "fish_heading", "eod", "obj_pos", "obj_radius", "obj_contrast", "obj_mask", "receptor_pos", "receptor_normal"]

    def expect(err, match, a, ar=arena, **kw):
        with pytest.raises(err, match=match):
            electric_image(*a, arena=ar, **kw)

    expect(ValueError, "fish_pos: expected at least one fish", scene(2, 0, 4, 5)[0])
    expect(ValueError, "fish_heading", *_bad(args, arena, 1, args[1][:, :2]))
    expect(ValueError, "obj_radius", *_bad(args, arena, 4, args[4][:, :3]))
    expect(ValueError, "receptor_normal", *_bad(args, arena, 8, args[8][:3]))
    expect(ValueError, "fish_pos", *_bad(args, arena, 0, args[0][..., :1]))
    expect(ValueError, "arena", args, arena[:1])
    expect(TypeError, "obj_mask", *_bad(args, arena, 6, args[6].float()))
    expect(TypeError, "eod", *_bad(args, arena, 2, args[2].double()))
    expect(TypeError, "fish_pos", [args[0].half()] + args[1:])
    neg = args[4].clone()
    neg[1, 2] = -0.1
    expect(ValueError, "obj_radius: expected radii >= 0", *_bad(args, arena, 4, neg))
    inf = args[4].clone()
    inf[0, 1] = float("inf")  # a^3 = inf would turn every output of the environment into NaN
    expect(ValueError, r"obj_radius: expected radii >= 0 \(finite\)", *_bad(args, arena, 4, inf))
    for bad_c in (-0.6, 1.2, float("nan")):
        cc = args[5].clone()
        cc[0, 0] = bad_c
        expect(ValueError, r"obj_contrast: expected contrasts in \[-0.5, 1\]", *_bad(args, arena, 5, cc))
    for i in (0, 1, 2, 3, 7, 8):
        t = args[i].clone()
        t.view(-1)[0] = float("inf") if i % 2 else float("nan")
        expect(ValueError, f"{names[i]}: expected finite values", *_bad(args, arena, i, t))
    expect(ValueError, "arena: expected finite arena sides > 0", args, -arena)
    # the fast path sums every float input: finite values whose sum overflows are no error
    from fastmodels.ops.efield import _check_values

    big = torch.full_like(args[0], 3e38)
    _check_values(big, *args[1:6], *args[7:9], arena)
    expect(ValueError, "eps", args, eps=-1.0)
    expect(ValueError, "pole_separation", args, pole_separation=float("nan"))
    expect(TypeError, "per_emitter", args, per_emitter=1)
    expect(ValueError, "backend", args, backend="fast")
    expect(TypeError, "check_values: expected a bool", args, check_values="no")  # a truthy string still checked
    # Skipping value checks is explicit.
    t = args[4].clone()
    t[0, 0] = -1.0
    electric_image(*_bad(args, arena, 4, t)[0], arena=arena, check_values=False, **ref)


@pytest.mark.parametrize("backend", op_backends("electric_image"))
def test_float64_beyond_float32_range_is_refused_by_fused_backends(backend):
    """The fused backends compute float64 input in fp32, where 1e39 becomes inf: a clear error,
    naming the argument, instead of inf or NaN outputs. The float64 reference takes such input."""
    args, arena = f64(*scene(2, 3, 4, 5, device=backend_device(backend)))
    names = {0: "fish_pos", 3: "obj_pos", 4: "obj_radius", 7: "receptor_pos"}
    for i, name in names.items():
        bad = [a.clone() for a in args]
        bad[i].view(-1)[-1] = 1e39
        with pytest.raises(ValueError, match=rf"{name}: expected .*within float32's range"):
            electric_image(*bad, arena=arena, backend=backend)
        active, comm = electric_image(*bad, arena=arena, **ref)
        assert active.dtype == torch.float64
    with pytest.raises(ValueError, match="arena: expected finite arena sides > 0 within float32's range"):
        electric_image(*args, arena=arena * 1e38, backend=backend)
    # values inside float32's range (and their overflowing sum) are fine
    big = [a.clone() for a in args]
    big[3].fill_(3e38)
    electric_image(*big, arena=arena, backend=backend)


def test_receptor_ring():
    pos, nrm = receptor_ring(6, 2.0)
    torch.testing.assert_close(pos, 2.0 * nrm)
    torch.testing.assert_close(nrm.norm(dim=1), torch.ones(6))
    torch.testing.assert_close(nrm[0], torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="R"):
        receptor_ring(0)
    with pytest.raises(ValueError, match="radius"):
        receptor_ring(4, -1.0)
    # a 0-d tensor offset (e.g. sampled) and NumPy scalars are numbers
    torch.testing.assert_close(receptor_ring(6, offset=torch.tensor(0.3))[0], receptor_ring(6, offset=0.3)[0])
    assert torch.equal(receptor_ring(6, radius=np.float32(2.0))[0], pos)


@pytest.mark.parametrize("kw,err,match", [
    (dict(R=4.0), TypeError, "R: expected an int"),
    (dict(R=4, radius=True), TypeError, "radius: expected a float"),
    (dict(R=4, radius=1e39), ValueError, "radius: expected a number representable in float32"),  # inf positions
    (dict(R=4, offset=float("nan")), ValueError, "offset: expected a finite number"),  # NaN receptors
    (dict(R=4, offset=None), TypeError, "offset: expected a float"),
    (dict(R=4, dtype=torch.int64), TypeError, "dtype: expected a floating-point"),  # a ring rounded to 0 / +-1
    (dict(R=4, dtype="float32"), TypeError, "dtype: expected a floating-point"),
])
def test_receptor_ring_bad_arguments(kw, err, match):
    with pytest.raises(err, match=match):
        receptor_ring(**kw)


def test_cuda_launch_refuses_more_blocks_than_one_grid():
    """The cuda launcher runs one block per (environment, fish): B * N past CUDA's 2**31 - 1 blocks
    is refused before the launch (past int32, B would also wrap silently in the ctypes call).
    The inputs are stride-0 views: nothing is allocated and no GPU is needed."""
    from fastmodels.ops.efield import _run_cuda

    big = lambda *shape: torch.zeros(1).expand(*shape)  # noqa: E731
    x = {"fish_pos": big(2**30, 2, 2), "obj_pos": big(2**30, 1, 2), "rec_pos": big(8, 2)}
    with pytest.raises(ValueError, match=r"B \* N = 2147483648 environment-fish pairs"):
        _run_cuda(x, None, None, 1.0, 1e-3, 1.0)


# ------------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile
# ------------------------------------------------------------------------------------------------


@pytest.mark.no_poison
def test_opcheck():
    for be in ("reference", "cpu" if DEVICE == "cpu" else "cuda"):
        args, arena = scene(2, 3, 4, 5, device="cpu" if be == "cpu" else DEVICE)
        for ar, pe in ((arena, True), (None, False)):
            torch.library.opcheck(torch.ops.fastmodels.electric_image.default,
                                  (*args, ar, 1.0, 1e-3, 1.0, pe, be), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.no_poison
def test_torch_compile_fullgraph():
    args, arena = scene(2, 3, 4, 5)

    def step(fish_pos, heading, *rest):
        fish_pos = fish_pos + 0.1 * torch.stack((heading.cos(), heading.sin()), -1)  # move, then sense
        active, comm = electric_image(fish_pos, heading, *rest, arena=arena)
        return active.clamp(-1, 1), comm.sum(2)

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    a, c = compiled(*args)
    ea, ec = step(*args)
    torch.testing.assert_close(a, ea)
    torch.testing.assert_close(c, ec)


@pytest.mark.parametrize("backend", ["reference", "default"])
def test_outputs_carry_no_gradient(backend):
    """Eager calls bypass the custom op; the outputs still carry no autograd history, whatever the
    backend (the reference computes with differentiable PyTorch ops)."""
    args, arena = scene(2, 3, 4, 5)
    args = [a.requires_grad_(True) if a.is_floating_point() else a for a in args]
    active, comm = electric_image(*args, arena=arena, backend=None if backend == "default" else backend)
    assert not active.requires_grad and not comm.requires_grad
    assert active.grad_fn is None and comm.grad_fn is None


# ------------------------------------------------------------------------------------------------
# Non-default pole separation and image strength (every other test runs at l = 1, gamma = 1, where
# a backend that ignores either parameter gives exactly the default's numbers)
# ------------------------------------------------------------------------------------------------


def test_pole_separation_in_the_pole_formula():
    """On-axis receptor at x = 7 of a +1/-1 pole pair centred at 0 with separation l: the poles
    are at +-l/2, so n . E = r1/(r1 + eps)^3 - r2/(r2 + eps)^3 with r = 7 -/+ l/2."""
    D = torch.float64
    fish = torch.tensor([[[0.0, 0.0], [10.0, 0.0]]], dtype=D)
    heading = torch.zeros(1, 2, dtype=D)
    eod = torch.tensor([[1.0, 0.0]], dtype=D)
    rpos, rnrm = torch.tensor([[-3.0, 0.0]], dtype=D), torch.tensor([[1.0, 0.0]], dtype=D)
    e = torch.zeros(1, 0, dtype=D)
    for l in (0.4, 3.0):
        _, comm = electric_image(fish, heading, eod, torch.zeros(1, 0, 2, dtype=D), e, e, e.bool(), rpos, rnrm,
                                 pole_separation=l, eps=1e-3, **ref)
        r1, r2 = 7 - l / 2, 7 + l / 2
        want = r1 / (r1 + 1e-3) ** 3 - r2 / (r2 + 1e-3) ** 3
        assert abs(comm[0, 1, 0, 0].item() - want) < 1e-14, l


def test_image_strength_scales_every_image():
    """gamma multiplies every wall image (of the poles and of the induced dipoles, which are
    themselves induced by the direct poles only): gamma = 0 equals no walls, and active is affine in
    gamma. comm (no images) does not depend on gamma."""
    args, arena = f64(*scene(2, 3, 9, near=True, big_objects=True, seed=3))
    free, c_free = electric_image(*args, **ref)
    a0, c0 = electric_image(*args, arena=arena, image_strength=0.0, **ref)
    a1, _ = electric_image(*args, arena=arena, image_strength=1.0, **ref)
    torch.testing.assert_close(a0, free, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(c0, c_free, rtol=0, atol=0)
    assert (a1 - a0).abs().max() > 1e-3 * a1.abs().max()  # the images matter in this scene
    for g in (0.35, -0.6):
        ag, cg = electric_image(*args, arena=arena, image_strength=g, **ref)
        torch.testing.assert_close(ag, a0 + g * (a1 - a0), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(cg, c_free, rtol=0, atol=0)


@pytest.mark.parametrize("backend", op_backends("electric_image"))
@pytest.mark.parametrize("pole_separation,image_strength", [(1.7, 0.2), (0.5, -0.3)])
def test_backend_matches_reference_at_non_default_parameters(backend, pole_separation, image_strength):
    dev = backend_device(backend)
    args, arena = scene(2, 3, 9, near=True, big_objects=True, device=dev, seed=3)
    kw = dict(arena=arena, pole_separation=pole_separation, image_strength=image_strength)
    a64, ar64 = f64(args, arena)
    ra, rc = electric_image(*a64, **{**kw, "arena": ar64}, **ref)
    a, c = electric_image(*args, **kw, backend=backend)
    assert_rms_close(a, ra, 1e-4, "active")
    assert_rms_close(c, rc, 1e-4, "comm")

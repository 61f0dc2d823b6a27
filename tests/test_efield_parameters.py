"""electric_image at non-default pole_separation and image_strength: every other test runs at the
defaults l = 1 and gamma = 1, where a backend that ignores either parameter (or the reference that
drops one) gives exactly the default's numbers."""

import math

import pytest
import torch
from helpers import assert_rms_close, backend_device, op_backends

from fastmodels.efish import receptor_ring
from fastmodels.ops import electric_image

ref = dict(backend="reference")


def near_scene(B=2, N=3, M=9, R=12, seed=3, device="cpu"):
    """fp32 scene: fish 0.3-2 cm from a side wall, large objects 0.5-3 cm from a fish (strong images)."""
    g = torch.Generator().manual_seed(seed)
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    arena = 10 + 30 * u(B, 2)
    fish = 2 + (arena[:, None] - 4) * u(B, N, 2)
    d = 0.3 + 1.7 * u(B, N)
    fish[..., 0] = torch.where(u(B, N) < 0.5, d, arena[:, None, 0] - d)
    heading = 2 * math.pi * u(B, N)
    eod = 0.5 + u(B, N)
    host = torch.randint(0, N, (B, M), generator=g)
    ang, dist = 2 * math.pi * u(B, M), 0.5 + 2.5 * u(B, M)
    obj = torch.gather(fish, 1, host[..., None].expand(B, M, 2)) + dist[..., None] * torch.stack((ang.cos(), ang.sin()), -1)
    radius = 0.4 + 0.6 * u(B, M)  # large conductors and insulators: strong echoes and echo images
    contrast = torch.where(u(B, M) < 0.5, torch.full((B, M), -0.5), torch.ones(B, M))
    mask = u(B, M) < 0.8
    rpos, rnrm = receptor_ring(R, 1.0, offset=0.1)
    args = [fish, heading, eod, obj, radius, contrast, mask, rpos, rnrm]
    return [a.to(device) for a in args], arena.to(device)


def f64(args, arena):
    return [a.double() if a.is_floating_point() else a for a in args], arena.double()


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
    args, arena = f64(*near_scene())
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
    args, arena = near_scene(device=dev)
    kw = dict(arena=arena, pole_separation=pole_separation, image_strength=image_strength)
    a64, ar64 = f64(args, arena)
    ra, rc = electric_image(*a64, **{**kw, "arena": ar64}, **ref)
    a, c = electric_image(*args, **kw, backend=backend)
    assert_rms_close(a, ra, 1e-4, "active")
    assert_rms_close(c, rc, 1e-4, "comm")

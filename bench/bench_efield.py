"""electric_image benchmarks (issue 6).

CPU (B=256, N=4, R=64, M=32, walls): the C++ backend vs a NumPy float64 loop over environments and
fish in the authors' style (bench/efield_numpy_baseline.py) and vs the PyTorch reference on the same
fp32 inputs. GPU (B=4096, same scene): the CUDA and Triton backends vs the PyTorch reference.

FLOPs are a fixed work model, counted per source-receptor pair as the first kernels executed them
(sqrt and division count 1), kept so that rows stay comparable: 16 per pole (the fish's own 2 direct
poles are skipped, its images are not) and 25 per dipole (the current kernels issue 13 and 19
instructions there, FMAs and MUFU operations counted once; docs/efield.md), so
one step costs B N R (16 (2 (N - 1) + 8 N) + 25 * 5 M) FLOPs with walls. env-steps/s =
B / median time; the GPU target "median_ms" <= B / 2e7 s encodes >= 2e7 env-steps/s.
Peaks used for the fraction of peak in docs/efield.md: this CPU (2 Zen 4 cores, 2.6 GHz, 2 x 256-bit
FMA pipes = 32 fp32 FLOP/cycle/core) 166 GFLOP/s; H100/H200 fp32 (non-tensor) 67 TFLOP/s.
"""

from __future__ import annotations

import math

import torch

from fastmodels.bench.harness import Case, register_cases
from fastmodels.testing import rms_ratio

CPU_PEAK_TFLOPS = 2 * 2.6e9 * 32 / 1e12
GPU_PEAK_TFLOPS = 67.0


def _scene(B, N, M, R, device, walls=True):
    g = torch.Generator().manual_seed(0)
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    arena = 40 + 260 * u(B, 2)  # the authors' arena sides: 40-300 cm
    fish = 5 + (arena[:, None] - 10) * u(B, N, 2)
    host = torch.randint(0, N, (B, M), generator=g)
    ang, dist = 2 * math.pi * u(B, M), 1.5 + 13.5 * u(B, M)  # food outside the body, within 15 cm of a fish
    obj = torch.gather(fish, 1, host[..., None].expand(B, M, 2)) + dist[..., None] * torch.stack((ang.cos(), ang.sin()), -1)
    ang = 2 * math.pi * torch.arange(R, dtype=torch.float64) / R
    nrm = torch.stack((ang.cos(), ang.sin()), -1).float()
    x = dict(
        fish_pos=fish, fish_heading=2 * math.pi * u(B, N), eod=(u(B, N) < 0.5).float(), obj_pos=obj,
        obj_radius=torch.full((B, M), 0.25), obj_contrast=torch.full((B, M), -0.5), obj_mask=u(B, M) < 0.9,
        receptor_pos=nrm.clone(), receptor_normal=nrm, arena=arena if walls else None,
    )
    return {k: (None if v is None else v.to(device)) for k, v in x.items()}


_ORDER = ("fish_pos", "fish_heading", "eod", "obj_pos", "obj_radius", "obj_contrast", "obj_mask", "receptor_pos", "receptor_normal")


def _call(backend):
    from fastmodels.ops import electric_image

    def fn(x):
        return electric_image(*(x[k] for k in _ORDER), arena=x["arena"], backend=backend, check_values=False)

    return fn


def _numpy(x):
    from fastmodels.bench.efield_numpy_baseline import electric_image_numpy

    arena = x["arena"]
    a, c = electric_image_numpy(*(x[k].cpu().double().numpy() if x[k].is_floating_point() else x[k].cpu().numpy() for k in _ORDER),
                                arena=None if arena is None else arena.cpu().double().numpy())
    return torch.from_numpy(a), torch.from_numpy(c)


def _error(x, out):
    if "_ref" not in x:
        from fastmodels.ops import electric_image

        x64 = {k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in x.items()}
        x["_ref"] = electric_image(*(x64[k] for k in _ORDER), arena=x64["arena"], backend="reference")
    ra, rc = x["_ref"]
    return max(rms_ratio(out[0], ra), rms_ratio(out[1], rc))


def _flops(x):
    B, N, _ = x["fish_pos"].shape
    M = x["obj_pos"].shape[1]
    R = x["receptor_pos"].shape[0]
    images = 4 if x["arena"] is not None else 0
    return B * N * R * (16 * (2 * (N - 1) + 2 * N * images) + 25 * M * (1 + images))


@register_cases("electric_image")
def cases(device: str, quick: bool) -> list[Case]:
    if device == "cpu":
        B, N, R, M = 256, 4, 64, 32
        note = (f"env-steps/s = B / median; fp32 peak of this CPU taken as {CPU_PEAK_TFLOPS * 1e3:.0f} GFLOP/s "
                "(2 Zen 4 cores x 2.6 GHz x 32 FLOP/cycle); FLOPs per step = B N R (16 poles + 25 dipoles) as counted in bench_efield.py")
        return [
            Case("electric_image", f"B{B}_N{N}_R{R}_M{M}_walls", device, lambda: _scene(B, N, M, R, "cpu"),
                 {"cpu": _call("cpu"), "numpy_f64_loop": _numpy, "torch_reference": _call("reference")},
                 error=_error, flops=_flops, targets={"time_ratio:numpy_f64_loop": 50, "time_ratio:torch_reference": 20,
                                                      "rms_rel_err": 1e-4}, note=note),
            Case("electric_image", "B16_N4_R64_M32_walls", device, lambda: _scene(16, 4, 32, 64, "cpu"),
                 {"cpu": _call("cpu"), "numpy_f64_loop": _numpy, "torch_reference": _call("reference")},
                 error=_error, flops=_flops, targets={"rms_rel_err": 1e-4}, quick=True, note=note),
        ]
    B, N, R, M = 4096, 4, 64, 32
    note = (f"env-steps/s = {B} / median (target median_ms <= {B / 2e7 * 1e3:.4f} ms is >= 2e7 env-steps/s); "
            f"fraction of fp32 roofline = tflops / {GPU_PEAK_TFLOPS:.0f}")
    return [
        Case("electric_image", f"B{B}_N{N}_R{R}_M{M}_walls", device, lambda: _scene(B, N, M, R, "cuda"),
             {"cuda": _call("cuda"), "triton": _call("triton"), "torch_reference": _call("reference")},
             error=_error, flops=_flops,
             targets={"time_ratio:torch_reference": 50, "median_ms": B / 2e7 * 1e3, "rms_rel_err": 1e-4}, note=note),
        Case("electric_image", f"B{B}_N{N}_R{R}_M{M}_walls_triton", device, lambda: _scene(B, N, M, R, "cuda"),
             {"triton": _call("triton"), "torch_reference": _call("reference")},
             error=_error, flops=_flops,
             targets={"time_ratio:torch_reference": 50, "median_ms": B / 2e7 * 1e3, "rms_rel_err": 1e-4}, note=note),
    ]

"""Where one call's GPU time goes: a kernel-time breakdown (torch.profiler) next to the wall time.

    python -m fastmodels.bench.gpu_profile [pushdown_attention randomized_svd ...]

For each profiled call it prints the kernels by GPU time per call and appends one JSON line to
``<results>/profile.jsonl`` (the ``FASTMODELS_BENCH_RESULTS`` folder): wall ms per call
(synchronized), host ms per call (unsynchronized), the sum of kernel times per call, their ratio (well below 1: the call waits on the
host, launches or synchronizations) and the top kernels. It guides optimization; the benchmark
rows (harness.py) are the results.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable

import torch

from fastmodels.bench.harness import RESULTS_DIR, environment


def _wall_ms(fn, reps: int = 3, warmup: bool = True) -> float:
    if warmup:
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e3


def _host_ms(fn, reps: int = 20) -> float:
    """Host time per call: the Python and launch work, timed without synchronizing (the GPU runs
    behind). When it exceeds the kernels' time, the GPU idles between launches and the wall time
    per call is the host's."""
    fn()
    torch.cuda.synchronize()
    total = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        total += time.perf_counter() - t0
    torch.cuda.synchronize()
    return total / reps * 1e3


_NOT_KERNELS = {"Activity Buffer Request", "Buffer Flush"}


def breakdown(op: str, name: str, fn: Callable[[], Any], reps: int = 3, top: int = 12) -> dict:
    from torch.profiler import ProfilerActivity, profile

    wall_ms = _wall_ms(fn, reps)
    host_ms = _host_ms(fn)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    events = []
    for e in prof.key_averages():
        self_us = getattr(e, "self_device_time_total", None)
        if self_us is None:
            self_us = getattr(e, "self_cuda_time_total", 0)
        if self_us > 0 and e.key not in _NOT_KERNELS:
            events.append((self_us / reps / 1e3, e.count / reps, e.key, getattr(e, "device_type", None)))
    # GPU-side events only: CPU ops (custom ops, autograd nodes) also carry the device time of what
    # they launch (the 2026-11-26 rows, taken before this filter, count both in kernel_ms).
    kernels = [ev[:3] for ev in events if ev[3] == torch.autograd.DeviceType.CUDA] or [ev[:3] for ev in events]
    kernels.sort(reverse=True)
    gpu_ms = sum(k[0] for k in kernels)
    row = {
        "kind": "profile", "op": op, "case": name, "wall_ms": wall_ms, "host_ms": host_ms, "kernel_ms": gpu_ms,
        "busy_fraction": gpu_ms / wall_ms if wall_ms else None,
        "top_kernels": [{"ms": round(ms, 4), "calls": calls, "name": key[:120]} for ms, calls, key in kernels[:top]],
        **environment("cuda"),
    }
    print(f"\n### {op} / {name}: wall {wall_ms:.3f} ms per call, host {host_ms:.3f} ms, kernels {gpu_ms:.3f} ms "
          f"({row['busy_fraction']:.0%} busy)")
    for ms, calls, key in kernels[:top]:
        print(f"  {ms:9.3f} ms  x{calls:<5g} {key[:110]}")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with open(RESULTS_DIR / "profile.jsonl", "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
    return row


def profile_pushdown() -> None:
    from fastmodels.bench import bench_pushdown as bp

    for T, D in ((512, 64), (4096, 64)):
        x = bp._setup(4, 16, T, D, 50, torch.bfloat16, "cuda")()
        breakdown("pushdown_attention", f"fwd+bwd bf16 B4 H16 T{T} D{D} V50 (triton)", lambda: bp._ours(x))
        if T == 4096:
            breakdown("pushdown_attention", f"fwd+bwd bf16 B4 H16 T{T} D{D} V50 (triton, uniform=0)", lambda: bp._ours_no_uniform(x))
        breakdown("pushdown_attention", f"fwd+bwd bf16 B4 H16 T{T} D{D} (sdpa flash)", lambda: bp._sdpa_flash(x))
        x.clear()  # free this length's tensors before the next


def profile_efield() -> None:
    from fastmodels.bench import bench_efield as be

    x = be._scene(4096, 4, 32, 64, "cuda")
    for backend in ("cuda", "triton"):
        fn = be._call(backend)
        breakdown("electric_image", f"B4096_N4_R64_M32_walls ({backend})", lambda: fn(x))


def profile_rsvd() -> None:
    from fastmodels.bench import bench_rsvd as br
    from fastmodels.ops import randomized_svd

    A = br._mp_spikes_bf16(28, 4096, 11008, "cuda")
    for k in (64,):
        breakdown("randomized_svd", f"28x4096x11008 bf16 r{k} accurate (default)", lambda: randomized_svd(A, k, seed=0))
        breakdown("randomized_svd", f"28x4096x11008 bf16 r{k} torch_lowrank", lambda: randomized_svd(A, k, method="torch_lowrank", seed=0))
        breakdown("randomized_svd", f"28x4096x11008 bf16 r{k} torch.svd_lowrank looped", lambda: br._svd_lowrank_looped({"A": A, "k": k}))


def profile_small_svd() -> None:
    """The Rayleigh-Ritz step's SVD of b small l x l factors (51 ms of a 118 ms rank-64 call on an
    H200): each candidate way of computing it, by wall time (synchronized) and accuracy on the same
    input: max |U^T U - I|, max |V^T V - I| and ||R - U S V^T||_F / ||R||_F, so a faster route is
    only taken if it is also accurate enough (the op's contract: orthonormality to 1e-5)."""
    from fastmodels.ops._jacobi import jacobi_svd

    def svd(R, **kw):
        U, S, Vh = torch.linalg.svd(R, **kw)
        return U, S, Vh.mT

    def eigh_gram(R):  # R^T R = V S^2 V^T, U = R V / S (loses U's orthogonality where S is small)
        w, V = torch.linalg.eigh(R.mT @ R)
        S = w.clamp_min(0).sqrt().flip(-1)
        V = V.flip(-1)
        return (R @ V) / S.clamp_min(torch.finfo(R.dtype).tiny)[..., None, :], S, V

    for l in (96, 768):  # rank 64 (p = 32) and rank 512 (p = 256)
        g = torch.Generator(device="cuda").manual_seed(0)
        # an upper-triangular factor with a decaying spectrum, like the one Rayleigh-Ritz produces
        X = torch.randn(28, 4 * l, l, device="cuda", dtype=torch.float64, generator=g)
        X = X * torch.arange(1, l + 1, device="cuda", dtype=torch.float64) ** -0.5
        R = torch.linalg.qr(X).R
        cands = {
            "linalg.svd fp64 (cuda, default driver)": lambda: svd(R),
            "linalg.svd fp64 (cuda, gesvda)": lambda: svd(R, driver="gesvda"),
            "linalg.svd fp32 (cuda)": lambda: svd(R.float()),
            "eigh of R^T R fp64 (cuda)": lambda: eigh_gram(R),
        }
        if l <= 512:  # slow routes at l = 768 (the host: ~5 s on the dev CPU), and the Jacobi kernel's limit
            cands["linalg.svd fp64 (cuda, gesvd)"] = lambda: svd(R, driver="gesvd")
            cands["linalg.svd fp64 (cpu)"] = lambda: svd(R.cpu())
            cands["eigh of R^T R fp64 (cpu)"] = lambda: eigh_gram(R.cpu())
            cands["jacobi_svd fp32 (csrc/cuda)"] = lambda: jacobi_svd(R.float().contiguous(), backend="cuda")
        times, errors = {}, {}
        eye = torch.eye(l, device="cuda", dtype=torch.float64)
        for name, fn in cands.items():
            try:
                U, S, V = (t.to("cuda", torch.float64) for t in fn())  # the warm-up call, also checked
                times[name] = _wall_ms(fn, reps=1 if l > 256 else 5, warmup=False)
                rec = torch.linalg.matrix_norm(R - (U * S[..., None, :]) @ V.mT) / torch.linalg.matrix_norm(R)
                errors[name] = {"orth_u": float((U.mT @ U - eye).abs().amax()), "orth_v": float((V.mT @ V - eye).abs().amax()),
                                "rel_recon": float(rec.max())}
            except Exception as exc:  # noqa: BLE001 - a failing candidate is a result too
                times[name] = f"{type(exc).__name__}: {str(exc)[:100]}"
        row = {"kind": "profile", "op": "randomized_svd", "case": f"small SVD 28 x {l} x {l}", "wall_ms": times,
               "errors": errors, **environment("cuda")}
        print(f"\n### randomized_svd / small SVD 28 x {l} x {l} (wall ms per call; orthonormality, reconstruction)")
        for name, t in times.items():
            e = errors.get(name, {})
            acc = f"  U {e['orth_u']:.1e}  V {e['orth_v']:.1e}  rec {e['rel_recon']:.1e}" if e else ""
            print(f"  {t if isinstance(t, str) else f'{t:9.3f}'}  {name}{acc}")
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        with open(RESULTS_DIR / "profile.jsonl", "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")


PROFILES = {"electric_image": profile_efield, "pushdown_attention": profile_pushdown, "randomized_svd": profile_rsvd, "small_svd": profile_small_svd}


def main(argv: list[str]) -> int:
    if not torch.cuda.is_available():
        print("gpu_profile: no CUDA device visible", file=sys.stderr)
        return 2
    failed = 0
    for op in argv or list(PROFILES):
        try:
            PROFILES[op]()
        except Exception as exc:  # noqa: BLE001 - one failing profile must not hide the others
            failed += 1
            print(f"gpu_profile: {op} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

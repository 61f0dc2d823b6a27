"""Ahead-of-time compilation of the Triton kernels for Hopper (sm_90) without a GPU.

Used by tests/test_triton_compile.py (every kernel compiles; registers and spills) and by
``python -m fastmodels.bench.sass_loops`` (per-loop SASS instruction counts). Each host launcher
of ``fastmodels.kernels`` is called on small CPU tensors with its ``*_kernel`` objects replaced by
recorders, so ``kernel[grid](*args, **kwargs)`` is captured instead of launched; Triton's own
argument binder then derives the signature, constexprs and alignment attributes a real launch would
compile with. Relies on Triton internals (``create_function_from_signature``,
``JITFunction._pack_args``) as of triton 3.6-3.9.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import time

import torch

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def unavailable() -> str | None:
    """Why sm_90 compilation cannot run here, or None."""
    from fastmodels.kernels._host import interpreting

    if interpreting():
        return "TRITON_INTERPRET=1: the kernel modules built their interpreter configs (run in the reference pass)"
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas
        from triton.compiler import make_backend  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"triton with its NVIDIA backend is not available ({type(exc).__name__}: {exc})"
    try:
        path = get_ptxas(90).path
    except Exception as exc:  # noqa: BLE001
        return f"ptxas not found ({exc})"
    if not path or not os.access(path, os.X_OK):
        return f"ptxas not executable: {path!r}"
    return None


# ----------------------------------------------------------------------------------------------
# Launcher calls (the only hand-chosen part): shapes are small, dtypes/flags cover what the public
# ops pass to the triton backend (see fastmodels/ops/<op>.py).
# ----------------------------------------------------------------------------------------------


def _attachment_launches(K):
    # fastmodels.ops.attachment: q/keys/feat in fp32/fp16/bf16, a compact int32 tape or a dense
    # int8/16/32 tape (the op converts others to int32); V = 50 depth rows (2 read in binary mode).
    # W = 64: the launchers pad feat's rows to a multiple of 16 elements, so an odd W changes only
    # the alignment of q and keys (same label, hence not compiled separately here).
    B, T, V, W = 2, 40, 50, 64
    tapes = [("compact", None), ("dense", torch.int8), ("dense", torch.int16), ("dense", torch.int32)]
    for dt, binary, (kind, tape_dt) in itertools.product(DTYPES, (False, True), tapes):
        q, keys, feat = torch.zeros(B, T, W, dtype=dt), torch.zeros(B, T, W, dtype=dt), torch.zeros(V, W, dtype=dt)
        if kind == "compact":
            depth, boundary, dense = torch.zeros(B, T, dtype=torch.int32), torch.zeros(B, T, dtype=torch.int32), None
        else:
            depth, boundary, dense = None, None, torch.zeros(B, T, T, dtype=tape_dt)
        K.attachment_fwd(q, keys, feat, depth, boundary, dense, binary)
        K.attachment_bwd(torch.zeros(B, T, T), q, keys, feat, depth, boundary, dense, binary)


def _efield_launches(K):
    # fastmodels.ops.efield converts every input to fp32 before the triton launcher.
    B, N, M, R = 2, 3, 4, 64  # R as in the benchmarks (BLOCK_R = 64)
    z = lambda *s: torch.zeros(*s, dtype=torch.float32)  # noqa: E731
    for walls, comm in itertools.product((False, True), (False, True)):
        K.efield_fwd(z(B, N, 2), z(B, N), z(B, N), z(B, M, 2), z(B, M), z(B, M), torch.ones(B, M, dtype=torch.bool),
                     z(R, 2), z(R, 2),
                     z(4) if walls else None, z(B, N, R), z(B, N, N, R) if comm else None,
                     pole_separation=0.1, eps=1e-3, image_strength=0.5)


def _nextlat_launches(K):
    # fastmodels.ops.nextlat: hidden/weight/bias/pred in one of fp32/fp16/bf16, int64 indices.
    N, M, V = 100, 50, 1000
    for dt, D, has_bias in itertools.product(DTYPES, (768, 60), (False, True)):
        hidden, weight = torch.zeros(N, D, dtype=dt), torch.zeros(V, D, dtype=dt)
        bias = torch.zeros(V, dtype=dt) if has_bias else None
        targets = torch.zeros(N, dtype=torch.int64)
        pred, teacher = torch.zeros(M, D, dtype=dt), torch.zeros(M, dtype=torch.int64)
        _, lse, _, lse_pred = K.lce_kl_fwd(hidden, weight, bias, targets, pred, teacher, -100)
        for det in (True, False):
            K.lce_kl_bwd(torch.zeros(N), torch.zeros(M), hidden, weight, bias, targets, pred, teacher,
                         lse, lse_pred, -100, det)


def _pushdown_launches(K):
    # fastmodels.ops.pushdown: q/k/v/emb in fp32/fp16/bf16, a compact int tape or a dense int8/16/32
    # tape; D and V as in bench/bench_pushdown.py (D 64 and 128, V 50; binary mode reads 2 rows).
    B, H, T, V = 2, 2, 40, 50
    tapes = [("compact", None), ("dense", torch.int8), ("dense", torch.int16), ("dense", torch.int32)]
    for dt, D, binary, (kind, tape_dt) in itertools.product(DTYPES, (64, 128), (False, True), tapes):
        q, k, v, do = (torch.zeros(B, H, T, D, dtype=dt) for _ in range(4))
        emb = torch.zeros(H, V, D, dtype=dt)
        if kind == "compact":
            depth, boundary, dense = torch.zeros(B, T, dtype=torch.int32), torch.zeros(B, T, dtype=torch.int32), None
        else:
            depth, boundary, dense = None, None, torch.zeros(B, T, T, dtype=tape_dt)
        out, lse = K.pushdown_attention_fwd(q, k, v, emb, depth, boundary, dense, 0.125, binary)
        K.pushdown_attention_bwd(do, q, k, v, emb, depth, boundary, dense, out, lse, 0.125, binary)


def _rsvd_launches(K):
    # fastmodels.ops.rsvd: A in fp32/fp16/bf16; l = k + oversampling, tiles BL = 64 and 128.
    b, m, n = 2, 50, 300
    for l in (40, 130):
        K.sketch_omega(b, n, l, 7, "cpu")
        for dt in DTYPES:
            A = torch.zeros(b, m, n, dtype=dt)
            for transpose in (False, True):
                K.sketch_matmul(A, l, 7, transpose=transpose)
            for det in (True, False):
                K.power_pass(A, torch.zeros(b, m, l), deterministic=det)
    for dt in DTYPES:  # shapes that are multiples of every tile (the unmasked paths; like 4096 x 11008)
        A = torch.zeros(b, 128, 256, dtype=dt)
        for l in (40, 96):
            K.sketch_matmul(A, l, 7)
            for det in (True, False):
                K.power_pass(A, torch.zeros(b, 128, l), deterministic=det)


LAUNCHERS = {"attachment": _attachment_launches, "efield": _efield_launches, "nextlat": _nextlat_launches,
              "pushdown": _pushdown_launches, "rsvd": _rsvd_launches}


# ----------------------------------------------------------------------------------------------
# Recording and compiling
# ----------------------------------------------------------------------------------------------


class Recorder:
    """Stands in for ``kernel``: ``kernel[grid](*args, **kwargs)`` appends (name, args, kwargs)."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.name, args, kwargs))


def kernels(module):
    """{name: Autotuner, Heuristics or JITFunction} of every ``*_kernel`` attribute of a kernel module."""
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    return {n: o for n, o in vars(module).items() if n.endswith("_kernel") and isinstance(o, (Autotuner, Heuristics, JITFunction))}


def unwrap(obj):
    """(JITFunction, autotune configs or [None], Heuristics wrappers outermost first) of a kernel."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    configs = list(obj.configs) if isinstance(obj, Autotuner) else [None]
    fn = obj.fn if isinstance(obj, Autotuner) else obj
    heuristics = []
    while isinstance(fn, Heuristics):
        heuristics.append(fn)
        fn = fn.fn
    return fn, configs, heuristics


def pruned_configs(obj, jit, args, kwargs, configs) -> list:
    """The autotune configs a launch with (args, kwargs) benchmarks: ``configs`` after the kernel's
    ``early_config_prune`` (prune_configs_by), as Autotuner.prune_configs applies it."""
    prune = getattr(obj, "early_config_prune", None)
    if prune is None or configs == [None]:
        return configs
    return prune(configs, dict(zip(jit.arg_names, args)), **kwargs)


def launch_kwargs(jit, heuristics, args, kwargs, config=None) -> dict:
    """The keyword arguments a launch reaches the JITFunction with: the launcher's, the autotune
    config's, then each @triton.heuristics value computed from all of them (as Heuristics.run does)."""
    kw = dict(kwargs)
    if config is not None:
        kw.update(config.all_kwargs())
    for h in heuristics:
        named = {**dict(zip(jit.arg_names, args)), **kw}
        for name, fn in h.values.items():
            kw[name] = fn(named)
    return kw


def record(module, launcher):
    log = []
    saved = kernels(module)
    try:
        for name in saved:
            setattr(module, name, Recorder(name, log))
        with torch.no_grad():
            launcher(module)
    finally:
        for name, obj in saved.items():
            setattr(module, name, obj)
    return saved, log


_BACKEND = None


def backend():
    global _BACKEND
    if _BACKEND is None:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        target = GPUTarget("cuda", 90, 32)
        _BACKEND = (target, make_backend(target))
    return _BACKEND


def specialize(jit, args, kwargs):
    """(options, signature, constexprs, attrs) exactly as JITFunction.run derives them on a GPU."""
    from triton.runtime.jit import create_function_from_signature

    _, nvidia = backend()
    binder = create_function_from_signature(jit.signature, jit.params, nvidia)
    bound, specialization, options = binder(*args, **kwargs)
    return jit._pack_args(nvidia, kwargs, bound, specialization, options)


def label(jit, args, kwargs):
    """Short id of a launch variant: pointer dtypes, then the launcher's constexprs and 1-specialized ints."""
    _, sig, constexprs, _ = specialize(jit, args, kwargs)
    ptrs = []
    for name, ty in sig.items():
        if ty.startswith("*") and ty[1:] not in ptrs:
            ptrs.append(ty[1:])
    parts = ["+".join(ptrs)]
    for (i,), val in sorted(constexprs.items()):
        name = jit.arg_names[i]
        if name in kwargs:
            parts.append(f"{name}={int(val) if isinstance(val, bool) else val}")
        elif isinstance(val, int):
            parts.append(f"{name}=1")  # an int argument equal to 1: Triton specializes it
    return "-".join(parts)


def compile_launch(jit, args, kwargs):
    """triton.compile for sm_90 with what a GPU launch derives from (args, kwargs); returns
    (compiled kernel, ptxas log, seconds)."""
    import triton
    from triton.compiler import ASTSource

    target, _ = backend()
    options, signature, constexprs, attrs = specialize(jit, args, kwargs)
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    return compiled, log.getvalue(), time.perf_counter() - t0

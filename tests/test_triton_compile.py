"""Every Triton kernel of ``kernels/*.py`` compiles for Hopper (sm_90), also on machines without a GPU.

The interpreter pass (TRITON_INTERPRET=1) runs the kernels but never compiles them, so it misses
what only the real compiler refuses (a module-level Python int read inside a @triton.jit function,
a dot with a block dim < 16, a shape mismatch in an untaken branch, ptxas errors, ...). This module
runs the whole GPU pipeline -- frontend, TTIR, TTGIR, LLVM, PTX and ptxas -- for target
``GPUTarget("cuda", 90, 32)``, with the exact arguments the GPU launchers pass:

1. Each host launcher (``efield_fwd``, ``lce_kl_fwd``/``lce_kl_bwd``, ``pushdown_attention_fwd``/
   ``_bwd``, ``sketch_omega``/``sketch_matmul``/``power_pass``) is called on small CPU tensors of
   every supported dtype and every flag combination, with each ``*_kernel`` of its module replaced
   by a recorder, so ``kernel[grid](*args, **kwargs)`` is captured instead of launched. No signature
   is written by hand: Triton's own argument binder (the one ``JITFunction.run`` uses) turns the
   captured arguments into the signature, constexprs and pointer-alignment attributes a real launch
   would compile with. Only the launcher calls (shapes, dtypes, flags) below are chosen here.
2. Each captured launch is compiled with the GPU autotune configs of its kernel (the kernel modules
   build their GPU config lists when TRITON_INTERPRET is unset, which is how this pass runs).

Covering subset: compiling every (launch variant x autotune config) pair (~1000 compiles, some
fp32 ones 15-45 s each) is far beyond the ~4 minute budget on 2 cores. So, per kernel, a greedy
subset of the recorded launch variants is kept such that every value that reaches the compiler
occurs at least once (each pointer dtype: bf16/fp16/fp32 data, int8/16/32 tapes; each constexpr
value: flags such as HAS_BIAS/KL/COMPACT/BINARY/USE_ATOMIC/DOT_F32, block sizes BD/VP/BDO/BL/BN;
each int argument Triton specializes to 1), and these variants are paired round-robin with the
kernel's GPU autotune configs, so every config is compiled at least once too
(max(#variants kept, #configs) compiles per kernel; while configs remain unpaired, further
recorded variants are taken in launcher order), plus every config with the first recorded launch
(bf16, default flags: what the GPU benchmarks autotune over). ``FASTMODELS_AOT_FULL=1`` compiles every
recorded variant with every config instead.

Each compile prints (and records as junit properties) the register count and spill bytes that
ptxas reports (``pytest -rP`` shows them). Triton here is 3.9; the GPU machine runs 3.6, so this
catches most but not necessarily all compile errors there. Skipped when triton, its NVIDIA backend
or ptxas is missing, and under TRITON_INTERPRET=1 (the kernel modules then hold interpreter configs).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import re
import time

import pytest
import torch

_FULL = os.environ.get("FASTMODELS_AOT_FULL", "0") == "1"
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _unavailable() -> str | None:
    """Why sm_90 compilation cannot run here, or None."""
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on"):
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


_SKIP = _unavailable()


# ----------------------------------------------------------------------------------------------
# Launcher calls (the only hand-chosen part): shapes are small, dtypes/flags cover what the public
# ops pass to the triton backend (see fastmodels/ops/<op>.py).
# ----------------------------------------------------------------------------------------------


def _efield_launches(K):
    # fastmodels.ops.efield converts every input to fp32 before the triton launcher.
    B, N, M, R = 2, 3, 4, 30
    z = lambda *s: torch.zeros(*s, dtype=torch.float32)  # noqa: E731
    for walls, comm in itertools.product((False, True), (False, True)):
        K.efield_fwd(z(B, N, 2), z(B, N), z(B, N), z(B, M, 2), z(B, M), z(R, 2), z(R, 2),
                     z(4) if walls else None, z(B, N, R), z(B, N, N, R) if comm else None,
                     pole_separation=0.1, eps=1e-3, image_strength=0.5)


def _nextlat_launches(K):
    # fastmodels.ops.nextlat: hidden/weight/bias/pred in one of fp32/fp16/bf16, int64 indices.
    N, M, V = 100, 50, 1000
    for dt, D, has_bias in itertools.product(_DTYPES, (768, 60), (False, True)):
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
    for dt, D, binary, (kind, tape_dt) in itertools.product(_DTYPES, (64, 128), (False, True), tapes):
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
        for dt in _DTYPES:
            A = torch.zeros(b, m, n, dtype=dt)
            for transpose in (False, True):
                K.sketch_matmul(A, l, 7, transpose=transpose)
            for det in (True, False):
                K.power_pass(A, torch.zeros(b, m, l), deterministic=det)


_LAUNCHERS = {"efield": _efield_launches, "nextlat": _nextlat_launches,
              "pushdown": _pushdown_launches, "rsvd": _rsvd_launches}


# ----------------------------------------------------------------------------------------------
# Recording and compiling
# ----------------------------------------------------------------------------------------------


class _Recorder:
    """Stands in for ``kernel``: ``kernel[grid](*args, **kwargs)`` appends (name, args, kwargs)."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.name, args, kwargs))


def _kernels(module):
    """{name: Autotuner or JITFunction} of every ``*_kernel`` attribute of a kernel module."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    return {n: o for n, o in vars(module).items() if n.endswith("_kernel") and isinstance(o, (Autotuner, JITFunction))}


def _record(module, launcher):
    log = []
    saved = _kernels(module)
    try:
        for name in saved:
            setattr(module, name, _Recorder(name, log))
        with torch.no_grad():
            launcher(module)
    finally:
        for name, obj in saved.items():
            setattr(module, name, obj)
    return saved, log


_BACKEND = None


def _backend():
    global _BACKEND
    if _BACKEND is None:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        target = GPUTarget("cuda", 90, 32)
        _BACKEND = (target, make_backend(target))
    return _BACKEND


def _specialize(jit, args, kwargs):
    """(options, signature, constexprs, attrs) exactly as JITFunction.run derives them on a GPU."""
    from triton.runtime.jit import create_function_from_signature

    _, backend = _backend()
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    return jit._pack_args(backend, kwargs, bound, specialization, options)


def _label(jit, args, kwargs):
    """Short id of a launch variant: pointer dtypes, then the launcher's constexprs and 1-specialized ints."""
    _, sig, constexprs, _ = _specialize(jit, args, kwargs)
    ptrs = []
    for name, ty in sig.items():
        if ty.startswith("*") and ty[1:] not in ptrs:
            ptrs.append(ty[1:])
    parts = ["+".join(ptrs)]
    for (i,), val in sorted(constexprs.items()):
        name = jit.arg_names[i]
        if name in kwargs:
            parts.append(f"{name}={int(val) if isinstance(val, bool) else val}")
        elif name not in kwargs and isinstance(val, int):
            parts.append(f"{name}=1")  # an int argument equal to 1: Triton specializes it
    return "-".join(parts)


def _features(label):
    """The values a launch variant covers: each pointer dtype and each constexpr/specialized value."""
    head, *rest = label.split("-")
    return set(head.split("+")) | set(rest)


def _covering(variants):
    """Greedy subset of ``variants`` [(label, launch)] covering every feature value at least once."""
    todo = set().union(*(_features(label) for label, _ in variants))
    chosen = []
    while todo:
        best = max(variants, key=lambda v: len(_features(v[0]) & todo))  # first of the best on ties
        chosen.append(best)
        todo -= _features(best[0])
    return chosen


def _cases():
    """pytest params: one per (kernel, launch variant, config) compile, plus the kernel inventory."""
    if _SKIP is not None:
        return [], {}
    import importlib

    cases, inventory = [], {}
    for op, launcher in _LAUNCHERS.items():
        module = importlib.import_module(f"fastmodels.kernels.{op}")
        kernels, log = _record(module, launcher)
        inventory[op] = (sorted(kernels), sorted({name for name, _, _ in log}))
        for name, obj in kernels.items():
            tuned = hasattr(obj, "configs")  # an Autotuner wrapping a JITFunction
            jit = obj.fn if tuned else obj
            configs = list(obj.configs) if tuned else [None]
            variants = {}
            for kname, args, kwargs in log:
                if kname != name:
                    continue
                cfg_kw = configs[0].all_kwargs() if configs[0] is not None else {}
                label = _label(jit, args, {**kwargs, **cfg_kw})
                for key in cfg_kw:
                    label = re.sub(rf"-{key}=[^-]*", "", label)
                variants.setdefault(label, (args, kwargs))
            variants = list(variants.items())
            if not variants:
                continue
            if _FULL:
                pairs = list(itertools.product(range(len(variants)), range(len(configs))))
            else:
                # the covering variants first, then further ones while configs remain unpaired
                cover = _covering(variants)
                n = max(len(cover), len(configs))
                variants = (cover + [v for v in variants if v not in cover])[:n]
                pairs = [(i % len(variants), i % len(configs)) for i in range(n)]
                # and every config with the first recorded launch (bf16, the dtype the GPU benches run)
                pairs += [(0, ci) for ci in range(len(configs)) if (0, ci) not in pairs]
            for vi, ci in pairs:
                label, (args, kwargs) = variants[vi]
                cases.append(pytest.param(name, jit, args, kwargs, configs[ci], id=f"{name}-{label}-cfg{ci}"))
    return cases, inventory


_CASES, _INVENTORY = _cases()


@pytest.fixture(scope="session")
def _fresh_triton_cache(tmp_path_factory):
    """A private cache dir, so ptxas really runs (and reports registers) on every compile."""
    from triton import knobs

    old_dir, old_log = knobs.cache.dir, knobs.nvidia.dump_ptxas_log
    knobs.cache.dir = str(tmp_path_factory.mktemp("triton_cache"))
    knobs.nvidia.dump_ptxas_log = True
    yield
    knobs.cache.dir, knobs.nvidia.dump_ptxas_log = old_dir, old_log


@pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
@pytest.mark.parametrize("op", sorted(_LAUNCHERS))
def test_every_kernel_is_launched_by_a_recorded_launcher(op):
    kernels, launched = _INVENTORY[op]
    assert kernels, f"kernels/{op}.py defines no *_kernel"
    missing = sorted(set(kernels) - set(launched))
    assert not missing, f"kernels never launched by the recorded launcher calls (add a call above): {missing}"


def _compile(jit, args, kwargs):
    """triton.compile for sm_90 with what a GPU launch derives from (args, kwargs); returns
    (compiled kernel, ptxas log, seconds)."""
    import triton
    from triton.compiler import ASTSource

    target, _ = _backend()
    options, signature, constexprs, attrs = _specialize(jit, args, kwargs)
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    return compiled, log.getvalue(), time.perf_counter() - t0


@pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
@pytest.mark.parametrize(("name", "jit", "args", "kwargs", "config"), _CASES)
def test_compiles_for_sm90(name, jit, args, kwargs, config, _fresh_triton_cache, record_property, request):
    kw = dict(kwargs)
    if config is not None:
        kw.update(config.all_kwargs())  # what Autotuner.run merges into the launch
    compiled, ptxas, seconds = _compile(jit, args, kw)
    assert compiled.asm.get("cubin"), "no cubin produced"
    # sm_90 opt-in limit per block (227 KB): a config above it can never launch on an H100/H200
    assert compiled.metadata.shared <= 232448, f"needs {compiled.metadata.shared} B of shared memory (> 227 KB)"
    regs = re.search(r"Used (\d+) registers", ptxas)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)
    n_regs = int(regs.group(1)) if regs else None
    n_spills = (int(spills.group(1)), int(spills.group(2))) if spills else None
    record_property("n_regs", n_regs)
    record_property("spill_store_load_bytes", n_spills)
    record_property("shared_bytes", compiled.metadata.shared)
    cfg = "" if config is None else f" {{{config}}}"
    print(f"[sm_90] {request.node.callspec.id}{cfg}: {n_regs} registers, spill stores/loads "
          f"{n_spills} bytes, shared {compiled.metadata.shared} B, {seconds:.1f}s")


if _SKIP is None:
    import triton
    import triton.language as tl

    _SCALE = 3  # a plain module-level int: the interpreter reads it, the GPU compiler must refuse it

    @triton.jit
    def _reads_plain_global_kernel(x_ptr, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        tl.store(x_ptr + o, tl.load(x_ptr + o) * _SCALE)


@pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
def test_compile_check_catches_what_the_interpreter_accepts(_fresh_triton_cache):
    """The check is not vacuous: a kernel the interpreter runs fine fails to compile here."""
    from triton.compiler.errors import CompilationError

    with pytest.raises(CompilationError, match="_SCALE"):
        _compile(_reads_plain_global_kernel, (torch.zeros(16),), dict(BLOCK=16))

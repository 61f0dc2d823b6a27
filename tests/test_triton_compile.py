"""Every Triton kernel of ``kernels/*.py`` compiles for Hopper (sm_90), also on machines without a GPU.

The interpreter pass (TRITON_INTERPRET=1) runs the kernels but never compiles them, so it misses
what only the real compiler refuses (a module-level Python int read inside a @triton.jit function,
a dot with a block dim < 16, a shape mismatch in an untaken branch, ptxas errors, ...). This module
runs the whole GPU pipeline -- frontend, TTIR, TTGIR, LLVM, PTX and ptxas -- for target
``GPUTarget("cuda", 90, 32)``, with the exact arguments the GPU launchers pass:

1. Each host launcher (``attachment_fwd``/``_bwd``, ``efield_fwd``, ``lce_kl_fwd``/``lce_kl_bwd``, ``pushdown_attention_fwd``/
   ``_bwd``, ``sketch_omega``/``sketch_matmul``/``power_pass``) is called on small CPU tensors of
   every supported dtype and every flag combination, with each ``*_kernel`` of its module replaced
   by a recorder, so ``kernel[grid](*args, **kwargs)`` is captured instead of launched. No signature
   is written by hand: Triton's own argument binder (the one ``JITFunction.run`` uses) turns the
   captured arguments into the signature, constexprs and pointer-alignment attributes a real launch
   would compile with. Only the launcher calls (shapes, dtypes, flags; in fastmodels.bench.aot) are chosen by hand.
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

import itertools
import os
import re

import pytest
import torch

from fastmodels.bench import aot

_FULL = os.environ.get("FASTMODELS_AOT_FULL", "0") == "1"
_SKIP = aot.unavailable()


# The launcher calls, recording and compiling live in fastmodels.bench.aot (shared with the SASS tool).
_LAUNCHERS = aot.LAUNCHERS
_record, _label, _compile = aot.record, aot.label, aot.compile_launch


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
            jit, configs, heuristics = aot.unwrap(obj)  # Autotuner -> Heuristics -> JITFunction
            variants = {}
            for kname, args, kwargs in log:
                if kname != name:
                    continue
                cfg_kw = configs[0].all_kwargs() if configs[0] is not None else {}
                label = _label(jit, args, aot.launch_kwargs(jit, heuristics, args, kwargs, configs[0]))
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
            seen = set()
            for vi, ci in pairs:
                label, (args, kwargs) = variants[vi]
                kept = aot.pruned_configs(obj, jit, args, kwargs, configs)
                if configs[ci] not in kept:  # this launch never runs that config (prune_configs_by)
                    ci = configs.index(kept[0])
                if (vi, ci) in seen:
                    continue
                seen.add((vi, ci))
                cases.append(pytest.param(name, jit, heuristics, args, kwargs, configs[ci], id=f"{name}-{label}-cfg{ci}"))
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


@pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
@pytest.mark.parametrize("op", sorted(_LAUNCHERS))
def test_every_launch_asks_for_fp_fusion(op):
    """FMA contraction is on in every launch by request (kernels._host.LAUNCH_OPTIONS), not by
    Triton's default, which 3.10 turns off."""
    import importlib

    _, log = _record(importlib.import_module(f"fastmodels.kernels.{op}"), _LAUNCHERS[op])
    assert log
    missing = sorted({name for name, _, kwargs in log if kwargs.get("enable_fp_fusion") is not True})
    assert not missing, f"launches without enable_fp_fusion=True: {missing}"


@pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
@pytest.mark.parametrize(("name", "jit", "heuristics", "args", "kwargs", "config"), _CASES)
def test_compiles_for_sm90(name, jit, heuristics, args, kwargs, config, _fresh_triton_cache, record_property, request):
    # what Autotuner.run merges into the launch, then what @triton.heuristics adds
    kw = aot.launch_kwargs(jit, heuristics, args, kwargs, config)
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
        _compile(_reads_plain_global_kernel, (torch.zeros(16),), dict(BLOCK=16, enable_fp_fusion=True))


@pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
def test_pushdown_dkdv_prunes_large_tiles_for_fp32_tensor_core_dots():
    """fp32 inputs on tensor cores (tf32x3/tf32) drop the dk/dv pass's 64 x 128 tile, whose fp32
    shared-memory tiles exceed sm_90's 227 KB under triton 3.6; "ieee" dots and bf16/fp16 inputs
    keep the whole grid. (The compile cases above follow the same pruning.)"""
    import importlib

    K = importlib.import_module("fastmodels.kernels.pushdown")
    grid = K._DKDV_CONFIGS
    for prec in ("tf32x3", "tf32"):
        kept = K._prune_fp32_dkdv(grid, {}, FP32_DOT=True, PREC=prec)
        assert kept and kept == [c for c in grid if c.kwargs["BM"] * c.kwargs["BN"] <= 64 * 64]
    assert K._prune_fp32_dkdv(grid, {}, FP32_DOT=True, PREC="ieee") == grid
    assert K._prune_fp32_dkdv(grid, {}, FP32_DOT=False, PREC="tf32") == grid
    if len(grid) > 1:
        assert any(c.kwargs["BM"] * c.kwargs["BN"] > 64 * 64 for c in grid)  # something to prune

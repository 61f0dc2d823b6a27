"""Per-loop SASS instruction counts of a kernel compiled for Hopper (sm_90), without a GPU.

The GPU kernels of fastmodels are bound by instruction issue in their inner loops (electric_image,
the pushdown tiles), so the static instruction count of a loop body is the first thing to check
when a GPU is not at hand. This compiles a kernel, disassembles it with cuobjdump (shipped with
Triton's NVIDIA backend) and prints, for every innermost loop (a backward branch), its
instruction count per thread and the mix: fp32 arithmetic, MUFU (sqrt, rcp, ex2, ...), shared
memory, shuffles and tensor-core (HGMMA/HMMA) instructions.

    python -m fastmodels.bench.sass_loops cuda csrc/cuda/efield.cu
    python -m fastmodels.bench.sass_loops triton efield efield_fwd_kernel
    python -m fastmodels.bench.sass_loops triton pushdown pushdown_attention_fwd_kernel \\
        --match bf16+i32 --match COMPACT=1 --match BINARY=0 --match BD=64 --config 0

A triton kernel is compiled as its host launcher calls it (fastmodels.bench.aot records the calls
on small CPU tensors), for the first recorded launch whose variant label contains every --match
string, with autotune config --config. Counts are per loop *body*: divide by the unroll factor or
the elements a thread handles per iteration to get a per-item figure (docs/efield.md and
docs/pushdown.md quote such figures).
"""

from __future__ import annotations

import argparse
import collections
import importlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

FP32 = ("FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP")


def cuobjdump() -> str:
    """Path of cuobjdump: on PATH, else the one in Triton's NVIDIA backend."""
    from shutil import which

    found = which("cuobjdump")
    if found:
        return found
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError("cuobjdump not found (neither on PATH nor in triton/backends/nvidia/bin)")
    return str(path)


def sass(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        return subprocess.run([cuobjdump(), "-sass", str(path)], capture_output=True, text=True, check=True).stdout


def _opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def loops(listing: str) -> list[dict]:
    """Innermost-first list of loops (a branch to an earlier address) with their instruction mix."""
    ins = []
    for line in listing.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2).strip()))
    index = {addr: i for i, (addr, _) in enumerate(ins)}
    out = []
    for i, (addr, text) in enumerate(ins):
        m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        if not m or int(m.group(1), 16) >= addr or int(m.group(1), 16) not in index:
            continue
        start = int(m.group(1), 16)
        body = [_opcode(t) for _, t in ins[index[start] : i + 1]]
        base = collections.Counter(op.split(".")[0] for op in body)
        out.append({
            "range": f"{start:#06x}-{addr:#06x}",
            "instructions": len(body),
            "fp32": sum(base[o] for o in FP32),
            "mufu": dict(collections.Counter(op for op in body if op.startswith("MUFU"))),
            "shared": base["LDS"] + base["STS"],
            "shuffles": base["SHFL"],
            "tensor_core": base["HGMMA"] + base["HMMA"],
            "top": base.most_common(8),
        })
    return sorted(out, key=lambda r: r["instructions"])


def compile_cuda(source: str, arch: str = "sm_90") -> bytes:
    from fastmodels._cuda import csrc_dir
    from fastmodels._dispatch import nvcc_path

    nvcc = nvcc_path()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "k.cubin"
        cmd = [nvcc, "-O3", f"-arch={arch}", "-cubin", f"-I{csrc_dir() / 'include'}", "-o", str(out), source]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        return out.read_bytes()


def compile_triton(op: str, kernel: str, match: list[str], config: int) -> tuple[bytes, str]:
    from fastmodels.bench import aot

    reason = aot.unavailable()
    if reason:
        raise RuntimeError(reason)
    module = importlib.import_module(f"fastmodels.kernels.{op}")
    kernels, log = aot.record(module, aot.LAUNCHERS[op])
    jit, configs, heuristics = aot.unwrap(kernels[kernel])
    cfg = configs[config].all_kwargs() if configs[config] is not None else {}
    for name, args, kwargs in log:
        if name != kernel:
            continue
        kw = aot.launch_kwargs(jit, heuristics, args, kwargs, configs[config])
        label = aot.label(jit, args, kw)
        if all(m in label for m in match):
            compiled, ptxas, _ = aot.compile_launch(jit, args, kw)
            return compiled.asm["cubin"], f"{label} config {config}: {cfg} {' '.join(ptxas.split())[:200]}"
    raise SystemExit(f"no recorded launch of {kernel} matches {match}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True)
    c = sub.add_parser("cuda", help="a CUDA C++ source under csrc/cuda")
    c.add_argument("source")
    c.add_argument("--arch", default="sm_90")
    t = sub.add_parser("triton", help="a Triton kernel of fastmodels.kernels.<op>")
    t.add_argument("op", choices=["attachment", "efield", "nextlat", "pushdown", "rsvd"])
    t.add_argument("kernel")
    t.add_argument("--match", action="append", default=[], help="substring of the launch variant label (repeatable)")
    t.add_argument("--config", type=int, default=0, help="index of the autotune config")
    args = p.parse_args(argv)
    if args.kind == "cuda":
        cubin, what = compile_cuda(args.source, args.arch), f"{args.source} ({args.arch})"
    else:
        cubin, what = compile_triton(args.op, args.kernel, args.match, args.config)
    print(what)
    for loop in loops(sass(cubin)):
        print(f"loop {loop['range']}: {loop['instructions']:5d} instr | fp32 {loop['fp32']:4d} | MUFU {loop['mufu']} | "
              f"shared {loop['shared']} | shfl {loop['shuffles']} | tensor core {loop['tensor_core']} | top {loop['top']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

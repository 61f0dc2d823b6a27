"""Probe of the pushdown Triton backward's wrong dq / dE on a GPU (README, Known issue).

On an H200 (triton 3.6, commit d5741f9) the dq pass returned 4-9% RMS error in dq and 15% in dE
for every 50-row depth table, while tables of 2-5 rows, binary tapes, the forward, dk and dv were
right, and the interpreter was right at the GPU's tile sizes. Each case below changes one thing
and reports the RMS-relative error of every output against a float64 reference, so one GPU run
says where to look:

* ``V`` 5 / 16 / 17 / 32 / 50: which padded table width (VP 16, 32, 64) first fails;
* ``V=50, rows 5.. = row 4``: the same math as ``V=5`` through the VP = 64 build (fails: the
  build is at fault; passes: the depth values are);
* ``V=50, E = 0``: no depth term in the scores and Hist @ E = 0, so dq = dS k alone (fails: the
  dS k part; passes: the histogram or the final Hist @ E / Hist^T q dots);
* each in bf16 and fp32, with the row-uniform path on (default) and off.

    python -m fastmodels.bench.pushdown_dq_probe [--device cuda] [--T 512]

Writes one JSON line per case (kind "pushdown_dq_probe") to profile.jsonl in the results folder
and prints a table. On the CPU (TRITON_INTERPRET=1, small T) every error is at rounding level,
which tests/test_pushdown_kernels.py checks.
"""

from __future__ import annotations

import argparse
import json
import os
import random

import torch

from fastmodels.bench.bench_pushdown import _random_tree  # the benchmark's deep random trees
from fastmodels.bench.harness import RESULTS_DIR, environment
from fastmodels.pushdown import StackTape


def _reference_grads(q, k, v, E, S, scale, do):
    """(out, dq, dk, dv, dE) in float64 from the gather form, E [H, V, D]."""
    from fastmodels.ops.pushdown import pushdown_attention_reference

    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v, E)]
    out = pushdown_attention_reference(*leaves, S, scale=scale)
    return (out.detach(), *torch.autograd.grad(out, leaves, do.double()))


def probe(device: str = "cuda", T: int = 512, D: int = 64, B: int = 2, H: int = 2) -> list[dict]:
    from fastmodels.kernels import pushdown as K

    rng = random.Random(0)
    tape = StackTape.from_trees([_random_tree(rng, T) for _ in range(B)])
    depth, boundary, S = tape.depth.to(device), tape.boundary.to(device), tape.dense().to(device)
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(B, H, T, D, generator=g) for _ in range(4)]  # q, k, v, dO
    table = torch.randn(50, D, generator=g)
    cases = [(f"V={V}", V, table[:V]) for V in (5, 16, 17, 32, 50)]
    same_as_5 = table[:50].clone()
    same_as_5[5:] = table[4]
    cases += [("V=50, rows 5.. = row 4 (the V=5 math)", 50, same_as_5), ("V=50, E = 0", 50, torch.zeros(50, D))]
    rows = []
    saved = os.environ.get("FASTMODELS_PUSHDOWN_UNIFORM")
    try:
        for dtype in (torch.bfloat16, torch.float32):
            q, k, v, do = (t.to(device=device, dtype=dtype) for t in base)
            for uniform in ("1", "0"):
                os.environ["FASTMODELS_PUSHDOWN_UNIFORM"] = uniform
                for name, V, Ev in cases:
                    E = Ev.to(device)[None].expand(H, V, D)  # shared table, fp32 (as the op passes it)
                    scale = D**-0.5
                    out, lse = K.pushdown_attention_fwd(q, k, v, E, depth, boundary, None, scale, False)
                    dq, dk, dv, dE = K.pushdown_attention_bwd(do, q, k, v, E, depth, boundary, None, out, lse, scale, False)
                    ref = _reference_grads(q, k, v, E, S, scale, do)
                    got = (out, dq, dk, dv, dE)
                    err = {}
                    for key, a, r in zip(("out", "dq", "dk", "dv", "dE"), got, ref):
                        n = r.norm().item()
                        err[key] = (a.double() - r).norm().item() / n if n > 0 else (a.double() - r).norm().item()
                    rows.append({"kind": "pushdown_dq_probe", "case": name, "dtype": str(dtype).replace("torch.", ""),
                                 "uniform": uniform, "T": T, "D": D, "errors": err, **environment(device)})
    finally:
        if saved is None:
            os.environ.pop("FASTMODELS_PUSHDOWN_UNIFORM", None)
        else:
            os.environ["FASTMODELS_PUSHDOWN_UNIFORM"] = saved
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--T", type=int, default=512)
    args = ap.parse_args(argv)
    rows = probe(args.device, args.T)
    print(f"### pushdown dq probe, T={args.T} D=64 B=2 H=2 (RMS-relative error against float64)")
    for r in rows:
        e = r["errors"]
        print(f"  {r['dtype']:8s} uniform={r['uniform']}  {r['case']:40s} " + "  ".join(f"{k} {v:.1e}" for k, v in e.items()))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with open(RESULTS_DIR / "profile.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()

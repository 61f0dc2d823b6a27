"""bench/sass_loops.py: per-loop SASS counts, on a synthetic listing and on the efield CUDA kernel."""

import pytest

from fastmodels._cuda import csrc_dir
from fastmodels._dispatch import nvcc_path
from fastmodels.bench import sass_loops

_LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   FFMA R2, R3, R4, R5 ;
        /*0020*/                   MUFU.RCP R6, R2 ;
        /*0030*/               @P0 FADD R7, R6, R2 ;
        /*0040*/                   LDS.128 R8, [R9] ;
        /*0050*/              @!P1 BRA 0x10 ;
        /*0060*/                   EXIT ;
"""


def test_loops_parses_a_listing():
    (loop,) = sass_loops.loops(_LISTING)
    assert loop["range"] == "0x0010-0x0050"
    assert loop["instructions"] == 5
    assert loop["fp32"] == 2 and loop["mufu"] == {"MUFU.RCP": 1} and loop["shared"] == 1


@pytest.mark.skipif(nvcc_path() is None, reason="nvcc not found")
def test_efield_cuda_dipole_loop_keeps_its_instruction_diet():
    """The unrolled source loops of csrc/cuda/efield.cu: one MUFU.SQRT and one MUFU.RCP per source
    and at most 28 instructions per source, the dipoles included (22 now; IEEE sqrtf/division or rsqrtf without ftz,
    cost 31.8-50.5 in earlier revisions)."""
    try:
        listing = sass_loops.sass(sass_loops.compile_cuda(str(csrc_dir() / "cuda" / "efield.cu")))
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    found = [lp for lp in sass_loops.loops(listing)
             if lp["mufu"].get("MUFU.SQRT") == lp["mufu"].get("MUFU.RCP") == 4 and lp["tensor_core"] == 0]
    assert found, "no loop with 4 sqrt and 4 reciprocals (the dipole loop unrolled 4x)"
    assert max(lp["instructions"] for lp in found) / 4 <= 28  # the pole loops (15 per pole) as well

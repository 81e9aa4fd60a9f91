"""The Triton kernels compile for an H100 / H200 (sm_90) on a host without a GPU.

The interpreter runs kernels as Python, so it misses what only the compiler rejects (types of loop-carried
values, constexpr use, scalar / block mixing). This compiles the launch shapes the library uses ahead of
time (``triton.compile`` with a ``GPUTarget``; needs no driver) in a subprocess without
``TRITON_INTERPRET``, and checks ptxas reports no register spills. On a CUDA host the other tests compile
the kernels for real, so it is skipped there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent(
    """
    import os, subprocess, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from hf_vlm_gptq.ops import triton_gptq as TG, triton_matmul as TM

    target = GPUTarget("cuda", 90, 32)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")

    def build(fn, sig, consts, opts):
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target, options=opts)
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(kernel.asm["ptx"])
        log = subprocess.run([ptxas, "--gpu-name", "sm_90a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
        assert " 0 bytes spill stores" in log, (consts, log)

    mm = dict(x_ptr="*bf16", qw_ptr="*i32", qz_ptr="*i32", s_ptr="*fp16", g_ptr="*i32", out_ptr="*fp32",
              M="i32", N="i32", K="i32", NZ="i32", k_steps="i32", group="i32", BITS="constexpr",
              SCALAR_GROUP="constexpr", BM="constexpr", BN="constexpr", BK="constexpr")
    for bits in TM.TRITON_BITS:
        for _, bm, bn, bk, warps, stages in TM._TILES:
            for scalar in (True, False):
                consts = dict(BITS=bits, SCALAR_GROUP=scalar, BM=bm, BN=bn, BK=bk)
                build(TM._packed_mm_kernel, mm, consts, dict(num_warps=warps, num_stages=stages))
    sweep = dict(wt_ptr="*fp32", u_ptr="*fp32", codes_ptr="*u8", err_ptr="*fp32", scale_in_ptr="*fp32",
                 zero_in_ptr="*fp32", scales_ptr="*fp32", zeros_ptr="*fp32", i1="i32", nb="i32", n="i32",
                 out_f="i32", group_size="i32", BITS="constexpr", SYM="constexpr", PARAMS_GIVEN="constexpr",
                 BB="constexpr", BR="constexpr")
    for bb, br in ((32, 32), (128, 16), (256, 16)):
        for sym, given in ((True, False), (False, False), (False, True)):
            consts = dict(BITS=4, SYM=sym, PARAMS_GIVEN=given, BB=bb, BR=br)
            build(TG._gptq_block_kernel, sweep, consts, dict(num_warps=4))
    print("compiled")
    """
)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA host: the kernels compile in the other tests")
def test_kernels_compile_for_sm90_without_spills():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]

"""A fused low-bit GEMM for CPUs with AVX512-BF16, compiled on first use (``csrc/lowbit_gemm_avx512bf16.c``).

The kernel dequantizes the weight exactly as the reference does (integer code - zero, one float32 multiply,
one rounding to bfloat16) into an L1-sized buffer chunk by chunk and runs a register-blocked ``vdpbf16ps``
GEMM on it, so it reads low-bit weights and computes at the dense bf16 rate. 2, 4 and 8 bits take that
path; 4 bits also have 1-4 row paths (no dequantized weight at all: codes become the bf16 numbers
``128 + q`` and the scale is applied per group). ``backends/fused.py`` serves the packed modules with it;
README (Performance) and ``bench/results/ops_cpu.md`` have its speed.

It reads the checkpoint buffers as they are (``qweight``, fp16 ``scales``, ``g_idx``); the only derived
data is the zero points as uint8 ``[n_groups, out]``. Act-order (any ``g_idx``) is handled in the kernel.

It is built, cached and loaded by ``kernel_cache.py`` (checked cache entries, rebuilt when damaged).

Before the first layer uses it, the kernel is checked once per process against dequantize + matmul on small
probe layers (each of its paths: 1-4 row and GEMM, 2/4/8 bits, act-order, one and several threads; through
``selfcheck.self_check``); a kernel that disagrees is logged and not used in this process. Without
Linux on x86-64 with AVX512F/BW/VL/VBMI/BF16, a compiler or OpenMP, or with ``HF_VLM_GPTQ_CPU_KERNEL=0``, the
kernel is unavailable and :func:`kernel_unavailable_reason` says why; callers then use the other paths.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import torch

from . import kernel_cache
from .cpu_kernel import KERNEL_BITS, FusedWeights, kernel_probes, kernel_threads, run_kernel
from .selfcheck import self_check

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "lowbit_gemm_avx512bf16.c"
HEADERS = (SOURCE.with_name("lowbit_dequant.h"),)  # the exact dequantization, shared with cpu_amx.py
FUSED_BITS = KERNEL_BITS
CFLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vbmi", "-mavx512bf16", "-mfma", "-mf16c",
          "-fopenmp", "-shared", "-fPIC")
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512vbmi", "avx512_bf16")
SYMBOL = "hvg_lowbit_gemm_bf16"
WHAT = "fused CPU low-bit kernel"

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
ARGTYPES = (_P, _I64, _I64, _P, _P, _P, _P, _I64, _P, _P, _INT, _I64, _INT)

# what the bf16 kernels' return codes mean (0: success)
KERNEL_ERRORS = {1: "bad arguments", 2: "a work buffer could not be allocated",
                 3: "the operating system refused this process the AMX tile state (Linux 5.16 or later has it)"}

# "lib" -> the ctypes function, or "reason" -> why there is none; "ready" once the self-check has run
_state: dict = {}


def kernel_source() -> kernel_cache.KernelSource:
    """This module's kernel, read from the module constants at call time (the tests build it with -O0)."""
    return kernel_cache.KernelSource(SOURCE, tuple(CFLAGS), SYMBOL, ARGTYPES, tuple(REQUIRED_CPU_FLAGS), WHAT,
                                     headers=HEADERS)


def _load() -> None:
    kernel_cache.load_kernel(kernel_source(), _state)


def _self_check(fn) -> str | None:
    """Run the kernel on the probe layers against dequantize + matmul; None when it agrees, else why (logged)."""
    return self_check("fused CPU kernel", kernel_probes(lambda x, w, bias: call_bf16_kernel(fn, x, w, bias)),
                      "not used in this process", logger)


def _kernel():
    return kernel_cache.checked_kernel(_state, _load, lambda fn: _self_check(fn))


def kernel_unavailable_reason() -> str | None:
    """Why the fused kernel cannot run in this process (None when it can): looked for, built and
    self-checked on the first call."""
    return None if _kernel() is not None else _state["reason"]


def _run(x2: torch.Tensor, w: FusedWeights, bias: torch.Tensor | None) -> torch.Tensor:
    return run_kernel(_kernel, _state, call_bf16_kernel, "fused CPU kernel", x2, w, bias)


def fused_matmul(x2: torch.Tensor, w: FusedWeights, bias: torch.Tensor | None) -> torch.Tensor:
    """``x2[M, in] @ W^T (+ bias)`` in bfloat16 through the fused kernel (see :func:`kernel_unavailable_reason`).

    Under ``torch.compile`` it is the custom op ``hf_vlm_gptq::fused_matmul`` (traced once through its fake
    implementation, whatever the rows); eager calls go to the kernel directly. Forward only: the packed
    modules' op ``hf_vlm_gptq::packed_linear`` (``qbase.py``) gives the gradients."""
    if torch.compiler.is_compiling():
        return fused_matmul_op(x2, bias, *w.op_fields())
    return _run(x2, w, bias)


@torch.library.custom_op("hf_vlm_gptq::fused_matmul", mutates_args=())
def fused_matmul_op(x2: torch.Tensor, bias: torch.Tensor | None, qweight: torch.Tensor, scales: torch.Tensor,
                    zeros: torch.Tensor, g_idx: torch.Tensor, regular_group: int, bits: int) -> torch.Tensor:
    """The fused kernel as a torch op (the :class:`FusedWeights` fields as arguments)."""
    return _run(x2, FusedWeights(qweight, scales, zeros, g_idx, regular_group, bits), bias)


@fused_matmul_op.register_fake
def _fused_matmul_fake(x2, bias, qweight, scales, zeros, g_idx, regular_group, bits):
    return x2.new_empty(x2.shape[0], zeros.shape[1], dtype=torch.bfloat16)


def call_bf16_kernel(fn, x2: torch.Tensor, w: FusedWeights, bias: torch.Tensor | None,
                     what: str = "fused CPU kernel", *more_args, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x2 @ W^T (+ bias)`` through a loaded kernel ``fn`` of this module's C signature (``ARGTYPES``; the AMX
    kernel of ``cpu_amx.py`` has it too, then ``more_args``): inputs checked, output allocated (or ``out``, a
    contiguous bf16 ``[rows, out_features]``), the kernel's error code raised."""
    if x2.dtype != torch.bfloat16 or x2.dim() != 2 or x2.shape[1] != w.in_features or x2.device.type != "cpu":
        raise ValueError(f"x must be bfloat16 [rows, {w.in_features}] on the CPU, got {x2.dtype} {tuple(x2.shape)}")
    x2 = x2.contiguous()
    m, n = x2.shape[0], w.out_features
    if bias is not None:
        bias = bias.to(torch.bfloat16).contiguous()
    if out is not None and (out.dtype != torch.bfloat16 or tuple(out.shape) != (m, n) or not out.is_contiguous()):
        raise ValueError(f"out must be contiguous bfloat16 {(m, n)}, got {out.dtype} {tuple(out.shape)}")
    y = torch.empty(m, n, dtype=torch.bfloat16) if out is None else out
    if m == 0:
        return y
    threads = kernel_threads(m, w)
    rc = fn(
        x2.data_ptr(), m, w.in_features, w.qweight.data_ptr(), w.scales.data_ptr(), w.zeros.data_ptr(),
        w.g_idx.data_ptr(), n, None if bias is None else bias.data_ptr(), y.data_ptr(), threads, w.regular_group,
        w.bits, *more_args,
    )
    if rc != 0:
        raise RuntimeError(f"{what} failed (code {rc}: {KERNEL_ERRORS.get(rc, 'unknown')}) for x "
                           f"{tuple(x2.shape)}, out_features {n}")
    return y

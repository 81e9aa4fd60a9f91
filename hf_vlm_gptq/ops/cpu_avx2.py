"""A fused low-bit GEMM for x86-64 CPUs with AVX2 + FMA + F16C (no AVX512), compiled on first use
(``csrc/lowbit_gemm_avx2.c``).

The kernel dequantizes the weight exactly as the float32 reference does (integer code - zero, one float32
multiply) into an L1-sized float32 buffer chunk by chunk and runs a register-blocked FMA GEMM on it, on
bfloat16 or float32 activations converted to float32 (bfloat16 outputs are rounded once, at the end). It
reads the checkpoint buffers as they are (through :class:`~.cpu_kernel.FusedWeights`: ``qweight``, fp16
``scales``, uint8 zero points, ``g_idx``); 2, 4 and 8 bits and act-order ``g_idx`` are served.
``backends/avx2.py`` serves the packed modules with it; ``bench/results/cpu_avx2_cpu.md`` has its speed.

Building, caching, loading and the switch ``HF_VLM_GPTQ_CPU_KERNEL=0`` are those of the AVX512 kernel
(``kernel_cache.py``: the same cache folder and checks, its own entry). Before the first layer uses
it, the kernel is checked once per process against dequantize + matmul on the probe layers of
``cpu_kernel`` plus a layer whose output width is not a multiple of 16, in bfloat16 and float32; a kernel
that disagrees is logged and not used in this process, and :func:`kernel_unavailable_reason` says why.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import torch

from . import kernel_cache
from .cpu_kernel import KERNEL_BITS, FusedWeights, kernel_probes, kernel_threads, run_kernel
from .cpu_kernel import PROBES as _SHARED_PROBES
from .selfcheck import self_check

logger = logging.getLogger(__name__)

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
KERNEL = kernel_cache.KernelSource(
    source=Path(__file__).with_name("csrc") / "lowbit_gemm_avx2.c",
    cflags=("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"),
    symbol="hvg_lowbit_gemm_avx2",
    argtypes=(_P, _INT, _I64, _I64, _P, _P, _P, _P, _I64, _P, _P, _INT, _INT),
    required_cpu_flags=("avx2", "fma", "f16c"),
    what="AVX2 low-bit CPU kernel",
)
AVX2_BITS = KERNEL_BITS
DTYPES = (torch.bfloat16, torch.float32)
# the shared probes, plus output widths with a half panel (40 = 16 + 16 + 8) and padded input widths
PROBES = (*_SHARED_PROBES, (4, 100, 40, 32, False, (1, 7)), (4, 100, 40, 32, True, (13,)))

# "lib" -> the ctypes function, or "reason" -> why there is none; "ready" once the self-check has run
_state: dict = {}


def _load() -> None:
    kernel_cache.load_kernel(KERNEL, _state)


def _self_check(fn) -> str | None:
    probes = kernel_probes(lambda x, w, bias: _call(fn, x, w, bias), DTYPES, PROBES)
    return self_check("AVX2 low-bit CPU kernel", probes, "not used in this process", logger)


def _kernel():
    return kernel_cache.checked_kernel(_state, _load, _self_check)


def kernel_unavailable_reason() -> str | None:
    """Why the AVX2 kernel cannot run in this process (None when it can): looked for, built and
    self-checked on the first call."""
    return None if _kernel() is not None else _state["reason"]


def _run(x2: torch.Tensor, w: FusedWeights, bias: torch.Tensor | None) -> torch.Tensor:
    return run_kernel(_kernel, _state, _call, "AVX2 CPU kernel", x2, w, bias)


def avx2_matmul(x2: torch.Tensor, w: FusedWeights, bias: torch.Tensor | None) -> torch.Tensor:
    """``x2[M, in] @ W^T (+ bias)`` through the AVX2 kernel, in ``x2``'s dtype (bfloat16 or float32).

    Under ``torch.compile`` it is the custom op ``hf_vlm_gptq::fused_matmul_avx2`` (traced once through its
    fake implementation); eager calls go to the kernel directly. Forward only (like ``cpu_fused``)."""
    if torch.compiler.is_compiling():
        return avx2_matmul_op(x2, bias, *w.op_fields())
    return _run(x2, w, bias)


@torch.library.custom_op("hf_vlm_gptq::fused_matmul_avx2", mutates_args=())
def avx2_matmul_op(x2: torch.Tensor, bias: torch.Tensor | None, qweight: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor, g_idx: torch.Tensor, regular_group: int, bits: int) -> torch.Tensor:
    """The AVX2 kernel as a torch op (the :class:`FusedWeights` fields as arguments)."""
    return _run(x2, FusedWeights(qweight, scales, zeros, g_idx, regular_group, bits), bias)


@avx2_matmul_op.register_fake
def _avx2_matmul_fake(x2, bias, qweight, scales, zeros, g_idx, regular_group, bits):
    return x2.new_empty(x2.shape[0], zeros.shape[1])


def _call(fn, x2: torch.Tensor, w: FusedWeights, bias: torch.Tensor | None) -> torch.Tensor:
    if x2.dtype not in DTYPES or x2.dim() != 2 or x2.shape[1] != w.in_features or x2.device.type != "cpu":
        raise ValueError(f"x must be bfloat16 or float32 [rows, {w.in_features}] on the CPU, "
                         f"got {x2.dtype} {tuple(x2.shape)}")
    if w.out_features % 8 or w.bits not in AVX2_BITS:
        raise ValueError(f"the AVX2 kernel needs out_features % 8 == 0 and bits in {AVX2_BITS}")
    x2 = x2.contiguous()
    m, n = x2.shape[0], w.out_features
    if bias is not None:
        bias = bias.to(x2.dtype).contiguous()
    y = torch.empty(m, n, dtype=x2.dtype)
    if m == 0:
        return y
    threads = kernel_threads(m, w)
    rc = fn(
        x2.data_ptr(), int(x2.dtype == torch.float32), m, w.in_features, w.qweight.data_ptr(), w.scales.data_ptr(),
        w.zeros.data_ptr(), w.g_idx.data_ptr(), n, None if bias is None else bias.data_ptr(), y.data_ptr(), threads,
        w.bits,
    )
    if rc != 0:
        raise RuntimeError(f"AVX2 CPU kernel failed (code {rc}) for x {tuple(x2.shape)}, out_features {n}")
    return y

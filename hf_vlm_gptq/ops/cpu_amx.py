"""A low-bit GEMM on AMX tiles (Intel Sapphire Rapids and later), compiled on first use (``csrc/lowbit_gemm_amx.c``).

On CPUs with AMX, torch's dense bf16 matmul runs AMX tiles (oneDNN), several times faster than the
``vdpbf16ps`` GEMM of ``cpu_fused.py`` from a few rows on. This kernel dequantizes the weight exactly as the
reference does (``csrc/lowbit_dequant.h``, shared with that kernel: the reference's bf16 weights, bit for bit)
into the layout of AMX's second operand, up to 512 output columns and 256 input columns at a time (the
words ahead prefetched; once per 512 rows), and multiplies
every row block of x (copied once into zero-padded 16 x 32 tiles) against it with ``tdpbf16ps``: exact bf16
products summed in float32, as in a dense bf16 matmul. It reads the checkpoint buffers as they are
(:class:`~.cpu_kernel.FusedWeights`), for 2, 4 and 8 bits, act-order, any row count and any even input width.
Up to :data:`SMALL_BATCH_ROWS` rows (48 at 4 bits, 32 at 8), layers whose groups are consecutive columns (a
multiple of 32, or one group) skip the dequantization, which is most of the work there: the codes become
exact bf16 numbers (``128 + q`` at 4 bits, ``q`` at 8) and the scale and zero point are applied once per group
in float32, as the fused kernel's 1-4 row paths do (the weights are then not rounded to bf16 on the way).
Its work buffers (the tile copy of x, the dequantized panel, the float32 sums) are kept per thread from one
call to the next (``csrc/thread_scratch.h``; a tile copy above 32 MB is freed after its call): fresh ones
faulted in every page on every call, which for a 4096 x 1280 input cost about as much as the product.
``backends/amx.py`` serves the packed modules with it; README (Performance) has its speed.

Building, caching and the switch ``HF_VLM_GPTQ_CPU_KERNEL=0`` are those of the other CPU kernels
(``kernel_cache.py``). The kernel asks Linux once per process for the AMX tile state (``arch_prctl``; an
operating system that refuses it makes every call fail with code 3, so the self-check fails and says so). Before the first layer
uses it, it is checked once per process against dequantize + matmul on the probe layers of ``cpu_kernel`` plus
layers with ragged edges (input width not a multiple of 32, a half panel, rows past two tiles); a kernel that
disagrees is logged and not used in this process. Without Linux on x86-64 with AMX-TILE / AMX-BF16 and
AVX512-BF16, or a compiler that builds AMX code, :func:`kernel_unavailable_reason` says why.
"""

from __future__ import annotations

import ctypes
import logging

import torch

from . import cpu_fused, kernel_cache
from .cpu_fused import call_bf16_kernel
from .cpu_kernel import KERNEL_BITS, FusedWeights, balanced_chunk, check_x_order, kernel_probes, run_kernel
from .cpu_kernel import PROBES as _SHARED_PROBES
from .selfcheck import self_check

logger = logging.getLogger(__name__)

SOURCE = cpu_fused.SOURCE.with_name("lowbit_gemm_amx.c")
# up to this many rows (per bit width), layers of consecutive groups take the kernel's code path
SMALL_BATCH_ROWS = {4: 48, 8: 32}
KERNEL = kernel_cache.KernelSource(
    source=SOURCE,
    cflags=(*cpu_fused.CFLAGS, "-mamx-tile", "-mamx-bf16", f"-DSMALL_ROWS={SMALL_BATCH_ROWS[4]}",
            f"-DSMALL_ROWS8={SMALL_BATCH_ROWS[8]}"),
    symbol="hvg_lowbit_gemm_amx",
    argtypes=(*cpu_fused.ARGTYPES, ctypes.c_void_p),  # then x_order (NULL: x's own column order)
    required_cpu_flags=(*cpu_fused.REQUIRED_CPU_FLAGS, "amx_tile", "amx_bf16"),
    what="AMX low-bit CPU kernel",
    headers=(*cpu_fused.HEADERS, SOURCE.with_name("amx_tiles.h"), SOURCE.with_name("thread_scratch.h")),
)
AMX_BITS = KERNEL_BITS
# rows per kernel call: the kernel copies x into tiles (rows x in_features x 2 bytes), so longer inputs go in
# balanced chunks of more than half this (each row's result is the same either way: rows are independent)
ROWS_PER_CALL = 4096
# the most bytes of that tile copy the kernel keeps for the next call (SCRATCH_KEEP_BYTES in
# csrc/thread_scratch.h): wide inputs go in chunks whose copy fits, down to TASK_ROWS rows (the kernel
# dequantizes the weight once per TASK_ROWS rows, MC_MAX in the C source, so smaller chunks would cost more)
KEPT_TILE_COPY_BYTES = 32 << 20
TASK_ROWS = 512


def rows_per_call(in_features: int) -> int:
    """Rows of one kernel call for inputs of ``in_features`` columns (see :data:`KEPT_TILE_COPY_BYTES`)."""
    fitting = KEPT_TILE_COPY_BYTES // (2 * (-(-in_features // 32) * 32)) // 32 * 32
    return min(ROWS_PER_CALL, max(TASK_ROWS, fitting))
# the shared probes, plus: input widths not a multiple of 32, a panel of 80 columns (five tiles), 2 x 16 rows
# and beyond, 1176 inputs (a patch embedding's width)
PROBES = (*_SHARED_PROBES, (4, 100, 48, 32, True, (13, 40)), (2, 1176, 80, 128, False, (5, 70)),
          (8, 264, 272, 64, False, (33,)))

# "lib" -> the ctypes function, or "reason" -> why there is none; "ready" once the self-check has run
_state: dict = {}


def _call(fn, x2: torch.Tensor, w: FusedWeights, bias: torch.Tensor | None,
          x_order: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel on ``x2`` (its columns taken in ``x_order``, gathered while x is copied into tiles, when given;
    checked here: the kernel indexes memory with it)."""
    order = check_x_order(x_order, w.in_features)
    rows, limit = x2.shape[0], rows_per_call(w.in_features)
    if rows <= limit:
        return call_bf16_kernel(fn, x2, w, bias, KERNEL.what, order)
    chunk = balanced_chunk(rows, limit)
    x2 = x2.contiguous()
    y = torch.empty(rows, w.out_features, dtype=torch.bfloat16)
    for start in range(0, rows, chunk):
        call_bf16_kernel(fn, x2[start:start + chunk], w, bias, KERNEL.what, order, out=y[start:start + chunk])
    return y


def _load() -> None:
    kernel_cache.load_kernel(KERNEL, _state)


def _self_check(fn) -> str | None:
    probes = kernel_probes(lambda x, w, bias: _call(fn, x, w, bias), layers=PROBES)
    return self_check(KERNEL.what, probes, "not used in this process", logger)


def _kernel():
    return kernel_cache.checked_kernel(_state, _load, _self_check)


def kernel_unavailable_reason() -> str | None:
    """Why the AMX kernel cannot run in this process (None when it can): looked for, built and self-checked
    on the first call."""
    return None if _kernel() is not None else _state["reason"]


def _run(x2: torch.Tensor, w: FusedWeights, bias: torch.Tensor | None,
         x_order: torch.Tensor | None = None) -> torch.Tensor:
    return run_kernel(_kernel, _state, lambda fn, *args: _call(fn, *args, x_order), KERNEL.what, x2, w, bias)


def amx_matmul(x2: torch.Tensor, w: FusedWeights, bias: torch.Tensor | None,
               x_order: torch.Tensor | None = None) -> torch.Tensor:
    """``x2[:, x_order] @ W^T (+ bias)`` (``x_order`` None: ``x2`` as it is) in bfloat16 through the AMX kernel
    (see :func:`kernel_unavailable_reason`).

    Under ``torch.compile`` it is the custom op ``hf_vlm_gptq::fused_matmul_amx`` (traced once through its fake
    implementation); eager calls go to the kernel directly. Forward only (like ``cpu_fused``)."""
    if torch.compiler.is_compiling():
        return amx_matmul_op(x2, bias, *w.op_fields(), x_order)
    return _run(x2, w, bias, x_order)


@torch.library.custom_op("hf_vlm_gptq::fused_matmul_amx", mutates_args=())
def amx_matmul_op(x2: torch.Tensor, bias: torch.Tensor | None, qweight: torch.Tensor, scales: torch.Tensor,
                  zeros: torch.Tensor, g_idx: torch.Tensor, regular_group: int, bits: int,
                  x_order: torch.Tensor | None = None) -> torch.Tensor:
    """The AMX kernel as a torch op (the :class:`FusedWeights` fields, then the column order of x)."""
    return _run(x2, FusedWeights(qweight, scales, zeros, g_idx, regular_group, bits), bias, x_order)


@amx_matmul_op.register_fake
def _amx_matmul_fake(x2, bias, qweight, scales, zeros, g_idx, regular_group, bits, x_order=None):
    return x2.new_empty(x2.shape[0], zeros.shape[1], dtype=torch.bfloat16)

"""The FMA kernel: a fused low-bit GEMM for x86-64 CPUs with FMA + F16C and AVX2 or AVX-512, the CPU kernel
where there is no AVX512-BF16. Compiled on first use (``csrc/lowbit_gemm_fma.c``: one source, an AVX2 and an
AVX-512 build; where the CPU runs both, the faster on a probe serves). Its backend is named ``avx2`` (as
``kernel="avx2"`` has been since it had only the AVX2 build) and runs whichever build serves.

The kernel dequantizes the weight exactly as the float32 reference does (integer code - zero, one float32
multiply) into an L1-sized float32 buffer chunk by chunk and runs a register-blocked FMA GEMM on it, on
bfloat16 or float32 activations converted to float32 (bfloat16 outputs are rounded once, at the end). Up to
a few rows (:data:`SMALL_ROWS`), layers whose groups are consecutive inputs take a path without the buffer:
per-group sums of ``x * (code - zero)`` straight from the packed words, scaled once per group. It reads the
checkpoint buffers as they are (through :class:`~.cpu_kernel.FusedWeights`: ``qweight``, fp16 ``scales``,
uint8 zero points, ``g_idx``); 2, 4 and 8 bits and act-order ``g_idx`` are served. ``backends/avx2.py``
serves the packed modules with it; ``bench/results/cpu_avx2_cpu.md`` and ``ops_avx512_cpu.md`` have its speed.

Building, caching, loading and the switch ``HF_VLM_GPTQ_CPU_KERNEL=0`` are those of the AVX512 kernel
(``kernel_cache.py``: the same cache folder and checks, an entry per build). Before the first layer uses
it, the kernel is checked once per process against dequantize + matmul on the probe layers of
``cpu_kernel`` plus layers with a half vector of outputs, groups that end inside a packed word and partial
last words, in bfloat16 and float32; a kernel that disagrees is logged and not used in this process, and
:func:`kernel_unavailable_reason` says why.
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import kernel_cache
from .cpu_kernel import (
    KERNEL_BITS,
    FusedWeights,
    balanced_chunk,
    check_x_order,
    kernel_probes,
    kernel_threads,
    run_kernel,
    sorted_by_group,
)
from .cpu_kernel import PROBES as _SHARED_PROBES
from .selfcheck import self_check

logger = logging.getLogger(__name__)

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
# the small-batch path: passes of at most this many rows per build (what its registers hold), up to
# SMALL_PASSES of them; passed to the build
SMALL_ROWS_PER_PASS = {"lowbit_gemm_fma_avx2": 4, "lowbit_gemm_fma_avx512": 8}
SMALL_PASSES = 2
SMALL_ROWS = {name: SMALL_PASSES * rows for name, rows in SMALL_ROWS_PER_PASS.items()}  # the most rows it serves
_CFLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", f"-DSMALL_PASSES={SMALL_PASSES}")
KERNEL = kernel_cache.KernelSource(
    source=Path(__file__).with_name("csrc") / "lowbit_gemm_fma.c",
    cflags=(*_CFLAGS, f"-DSMALL_ROWS={SMALL_ROWS_PER_PASS['lowbit_gemm_fma_avx2']}"),
    symbol="hvg_lowbit_gemm_fma",
    argtypes=(_P, _INT, _I64, _I64, _P, _P, _P, _P, _I64, _P, _P, _INT, _INT, _I64, _P),
    required_cpu_flags=("avx2", "fma", "f16c"),
    what="FMA low-bit CPU kernel (AVX2 build)",
    name="lowbit_gemm_fma_avx2",
    headers=(Path(__file__).with_name("csrc") / "thread_scratch.h",),  # its work buffers, kept per thread
)
# the same source in 512-bit vectors and 32 registers; which build runs is measured at first use
# (:func:`fastest`): wide vectors lower the clock on some CPUs
KERNEL_AVX512 = dataclasses.replace(
    KERNEL, cflags=(*_CFLAGS, "-mavx512f", f"-DSMALL_ROWS={SMALL_ROWS_PER_PASS['lowbit_gemm_fma_avx512']}"),
    required_cpu_flags=("avx2", "fma", "f16c", "avx512f"), what="FMA low-bit CPU kernel (AVX-512 build)",
    name="lowbit_gemm_fma_avx512")
BUILDS = (KERNEL, KERNEL_AVX512)
AVX2_BITS = KERNEL_BITS
DTYPES = (torch.bfloat16, torch.float32)
# the shared probes, plus output widths with a half panel (40 = 16 + 16 + 8; 32 + 8 in the AVX-512 build),
# padded input widths, 2-bit groups of 8 (a group edge inside a packed word) and 8-bit groups on the small path
PROBES = (*_SHARED_PROBES, (4, 100, 40, 32, False, (1, 7)), (4, 100, 40, 32, True, (13,)),
          (2, 72, 56, 8, False, (1, 8, 9)), (8, 104, 24, 8, False, (3,)))
# rows per kernel call: the kernel converts x to float32 (rows x in_features x 4 bytes: 620 MB for 8k tokens into
# an 18944-wide layer in one call), so longer inputs go in balanced chunks of more than half this. The result per
# row is the same, and the weight is decoded about as often (once per row block of 240 rows either way)
ROWS_PER_CALL = 1920
# the most bytes of that float32 copy the kernel keeps for the next call (SCRATCH_KEEP_BYTES in
# csrc/thread_scratch.h; a fresh copy faults in every page): wider inputs go in chunks whose copy fits, in whole
# row blocks of TASK_ROWS (MC_MAX in the C source: the weight is decoded once per block either way)
KEPT_COPY_BYTES = 32 << 20
TASK_ROWS = 240


def rows_per_call(in_features: int) -> int:
    """Rows of one kernel call for inputs of ``in_features`` columns (see :data:`KEPT_COPY_BYTES`)."""
    fitting = KEPT_COPY_BYTES // (4 * in_features) // TASK_ROWS * TASK_ROWS
    return min(ROWS_PER_CALL, max(TASK_ROWS, fitting))
_FASTEST_PROBE = (1024, 1024, 128, (1, 64))  # in, out, group, rows: about a millisecond per call

# "lib" -> the ctypes function, or "reason" -> why there is none; "ready" once the self-check has run
_state: dict = {}


def fastest(fns: dict) -> str:
    """The name of the build (of ``{name: fn}``) with the least product of its times at 1 and 64 rows on a
    4-bit probe layer (best of 3 each, in turns)."""
    gen = torch.Generator().manual_seed(0)
    in_f, out_f, group, all_rows = _FASTEST_PROBE
    w = FusedWeights(torch.randint(-2**31, 2**31 - 1, (in_f // 8, out_f), generator=gen, dtype=torch.int32),
                     (torch.rand(in_f // group, out_f, generator=gen) / 50).half(),
                     torch.randint(0, 16, (in_f // group, out_f), generator=gen, dtype=torch.uint8),
                     torch.arange(in_f, dtype=torch.int32) // group, group, 4)
    best = {(name, rows): float("inf") for name in fns for rows in all_rows}
    xs = {rows: torch.randn(rows, in_f, generator=gen).bfloat16() for rows in all_rows}
    for _ in range(3):
        for (name, rows) in best:
            start = time.perf_counter()
            _call(fns[name], xs[rows], w, None)
            best[name, rows] = min(best[name, rows], time.perf_counter() - start)
    score = {name: math.prod(best[name, rows] for rows in all_rows) for name in fns}
    chosen = min(score, key=score.get)
    logger.info("FMA low-bit CPU kernel: the %s build (ms at %s rows: %s)", chosen, "/".join(map(str, all_rows)),
                ", ".join(f"{name} " + "/".join(f"{best[name, r] * 1e3:.3g}" for r in all_rows) for name in fns))
    return chosen


def _load() -> None:
    kernel_cache.load_fastest(BUILDS, _state, fastest)


def _call_sorted(fn, x2: torch.Tensor, w: FusedWeights, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel on an act-order layer's copy sorted by group, as the backend runs it (x's columns gathered)."""
    copy = sorted_by_group(w, int(torch.bincount(w.g_idx.long()).max()))
    return _call(fn, x2, copy.fused, bias, copy.input_order)


def _self_check(fn) -> str | None:
    probes = itertools.chain(
        kernel_probes(lambda x, w, bias: _call(fn, x, w, bias), DTYPES, PROBES),
        kernel_probes(lambda x, w, bias: _call_sorted(fn, x, w, bias), DTYPES, [p for p in PROBES if p[4]]))
    return self_check("FMA low-bit CPU kernel", probes, "not used in this process", logger)


def _kernel():
    return kernel_cache.checked_kernel(_state, _load, _self_check)


def kernel_unavailable_reason() -> str | None:
    """Why the FMA kernel cannot run in this process (None when it can): looked for, built and
    self-checked on the first call."""
    return None if _kernel() is not None else _state["reason"]


def build_in_use() -> str | None:
    """The name of the build that serves in this process (``KERNEL.entry_name`` or ``KERNEL_AVX512.entry_name``;
    None when the kernel is unavailable)."""
    return _state.get("build") if _kernel() is not None else None


def builds() -> dict[str, Callable]:
    """``{name: kernel}`` of every build this CPU runs that passes the self-check (benchmarks and tests compare
    them; a layer always goes through the one :func:`build_in_use` names)."""
    found = {}
    for build in BUILDS:
        state: dict = {}
        kernel_cache.load_kernel(build, state)
        if "lib" in state and _self_check(state["lib"]) is None:
            found[build.entry_name] = state["lib"]
    return found


def run_build(fn: Callable, x2: torch.Tensor, w: FusedWeights, bias: torch.Tensor | None = None,
              x_order: torch.Tensor | None = None) -> torch.Tensor:
    """``x2[:, x_order] @ W^T (+ bias)`` through one build's kernel (a value of :func:`builds`)."""
    return _call(fn, x2, w, bias, x_order)


def _run(x2: torch.Tensor, w: FusedWeights, bias: torch.Tensor | None,
         x_order: torch.Tensor | None = None) -> torch.Tensor:
    return run_kernel(_kernel, _state, lambda fn, *args: _call(fn, *args, x_order), "FMA CPU kernel", x2, w, bias)


def avx2_matmul(x2: torch.Tensor, w: FusedWeights, bias: torch.Tensor | None,
                x_order: torch.Tensor | None = None) -> torch.Tensor:
    """``x2[:, x_order] @ W^T (+ bias)`` (``x_order`` None: ``x2`` as it is) through the FMA kernel, in ``x2``'s
    dtype (bfloat16 or float32).

    Under ``torch.compile`` it is the custom op ``hf_vlm_gptq::fused_matmul_avx2`` (traced once through its
    fake implementation); eager calls go to the kernel directly. Forward only (like ``cpu_fused``)."""
    if torch.compiler.is_compiling():
        return avx2_matmul_op(x2, bias, *w.op_fields(), x_order)
    return _run(x2, w, bias, x_order)


@torch.library.custom_op("hf_vlm_gptq::fused_matmul_avx2", mutates_args=())
def avx2_matmul_op(x2: torch.Tensor, bias: torch.Tensor | None, qweight: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor, g_idx: torch.Tensor, regular_group: int, bits: int,
                   x_order: torch.Tensor | None = None) -> torch.Tensor:
    """The FMA kernel as a torch op (the :class:`FusedWeights` fields, then the column order of x)."""
    return _run(x2, FusedWeights(qweight, scales, zeros, g_idx, regular_group, bits), bias, x_order)


@avx2_matmul_op.register_fake
def _avx2_matmul_fake(x2, bias, qweight, scales, zeros, g_idx, regular_group, bits, x_order=None):
    return x2.new_empty(x2.shape[0], zeros.shape[1])


def _call(fn, x2: torch.Tensor, w: FusedWeights, bias: torch.Tensor | None,
          x_order: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel ``fn`` on ``x2`` (its columns taken in ``x_order`` when given), inputs checked."""
    if x2.dtype not in DTYPES or x2.dim() != 2 or x2.shape[1] != w.in_features or x2.device.type != "cpu":
        raise ValueError(f"x must be bfloat16 or float32 [rows, {w.in_features}] on the CPU, "
                         f"got {x2.dtype} {tuple(x2.shape)}")
    if w.out_features % 8 or w.bits not in AVX2_BITS:
        raise ValueError(f"the FMA kernel needs out_features % 8 == 0 and bits in {AVX2_BITS}")
    order = check_x_order(x_order, w.in_features)
    x2 = x2.contiguous()
    m, n = x2.shape[0], w.out_features
    if bias is not None:
        bias = bias.to(x2.dtype).contiguous()
    y = torch.empty(m, n, dtype=x2.dtype)
    if m == 0:
        return y
    threads, chunk = kernel_threads(m, w), balanced_chunk(m, rows_per_call(w.in_features))
    for start in range(0, m, chunk):
        part, out = (x2, y) if chunk == m else (x2[start:start + chunk], y[start:start + chunk])
        rc = fn(
            part.data_ptr(), int(x2.dtype == torch.float32), part.shape[0], w.in_features, w.qweight.data_ptr(),
            w.scales.data_ptr(), w.zeros.data_ptr(), w.g_idx.data_ptr(), n, None if bias is None else bias.data_ptr(),
            out.data_ptr(), threads, w.bits, w.regular_group, order,
        )
        if rc != 0:
            raise RuntimeError(f"FMA CPU kernel failed (code {rc}) for x {tuple(x2.shape)}, out_features {n}")
    return y

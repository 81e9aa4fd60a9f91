"""``h += alpha * X^T X`` for bfloat16 rows on CPUs with AVX512-BF16, without a float32 copy of the rows
(``csrc/gram_bf16_avx512bf16.c``, compiled on first use; built, cached and loaded by ``kernel_cache.py``).

A bf16 model's calibration passes hand the Hessians bf16 rows. The float32 path casts them, transposes the
copy and multiplies at float32 speed; torch has no CPU product of bf16 inputs with a float32 result (its
``mm(..., out_dtype=)`` is CUDA-only, oneDNN's bf16 matmul rounds to bf16). The kernel multiplies the bf16
transpose with ``vdpbf16ps``: the product of two bf16 numbers is exact in float32 and the pairs are summed in
float32, so the matrix is a float32 sum of the same exact products as the float32 path's, in another order
(values below float32's normal range, ~1e-38, count as zero). It writes the upper block triangle (whole 64-column
diagonal blocks) and the lower one is mirrored from it, as the float32 path does.

On CPUs with AMX a second build (``csrc/gram_bf16_amx.c``) computes the same on AMX tiles (``tdpbf16ps``: the
same exact products, float32 sums), reading the rows as they are (no transpose: its tiles interleave pairs
of rows); the faster build on a probe serves (:func:`fastest`), and ``hessian.gram_kernel_wins`` takes the
kernel only where it also beats the float32 path.

Checked once per process before use against a float64 reference on probe matrices (within float32 summation
error). Unavailable (and the float32 path used) without Linux on x86-64 with AVX512-BF16, a compiler, or with
``HF_VLM_GPTQ_CPU_KERNEL=0``.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import torch

from . import kernel_cache
from .selfcheck import self_check

logger = logging.getLogger(__name__)

_P, _I64, _INT, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
KERNEL = kernel_cache.KernelSource(
    source=Path(__file__).with_name("csrc") / "gram_bf16_avx512bf16.c",
    cflags=("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fno-math-errno",
            "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC"),
    symbol="hvg_gram_bf16",
    argtypes=(_P, _I64, _I64, _I64, _P, _I64, _F, _INT),
    required_cpu_flags=("avx512f", "avx512bw", "avx512vl", "avx512_bf16"),
    what="CPU bf16 Hessian kernel",
)
PANEL = 64  # columns of one panel of the kernel (its diagonal blocks are written whole)
MIN_COLUMNS = 256  # narrower matrices: the float32 path's one product costs about as much
SERIAL_ELEMS = 1 << 16  # rows x columns below which one thread does it
MAX_ROWS = 1 << 20  # rows per kernel call (its gather takes 32-bit offsets; a flush holds far fewer)
_TOLERANCE = 1e-5  # of sum_k |x_ki| |x_kj|: float32 summation error over the probes' rows, with room

# the same function on AMX tiles (csrc/gram_bf16_amx.c), where the CPU has them; which build runs is measured
# at first use (:func:`fastest`)
AMX = kernel_cache.KernelSource(
    source=KERNEL.source.with_name("gram_bf16_amx.c"),
    cflags=("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile", "-mamx-bf16",
            "-fopenmp", "-shared", "-fPIC"),
    symbol="hvg_gram_bf16_rows",  # the rows as they are, not their transpose (the C source says why)
    argtypes=KERNEL.argtypes,
    required_cpu_flags=(*KERNEL.required_cpu_flags, "amx_tile", "amx_bf16"),
    what="CPU bf16 Hessian kernel (AMX tiles)",
    headers=(KERNEL.source.with_name("amx_tiles.h"), KERNEL.source.with_name("thread_scratch.h")),
    name="gram_bf16_amx",
)
ROWS_BUILDS = {AMX.entry_name}  # builds that read the rows themselves (the others their transpose)
_FASTEST_PROBE = (1024, 512)  # rows x columns of bf16 the builds are timed on (a millisecond or two each)

# "lib" -> the ctypes function, or "reason" -> why there is none; "ready" once the self-check has run
_state: dict = {}


def fastest(fns: dict) -> str:
    """The name of the fastest of the builds ``{name: fn}`` on a probe (best of 3, in turns)."""
    rows, columns = _FASTEST_PROBE
    x = torch.randn(rows, columns, generator=torch.Generator().manual_seed(0)).bfloat16()
    h = torch.zeros(columns, columns)
    return kernel_cache.fastest_build(fns, lambda name, fn: add_gram(h, [x], 1.0, fn, name), "CPU bf16 Hessian kernel")


# the kernel once built, loaded and self-checked (the faster build where the CPU runs both); why not
checked_kernel, unavailable_reason = kernel_cache.module_kernel(KERNEL, __name__, others=(AMX,), fastest=fastest)


def takes(rows: torch.Tensor, h: torch.Tensor) -> bool:
    """Whether ``rows`` (bf16, ``[N, n]``) go into the contiguous float32 CPU matrix ``h`` through the kernel
    (checked and available, columns a multiple of 16 and at least :data:`MIN_COLUMNS`, nothing traced)."""
    return (rows.dtype == torch.bfloat16 and rows.device.type == "cpu" and h.dtype == torch.float32
            and h.device.type == "cpu" and h.is_contiguous() and h.shape[0] % 16 == 0 and h.shape[0] >= MIN_COLUMNS
            and not torch.compiler.is_compiling() and checked_kernel(_check) is not None)


def add_gram(h: torch.Tensor, pieces: list[torch.Tensor], alpha: float, fn=None, build: str | None = None) -> None:
    """In place, for a symmetric float32 ``h [n, n]``: ``h += alpha * X^T X``, ``X`` the concatenation of the
    bf16 ``pieces`` (each ``[N_i, n]``), through the kernel ``fn`` of the build named ``build`` (default: the
    checked one; a build of :data:`ROWS_BUILDS` reads the rows as they are, the others their transpose)."""
    if fn is None:
        fn, build = checked_kernel(_check), _state.get("build")
    if not h.is_contiguous():
        raise ValueError("h must be contiguous")
    n = h.shape[0]
    x = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    for start in range(0, x.shape[0], MAX_ROWS):
        rows = x[start : start + MAX_ROWS]
        if rows.shape[0] % 2:  # the kernel takes rows in pairs; a zero row adds nothing
            rows = torch.cat([rows, rows.new_zeros(1, n)])
        # the rows themselves, or their transpose (for bf16 faster than dense.transposed's chunks)
        operand = rows.contiguous() if build in ROWS_BUILDS else rows.t().contiguous()
        threads = 1 if rows.numel() < SERIAL_ELEMS else torch.get_num_threads()
        rc = fn(operand.data_ptr(), operand.stride(0), n, rows.shape[0], h.data_ptr(), h.stride(0), alpha, threads)
        if rc != 0:
            raise RuntimeError(f"{KERNEL.what} failed (code {rc}) for {rows.shape[0]} rows x {n} columns")
    for i in range(0, n - PANEL, PANEL):
        h[i + PANEL :, i : i + PANEL].copy_(h[i : i + PANEL, i + PANEL :].t())


def _probe(fn, build: str | None, rows: int, columns: int, seed: int) -> str | None:
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, columns, generator=gen) * torch.rand(columns, generator=gen) * 4).bfloat16()
    start = torch.randn(columns, columns, generator=gen)
    h = start + start.t()
    pieces = [x[: rows // 3], x[rows // 3 :]]
    expected = h.double() + 0.37 * (x.double().t() @ x.double())
    add_gram(h, pieces, 0.37, fn, build)
    bound = _TOLERANCE * (1.0 + 0.37 * (x.double().abs().t() @ x.double().abs())) + 1e-6 * h.double().abs()
    if not bool(((h.double() - expected).abs() <= bound).all()):
        return f"{rows} rows x {columns} columns: max error {float((h.double() - expected).abs().max()):.3g}"
    if not torch.equal(h, h.t()):
        return f"{rows} rows x {columns} columns: the matrix is not symmetric"
    return None


def _check(fn, build: str | None = None) -> str | None:
    """The kernel ``fn`` (of the build named ``build``; default: the one this process loaded) against float64
    on probe matrices: an odd row count, a partial last panel, rows split into pieces, an ``h`` that already
    holds a matrix (once per process)."""
    build = build if build is not None else _state.get("build")
    probes = [lambda: _probe(fn, build, 301, 272, 0), lambda: _probe(fn, build, 64, 16, 1),
              lambda: _probe(fn, build, 1030, 528, 2)]
    return self_check(KERNEL.what, probes, "using the float32 path", logger)

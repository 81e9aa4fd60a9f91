"""The inner loop of GPTQ's column sweep (``gptq.py``) as a C kernel for float32 on CPUs with AVX2 + FMA
(``csrc/gptq_columns_avx2.c``, compiled on first use; built, cached and loaded by ``kernel_cache.py``).

The torch loop runs about ten small ops per column (a few thousand columns per block of a 7B layer), each a
call into torch and a barrier of its thread pool; the kernel runs a whole group of columns in one call, the
outputs cut into cache-sized tiles split over threads, and every update inside the group done as it goes.
The quantized column, its codes and its error are computed as in the torch loop (the same operations in
float32, round to nearest even, exact division); the updates inside the group are the same products added
in another order, so results agree to rounding.

Checked once per process before use, by the check ``gptq.py`` passes (on probe layers, the codes of the
kernel's sweep and the torch loop's must agree). Unavailable (and the torch loop used) without Linux on
x86-64 with AVX2 + FMA, a compiler, or with ``HF_VLM_GPTQ_CPU_KERNEL=0``.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from . import kernel_cache

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
KERNEL = kernel_cache.KernelSource(
    source=Path(__file__).with_name("csrc") / "gptq_columns_avx2.c",
    # no fast math: the division and the rounding must be IEEE's, as in torch
    cflags=("-O3", "-mavx2", "-mfma", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC"),
    symbol="hvg_gptq_columns",
    argtypes=(_P, _I64, _I64, _I64, _P, _I64, _P, _P, _INT, _P, _I64, _P, _I64, _P, _P, _I64, _I64, _INT),
    required_cpu_flags=("avx2", "fma"),
    what="CPU GPTQ column kernel",
)
_MAX_TILE = 256  # outputs per tile: 256 floats x 128 columns x (weight + error) = 256 KB, an L2's share
_MIN_TILE = 32
SERIAL_ELEMS = 1 << 15  # columns x outputs below which one thread does it (fork / join costs more)

# "lib" -> the ctypes function, or "reason" -> why there is none; "ready" once the self-check has run
_state: dict = {}


# the kernel once built, loaded and self-checked; why not (kernel_cache.module_kernel)
checked_kernel, unavailable_reason = kernel_cache.module_kernel(KERNEL, __name__)


def _rows(t: torch.Tensor, name: str) -> int:
    """Row stride of a 2-D float32 / uint8 CPU view whose rows are contiguous."""
    if t.dim() != 2 or t.device.type != "cpu" or (t.shape[1] > 1 and t.stride(1) != 1):
        raise ValueError(f"{name} must be a 2-D CPU tensor with contiguous rows, got shape {tuple(t.shape)} "
                         f"strides {t.stride()} on {t.device}")
    return t.stride(0)


def call(fn, wt: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
         codes: torch.Tensor, err: torch.Tensor, pre: torch.Tensor | None = None,
         p: torch.Tensor | None = None) -> None:
    """Quantize the columns ``wt[n, out]`` (transposed weight, float32, in place: they become the dequantized
    columns) with the grid ``scale`` / ``zero`` ``[out]`` and the upper factor ``u[n, n]``, writing ``codes``
    (uint8) and ``err`` ``[n, out]``; GPTAQ: ``pre`` gets the columns before rounding and ``p[n, n]`` moves
    the later ones (both or neither)."""
    n, out = wt.shape
    if wt.dtype != torch.float32 or u.dtype != torch.float32 or err.dtype != torch.float32:
        raise ValueError(f"the CPU GPTQ kernel takes float32, got {wt.dtype} / {u.dtype} / {err.dtype}")
    if tuple(u.shape) != (n, n) or tuple(codes.shape) != (n, out) or tuple(err.shape) != (n, out):
        raise ValueError(f"shapes disagree: wt {tuple(wt.shape)}, u {tuple(u.shape)}, codes {tuple(codes.shape)}, "
                         f"err {tuple(err.shape)}")
    if (pre is None) != (p is None):
        raise ValueError("pre and p go together (GPTAQ) or not at all")
    scale = scale.to(torch.float32).contiguous()
    zero = zero.to(torch.float32).contiguous()
    threads = 1 if n * out < SERIAL_ELEMS else torch.get_num_threads()
    width = -(-out // (2 * threads))
    width = max(_MIN_TILE, min(_MAX_TILE, -(-width // 8) * 8))
    lde = _rows(err, "err")
    if pre is not None and (_rows(pre, "pre") != lde or tuple(pre.shape) != (n, out)):
        raise ValueError("pre must have err's shape and strides")
    rc = fn(wt.data_ptr(), _rows(wt, "wt"), out, n, u.data_ptr(), _rows(u, "u"), scale.data_ptr(), zero.data_ptr(),
            maxq, codes.data_ptr(), _rows(codes, "codes"), err.data_ptr(), lde,
            None if pre is None else pre.data_ptr(), None if p is None else p.data_ptr(),
            0 if p is None else _rows(p, "p"), width, threads)
    if rc != 0:
        raise RuntimeError(f"CPU GPTQ column kernel failed (code {rc}) for {n} columns x {out} outputs")

"""The MSE clip search of ``grid.py`` as a C kernel for float32 rows on CPUs with AVX2 + FMA
(``csrc/clip_search.c``, compiled on first use; built, cached and loaded by ``kernel_cache.py``; where the CPU
has AVX-512 F/DQ/VL/BW also built for 512-bit vectors, and the faster of the two on a probe is used).

The torch version evaluates each candidate scale over the whole group with about ten passes over memory,
``|.| ** 2.4`` as exp and log; the kernel takes four candidates per pass over a row in registers, ``|.| ** 2.4``
as ``2 ** (2.4 log2 |.|)`` from two polynomials (about 3e-7 relative; see the C source), vectorised, rows split
over threads, and stops once a candidate's clamped elements alone cost more than the best error so far (the
candidates shrink one range, so no later one can win). It picks the candidate of least error like the torch
version; the two differ by that rounding, so where two candidates' errors agree to about 1e-6 they may pick
differently (either is a minimiser to that precision).

Checked once per process before use, by the check ``grid.py`` passes (on probe rows, the error of the
candidate the kernel picks must be within 1e-5 of the least error the torch version finds). Unavailable (and
the torch version used) without Linux on x86-64 with AVX2 + FMA, a compiler, or with
``HF_VLM_GPTQ_CPU_KERNEL=0``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
from pathlib import Path

import torch

from . import kernel_cache

logger = logging.getLogger(__name__)

_P, _I64, _INT, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
# the parts of fast math that let the loops vectorise (reassociated sums), but exact division, and not
# -ffast-math itself: with it gcc links crtfastmath.o, whose loading sets flush-to-zero and denormals-are-zero
# in the loading thread for the rest of the process (torch's CPU math included)
_MATH = ("-O3", "-mfma", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-fno-math-errno",
         "-ffinite-math-only", "-fopenmp", "-shared", "-fPIC")
AVX2 = kernel_cache.KernelSource(
    source=Path(__file__).with_name("csrc") / "clip_search.c",
    cflags=("-mavx2", *_MATH),
    symbol="hvg_clip_search",
    argtypes=(_P, _I64, _I64, _P, _P, _I64, _INT, _F, _P, _INT),
    required_cpu_flags=("avx2", "fma"),
    what="CPU clip-search kernel",
    libs=("-lm",),
    name="clip_search_avx2",
)
# the same source in 512-bit vectors (1.7x the AVX2 build on a Zen 5 EPYC, 2048 x 512 in groups of 128); which
# of the two runs is measured at first use (:func:`fastest`): wide vectors lower the clock on some CPUs
AVX512 = dataclasses.replace(
    AVX2, cflags=("-mavx2", "-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mprefer-vector-width=512",
                  *_MATH),
    required_cpu_flags=("avx2", "fma", "avx512f", "avx512dq", "avx512vl", "avx512bw"),
    what="CPU clip-search kernel (AVX-512)", name="clip_search_avx512")
_PROBE = (256, 128, 80)  # rows, columns (a group), candidates: a few ms per call
SERIAL_ELEMS = 1 << 16  # rows x cols below which one thread does it (fork / join costs more)

# "lib" -> the ctypes function (and "build" its name), or "reason" -> why there is none; "ready" once the
# self-check has run
_state: dict = {}


def fastest(fns: dict) -> str:
    """The name of the fastest of the builds ``{name: fn}`` on a probe group (best of 3, in turns)."""
    gen = torch.Generator().manual_seed(0)
    rows, cols, steps = _PROBE
    x = torch.randn(rows, cols, generator=gen)
    span = x.abs().amax(1)
    scales = torch.stack([span * (1 - k / 100) / 7.5 for k in range(steps)]).contiguous()
    zeros = torch.full((steps, rows), 8.0)
    return kernel_cache.fastest_build(fns, lambda _name, fn: call(fn, x, scales, zeros, 15, 2.4),
                                      "CPU clip-search kernel")


# the kernel once built, loaded and self-checked (the faster build where the CPU runs both); why not
checked_kernel, unavailable_reason = kernel_cache.module_kernel(AVX2, __name__, others=(AVX512,), fastest=fastest)


def call(fn, x: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, maxq: int, norm: float) -> torch.Tensor:
    """For each row of float32 ``x[rows, cols]`` on the CPU the candidate ``k`` (of float32 ``scales`` /
    ``zeros`` ``[steps, rows]``) of least error, through the kernel ``fn``."""
    rows, cols = x.shape
    steps = scales.shape[0]
    x, scales, zeros = x.contiguous(), scales.contiguous(), zeros.contiguous()
    best = torch.empty(rows, dtype=torch.int64)
    threads = 1 if rows * cols < SERIAL_ELEMS else torch.get_num_threads()
    rc = fn(x.data_ptr(), rows, cols, scales.data_ptr(), zeros.data_ptr(), steps, maxq, norm, best.data_ptr(),
            threads)
    if rc != 0:
        raise RuntimeError(f"CPU clip-search kernel failed (code {rc}) for rows {rows}, cols {cols}")
    return best

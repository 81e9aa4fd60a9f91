"""Kernel backends of the packed modules and the one policy that picks among them.

Each backend is one file here implementing :class:`~.base.Backend` (why it cannot serve a layer, its weight
layout, its matmul) and one entry in :data:`BACKENDS`; where it sits in the per-device order
(:data:`DISPATCH`) and the batch range where it wins (:data:`MAX_BATCH`) are the two tables below.

``kernel="auto"`` (:func:`choose`) walks ``DISPATCH[x.device.type]`` in order and takes the first backend
that serves the layer and whose batch range covers the rows of ``x``. A backend with a row in
``MAX_BATCH[device]`` serves at most ``MAX_BATCH[device][name][column]`` rows, the column being the
variant of its alternative: the first later backend in the order that has a column in that row and serves
the layer (asked in that order, so a backend the row does not name is never prepared for the comparison).
Without a row, every batch. :data:`MIN_BATCH` rows work the same way from below: a backend that loses
to an alternative at the smallest batches serves from ``MIN_BATCH[device][name][column]`` rows on (its
alternative is then looked for among the columns of both rows). The last entry, dequantize + matmul, serves
every layer. On CPU the walk is the fallback: a measurement of every backend in the order on this host
(:mod:`.measure`, at a shape class's first use, cached per CPU) ranks them per batch, and the fastest that
serves the module is taken, unless ``HF_VLM_GPTQ_DISPATCH=table`` or the measurement does not cover the
batch. Forcing a backend
(``kernel="int4"`` etc.) skips the walk and raises ``ValueError`` with the reason where it cannot serve.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .amx import AmxBackend
from .avx2 import Avx2Backend
from .base import Backend, Layer, LayerShape
from .dequant import DequantBackend
from .fused import FusedBackend
from .int4 import Int4Backend
from .measure import ENV_MODE, generation, measured_for
from .triton import TritonBackend

__all__ = ["BACKENDS", "DISPATCH", "KERNEL_MODES", "MAX_BATCH", "MIN_BATCH", "Backend", "Layer", "LayerShape", "choose",
           "choose_remembered"]

BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (Int4Backend(), FusedBackend(), DequantBackend(), TritonBackend(), Avx2Backend(), AmxBackend())
}
KERNEL_MODES = ("auto", *BACKENDS)

# The order "auto" tries per device type (other devices: dequantize + matmul only).
DISPATCH: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "int4", "dequant"),
    "cpu": ("int4", "amx", "fused", "avx2", "dequant"),
}
FALLBACK_ORDER = ("dequant",)

# Largest batch (rows of x) where a backend beats its alternative, per device type; the columns are the
# alternative's variants ("cached" / "uncached": dequantize + matmul with / without the module's dense cache;
# "fused" / "fused_small_batch": the fused CPU kernel without / with its 1-4 row paths; "amx": the AMX
# kernel, which beats torch's int4 kernel at every batch, act-order included; "avx2" / "avx512": the FMA
# kernel's AVX2 / AVX-512 build; the latter behind torch's int4 kernel only at 1-2 rows with the weights in
# memory, where the int4 layout is read in order). How each number was
# found: bench/results/kernel_thresholds.md (CPU: measured with bench/ops.py, the "avx2" column with
# bench/cpu_avx2.py on an AVX2-only CPU, the "avx512" one on an AVX-512 CPU without AVX512-BF16; CUDA:
# estimates to be tuned with bench/cuda_all.sh). The FMA kernel has no row: it beats dequantize + matmul
# at every batch and a dense cache from MIN_BATCH on.
# On CPU these tables are the fallback of the measured dispatch (measure.py).
MAX_BATCH: dict[str, dict[str, dict[str, int]]] = {
    "cpu": {"int4": {"cached": 10, "uncached": 192, "amx": 0, "fused": 4, "fused_small_batch": 0, "avx2": 8,
                     "avx512": 2}},
    "cuda": {"triton": {"cached": 32, "uncached": 4096}, "int4": {"cached": 4, "uncached": 32}},
}
# Smallest batch where a backend beats its alternative (same columns; absent: from one row on). The AVX2
# kernel dequantizes the whole weight on every call, so a dense cache beats it at a few rows (measured on
# this project's 2-core AVX2-only AMD EPYC host: bench/results/cpu_avx2_cpu.md). The AMX kernel has no
# row: on a 2-core Intel Xeon with AMX it beats the fused kernel from one row on, and dense bf16 at every
# batch (bench/results/ops_amx_cpu.md).
MIN_BATCH: dict[str, dict[str, dict[str, int]]] = {"cpu": {"avx2": {"cached": 4}}}


def choose(module: Any, x2: torch.Tensor, mode: str) -> tuple[Backend, Any]:
    """The backend that computes ``x2 @ W^T`` for ``module`` under ``module.kernel == mode``, with its
    prepared weights (``module._prepare``, cached by the module)."""
    if mode != "auto" and mode not in BACKENDS:
        raise ValueError(f"kernel must be one of {('auto', *BACKENDS)}, got kernel={mode!r}")
    if mode != "auto":
        weights = module._prepare(BACKENDS[mode], x2)
        if isinstance(weights, str):
            raise ValueError(f"kernel={mode!r} is unavailable for this layer / input: {weights}")
        return BACKENDS[mode], weights
    order = [BACKENDS[name] for name in DISPATCH.get(x2.device.type, FALLBACK_ORDER)]
    measured = measured_for(module, x2, order)
    ranking = None if measured is None else measured.ranking(x2.shape[0])
    by_name = {backend.name: backend for backend in order}
    for backend in (by_name[name] for name in ranking or () if name in by_name):
        weights = module._prepare(backend, x2)
        if not isinstance(weights, str):
            return backend, weights
    limits, floors = MAX_BATCH.get(x2.device.type, {}), MIN_BATCH.get(x2.device.type, {})
    prepared: dict[int, Any] = {}

    def serves(i: int) -> bool:
        if i not in prepared:
            prepared[i] = module._prepare(order[i], x2)
        return not isinstance(prepared[i], str)

    for i, backend in enumerate(order):
        row, floor = limits.get(backend.name), floors.get(backend.name, {})
        if row is not None or floor:
            columns = set(row or {}) | set(floor)
            alt = next((j for j in range(i + 1, len(order)) if set(order[j].variants) & columns and serves(j)),
                       None)
            if alt is not None:
                column = order[alt].variant(module, prepared[alt])
                if (row is not None and x2.shape[0] > row[column]) or x2.shape[0] < floor.get(column, 0):
                    continue
        if serves(i):
            return backend, prepared[i]
    raise RuntimeError(f"no kernel backend serves this layer on {x2.device.type}: {prepared}")


REMEMBERED_PER_MODULE = 64  # input kinds (rows, dtype, ...) a module remembers its choice for; then it starts over


def choose_remembered(module: Any, x2: torch.Tensor, mode: str) -> tuple[Backend, Any]:
    """:func:`choose`'s answer, remembered by the module per kind of input (mode, dtype, device, rows, thread
    count, dense cache on or off): a packed layer's matmul asks on every call, and on small layers the walk
    costs as much as the kernel. An answer holds while the module's buffers, the tables above (replaced, not
    edited in place), ``$HF_VLM_GPTQ_DISPATCH`` and what this process has measured (``measure.generation``)
    stay the same, and while its backend still serves the input; under ``torch.compile`` nothing is
    remembered."""
    if torch.compiler.is_compiling():
        return choose(module, x2, mode)
    device = x2.device.type
    state = (module._stamp(), id(DISPATCH.get(device)), id(MAX_BATCH.get(device)), id(MIN_BATCH.get(device)),
             os.environ.get(ENV_MODE), generation())
    memo = module._cache.get("choices")
    if memo is None or memo[0] != state or len(memo[1]) >= REMEMBERED_PER_MODULE:
        memo = (state, {})
        module._cache["choices"] = memo
    key = (mode, x2.dtype, x2.device, x2.shape[0], torch.get_num_threads(), module.cache_dequantized)
    hit = memo[1].get(key)
    if hit is not None and hit[0].unavailable_reason(module, x2.dtype, x2.device) is None:
        return hit
    memo[1][key] = answer = choose(module, x2, mode)
    return answer

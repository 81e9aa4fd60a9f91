"""The CPU dispatch measured on this host: at the first matmul of a layer of an unmeasured shape class, every
backend that can serve it is timed against a dense matmul, and the per-batch ranking replaces ``MAX_BATCH``.

* Shape class (:func:`shape_class`): bits, group size and in / out features rounded to powers of two, act-order,
  the activation dtype, whether the module keeps a dense cache, the backends that serve it.
* Measurement (:func:`measure`): batches :data:`BATCHES`, the variants taken in turns, best of :data:`REPS`,
  the whole within about :data:`BUDGET_S` seconds (``$HF_VLM_GPTQ_DISPATCH_BUDGET_S``; batches past the
  budget are not measured: there the table decides). Eager only: while ``torch.compile`` traces, only what is already known is used.
* Kept per process and in the per-CPU cache file (``dispatch_cache.py``); logged at INFO once per class.
* ``HF_VLM_GPTQ_DISPATCH=table``: no measuring, the fixed table only; ``measure``: the default.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..packing import contiguous_groups
from .base import Backend
from .dispatch_cache import DENSE, Measured, cache_path, cpu_hash, cpu_key, read_cache, write_cache

logger = logging.getLogger(__name__)

ENV_MODE = "HF_VLM_GPTQ_DISPATCH"
MODES = ("measure", "table")
MEASURED_DEVICES = ("cpu",)
BATCHES = (1, 4, 16, 64, 256, 1024)  # 1024: prefill and vision towers, where a kernel may fall behind dense
REPS = 3
BUDGET_S = 0.4
ENV_BUDGET = "HF_VLM_GPTQ_DISPATCH_BUDGET_S"  # seconds per class instead of BUDGET_S (once per CPU: cached)

_lock = threading.RLock()
_known: dict[str, dict[str, Measured]] = {}  # cpu-key hash -> shape class -> measurement (files read once)
_failed: set[tuple[str, str]] = set()  # (cpu-key hash, class) whose measurement raised: the table decides
_generation = 0  # bumped whenever _known or _failed change (what a remembered choice depends on)


def generation() -> int:
    """A number that changes whenever what this process knows of the measurements changes (a class measured,
    a cache file read, a measurement failed, :func:`forget`)."""
    return _generation


def _changed() -> None:
    global _generation
    _generation += 1


def mode() -> str:
    """``$HF_VLM_GPTQ_DISPATCH`` (``measure`` when unset); ValueError for anything else."""
    value = os.environ.get(ENV_MODE) or "measure"
    if value not in MODES:
        raise ValueError(f"{ENV_MODE} must be one of {MODES}, got {value!r}")
    return value


def _pow2(n: int) -> int:
    return 1 << max(0, round(math.log2(n)))


def shape_class(module: Any, dtype: torch.dtype, order: Sequence[Backend] = ()) -> str:
    """The shape class of a packed module for inputs of ``dtype`` on the CPU (layers of one class share a
    measurement), with the backends of ``order`` that serve it (another set is measured again)."""
    return _classify(module, dtype, order)[0]


def _classify(module: Any, dtype: torch.dtype, order: Sequence[Backend]) -> tuple[str, int]:
    """(:func:`shape_class`, how many backends of ``order`` serve it), cached by the module."""
    g = module.g_idx
    stamp = (g.data_ptr(), 0 if g.is_inference() else g._version, dtype, module.cache_dequantized,
             tuple(backend.name for backend in order))
    hit = module._cache.get("dispatch_class")  # cheaper than module._cached: only g_idx matters
    if hit is not None and hit[0] == stamp:
        return hit[1]
    cpu = torch.device("cpu")
    serving = [b.name for b in order if b.unavailable_reason(module, dtype, cpu) is None]
    group = "c" if module.group_size == -1 else _pow2(module.group_size)
    act = "seq" if contiguous_groups(g, module.group_size) else "act"
    dense = "dense" if module.cache_dequantized else "nodense"
    shape = f"b{module.bits}-g{group}-i{_pow2(module.in_features)}-o{_pow2(module.out_features)}-{act}"
    answer = (f"{shape}-{str(dtype).removeprefix('torch.')}-{dense}:{','.join(serving)}", len(serving))
    module._cache["dispatch_class"] = (stamp, answer)
    return answer


def _time_round_robin(fns: dict[str, Callable[[], Any]], reps: int, deadline: float) -> dict[str, float]:
    """Best seconds per call of each function, taken in turns: up to ``reps`` rounds, a next one only if it
    would end by ``deadline`` (at least one; the best of them: a first call's lazy set-up is outrun)."""
    best = dict.fromkeys(fns, math.inf)
    for _ in range(reps):
        start = time.perf_counter()
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
        now = time.perf_counter()
        if now + (now - start) > deadline:
            break
    return best


def _predict(batches: Sequence[int], seconds: Sequence[float], batch: int) -> float:
    """A call's seconds at ``batch`` rows: the line through the last two measured batches (slope >= 0),
    proportional to the rows after one."""
    if len(batches) == 1:
        return seconds[-1] * batch / batches[-1]
    slope = max(0.0, (seconds[-1] - seconds[-2]) / (batches[-1] - batches[-2]))
    return seconds[-1] + slope * (batch - batches[-1])


def measure(module: Any, x2: torch.Tensor, order: Sequence[Backend], budget_s: float | None = None) -> Measured:
    """Time every backend of ``order`` that serves ``module`` for inputs like ``x2`` (its own layout, built
    for the measurement and dropped after), and :data:`DENSE`, at :data:`BATCHES` within ``budget_s``: each
    batch gets an equal share of what is left, and a batch whose round is predicted (:func:`_predict`) to
    end past the budget is not timed, nor any larger one."""
    if budget_s is None:
        budget_s = float(os.environ.get(ENV_BUDGET) or BUDGET_S)
    deadline = time.perf_counter() + budget_s
    layouts = {}
    for backend in order:
        if backend.unavailable_reason(module, x2.dtype, x2.device) is None:
            weights = backend.prepare(module, x2)
            if not isinstance(weights, str):
                layouts[backend.name] = (backend, weights)
    dense = module._dequantize(x2.dtype)
    gen = torch.Generator(device=x2.device).manual_seed(0)
    batches, times = [], {name: [] for name in (*layouts, DENSE)}
    with torch.no_grad():
        for i, batch in enumerate(BATCHES):
            now = time.perf_counter()
            if batches and now + sum(_predict(batches, ts, batch) for ts in times.values()) > deadline:
                break
            x = torch.randn(batch, module.in_features, generator=gen, device=x2.device).to(x2.dtype)
            fns = {name: functools.partial(b.matmul, module, x, w, None) for name, (b, w) in layouts.items()}
            fns[DENSE] = functools.partial(F.linear, x, dense)
            share = now + (deadline - now) / (len(BATCHES) - i)
            for name, t in _time_round_robin(fns, REPS, share).items():
                times[name].append(max(t, 1e-9))
            batches.append(batch)
    return Measured(tuple(batches), {n: tuple(t) for n, t in times.items()}, len(batches) == len(BATCHES))


def _log(cls: str, m: Measured, source: str) -> None:
    cells = ", ".join(f"{n} " + "/".join(f"{t * 1e3:.3g}" for t in ts) for n, ts in m.times.items())
    chosen = "; ".join(f"{n} rows " + ",".join(f"{lo}-{'' if hi is None else hi}" for lo, hi in spans)
                       for n, spans in m.ranges().items())
    logger.info("CPU dispatch for %s (%s): ms at batches %s: %s; chosen: %s", cls, source,
                "/".join(map(str, m.batches)), cells, chosen)


def measured_for(module: Any, x2: torch.Tensor, order: Sequence[Backend]) -> Measured | None:
    """This host's measurement of ``module``'s shape class, measured now if nobody has (None: table mode,
    not a measured device, one backend serves the class, tracing without a known measurement, or the
    measurement failed)."""
    if x2.device.type not in MEASURED_DEVICES or mode() == "table":
        return None
    (cls, serving), key_hash = _classify(module, x2.dtype, order), cpu_hash()
    if serving < 2:  # nothing to choose between
        return None
    known = _known.get(key_hash)
    if known is not None and cls in known:
        return known[cls]
    if torch.compiler.is_compiling() or (key_hash, cls) in _failed:
        return None
    with _lock:
        key, path = cpu_key(), cache_path(key_hash)
        if key_hash not in _known:
            _known[key_hash] = read_cache(path, key)
            _changed()
            for c, m in _known[key_hash].items():
                logger.debug("CPU dispatch for %s read from %s: %s", c, path, m.ranges())
        if cls in _known[key_hash]:
            return _known[key_hash][cls]
        try:
            measured = measure(module, x2, order)
        except Exception as err:  # any failure: the fixed table decides for this class in this process
            logger.warning("measuring the CPU dispatch for %s failed (%s: %s); using the table", cls,
                           type(err).__name__, err)
            _failed.add((key_hash, cls))
            _changed()
            return None
        _known[key_hash][cls] = measured
        _changed()
        _log(cls, measured, "measured")
        try:
            write_cache(path, key, cls, measured)
        except OSError as err:
            logger.debug("could not write the dispatch cache %s (%s)", path, err)
        return measured


def forget() -> None:
    """Drop what this process knows (the next use reads the cache files again)."""
    with _lock:
        _known.clear()
        _failed.clear()
        _changed()

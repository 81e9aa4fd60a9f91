"""The CPU dispatch measured on this host: at a layer's first matmul, every backend that can serve its
shape class is timed against a dense matmul, and the per-batch ranking replaces ``MAX_BATCH`` there.

* Shape class (:func:`shape_class`): bits, group size and in / out features rounded to powers of two, the
  activation dtype, act-order, whether the module keeps a dense cache, the backends in the order. CPU key (:func:`cpu_key`): the CPU
  model, its kernel-relevant flags, the machine, torch's version and thread count.
* Measurement (:func:`measure`): batches :data:`BATCHES`, the variants taken in turns, best of
  :data:`REPS`, the whole within about :data:`BUDGET_S` seconds (batches past the budget are not
  measured; there the table decides). Eager only: under ``torch.compile`` tracing, only what is already
  known is used.
* Cache: ``<cache_dir>/dispatch/<cpu-key-hash>.json`` (``cpu_fused.cache_dir``: ``$HF_VLM_GPTQ_CACHE``, else
  ``$XDG_CACHE_HOME/hf_vlm_gptq``, else ``~/.cache/hf_vlm_gptq``), written as a temporary file and renamed
  under the folder's lock, validated when read (anything else is ignored and measured again).
* ``HF_VLM_GPTQ_DISPATCH=table``: no measuring, the fixed table only; ``measure`` (the default).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import logging
import math
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import cpu_fused as CF
from ..packing import contiguous_groups
from .base import Backend

logger = logging.getLogger(__name__)

ENV_MODE = "HF_VLM_GPTQ_DISPATCH"
MODES = ("measure", "table")
MEASURED_DEVICES = ("cpu",)
BATCHES = (1, 4, 16, 64, 256)
REPS = 3
BUDGET_S = 0.4
SCHEMA = 1
DENSE = "dense"  # the yardstick: F.linear on a dequantized copy in the activation dtype
KEY_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vbmi", "avx512_bf16", "amx_tile",
             "amx_bf16", "asimd", "sve", "bf16")

_lock = threading.RLock()
_known: dict[str, dict[str, Measured]] = {}  # cpu-key hash -> shape class -> measurement (files read once)
_failed: set[tuple[str, str]] = set()  # (cpu-key hash, class) whose measurement raised: the table decides


@dataclass(frozen=True)
class Measured:
    """Seconds per call of each backend (and of :data:`DENSE`) at each measured batch; ``complete``: every
    batch of :data:`BATCHES` was measured (else rows past the last one are not covered)."""

    batches: tuple[int, ...]
    times: dict[str, tuple[float, ...]]
    complete: bool

    def __post_init__(self) -> None:
        if not self.batches or list(self.batches) != sorted(set(self.batches)) or self.batches[0] < 1:
            raise ValueError(f"batches must be increasing positive ints, got {self.batches}")
        if DENSE not in self.times or len(self.times) < 2:
            raise ValueError(f"times need {DENSE!r} and at least one backend, got {sorted(self.times)}")
        for name, ts in self.times.items():
            if len(ts) != len(self.batches) or not all(isinstance(t, float) and t > 0 for t in ts):
                raise ValueError(f"times[{name!r}] must be {len(self.batches)} positive floats, got {ts}")
        # bucket i serves rows up to the geometric midpoint between batches i and i + 1
        edges = [math.isqrt(a * b) for a, b in zip(self.batches, self.batches[1:])]
        object.__setattr__(self, "_edges", edges)
        object.__setattr__(self, "_rankings", [
            tuple(sorted((n for n in self.times if n != DENSE), key=lambda n, i=i: self.times[n][i]))
            for i in range(len(self.batches))])

    def ranking(self, rows: int) -> tuple[str, ...] | None:
        """Backends fastest first at the measured batch nearest ``rows`` (None: ``rows`` not covered)."""
        if rows > self.batches[-1] and not self.complete:
            return None
        return self._rankings[bisect.bisect_left(self._edges, rows)]

    def ranges(self) -> dict[str, list[tuple[int, int | None]]]:
        """Per backend, the row ranges ``(first, last)`` where it is the fastest (``last`` None: no end)."""
        out: dict[str, list[tuple[int, int | None]]] = {}
        lows = [1] + [e + 1 for e in self._edges]
        highs: list[int | None] = [*self._edges, None if self.complete else self.batches[-1]]
        for lo, hi, ranking in zip(lows, highs, self._rankings):
            spans = out.setdefault(ranking[0], [])
            if spans and spans[-1][1] == lo - 1:
                spans[-1] = (spans[-1][0], hi)
            else:
                spans.append((lo, hi))
        return out

    def to_json(self) -> dict:
        return {"batches": list(self.batches), "times": {n: list(t) for n, t in self.times.items()},
                "complete": self.complete}

    @classmethod
    def from_json(cls, data: Any) -> Measured:
        """Raises ``ValueError`` / ``TypeError`` / ``KeyError`` on anything but :meth:`to_json`'s shape."""
        if not isinstance(data, dict) or not isinstance(data["complete"], bool):
            raise ValueError(f"not a measurement: {data!r:.80}")
        if not all(isinstance(b, int) for b in data["batches"]):
            raise ValueError(f"batches must be ints, got {data['batches']!r:.80}")
        return cls(tuple(data["batches"]), {str(n): tuple(t) for n, t in dict(data["times"]).items()},
                   data["complete"])


def mode() -> str:
    """``$HF_VLM_GPTQ_DISPATCH`` (``measure`` when unset); ValueError for anything else."""
    value = os.environ.get(ENV_MODE) or "measure"
    if value not in MODES:
        raise ValueError(f"{ENV_MODE} must be one of {MODES}, got {value!r}")
    return value


@functools.lru_cache(maxsize=1)
def cpu_identity() -> tuple[str, frozenset[str]]:
    """The CPU's model name and feature flags as /proc/cpuinfo spells them (platform's names elsewhere)."""
    model, flags = None, frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name" and model is None:
            model = value
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return model or platform.processor() or platform.machine(), flags


def cpu_key(threads: int | None = None) -> dict[str, Any]:
    """What the measurements hold for: CPU model and kernel flags, machine, torch version, thread count."""
    model, flags = cpu_identity()
    return {"model": model, "flags": [f for f in KEY_FLAGS if f in flags], "machine": platform.machine(),
            "torch": torch.__version__, "threads": threads or torch.get_num_threads()}


@functools.lru_cache(maxsize=64)
def _cpu_hash(threads: int, identity: tuple[str, frozenset[str]]) -> str:
    return hashlib.sha256(json.dumps(cpu_key(threads), sort_keys=True).encode()).hexdigest()[:16]


def cpu_hash() -> str:
    """The hash of :func:`cpu_key` naming this host's cache file (cached per thread count)."""
    return _cpu_hash(torch.get_num_threads(), cpu_identity())


def cache_path(key_hash: str) -> Path:
    return CF.cache_dir() / "dispatch" / f"{key_hash}.json"


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
    answer = (f"b{module.bits}-g{group}-i{_pow2(module.in_features)}-o{_pow2(module.out_features)}-{act}-"
           f"{str(dtype).removeprefix('torch.')}-{dense}:{','.join(serving)}", len(serving))
    module._cache["dispatch_class"] = (stamp, answer)
    return answer


def _read(path: Path, key: dict[str, Any]) -> dict[str, Measured]:
    """The measurements in ``path`` if it is a valid file for ``key`` (else nothing, said at debug level)."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("schema") != SCHEMA or data.get("cpu") != key:
            raise ValueError("another schema or CPU key")
        classes = {str(c): Measured.from_json(m) for c, m in dict(data["classes"]).items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        logger.debug("ignoring the dispatch cache %s (%s: %s); measuring again", path, type(err).__name__, err)
        return {}
    return classes


def _write(path: Path, key: dict[str, Any], cls: str, measured: Measured) -> None:
    """Merge one class into the file: under the folder's lock, a temporary file renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with CF._CacheLock(path.parent):
        classes = {c: m.to_json() for c, m in _read(path, key).items()}
        classes[cls] = measured.to_json()
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"schema": SCHEMA, "cpu": key, "classes": classes}, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            CF._fsync_dir(path.parent)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _time_round_robin(fns: dict[str, Callable[[], Any]], reps: int, deadline: float) -> dict[str, float]:
    """Best seconds per call of each function, taken in turns, ``reps`` rounds or until ``deadline``."""
    best = dict.fromkeys(fns, math.inf)
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            break
    return best


def measure(module: Any, x2: torch.Tensor, order: Sequence[Backend], budget_s: float | None = None) -> Measured:
    """Time every backend of ``order`` that serves ``module`` for inputs like ``x2`` (its own layout, built
    for the measurement and dropped after), and :data:`DENSE`, at :data:`BATCHES` within ``budget_s``."""
    deadline = time.perf_counter() + (BUDGET_S if budget_s is None else budget_s)
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
        for batch in BATCHES:
            if batches and time.perf_counter() > deadline:
                break
            x = torch.randn(batch, module.in_features, generator=gen, device=x2.device).to(x2.dtype)
            fns = {name: functools.partial(b.matmul, module, x, w, None) for name, (b, w) in layouts.items()}
            fns[DENSE] = functools.partial(F.linear, x, dense)
            if not batches:  # first calls: lazy initialisation outside the timing
                for fn in fns.values():
                    fn()
            for name, t in _time_round_robin(fns, REPS, deadline).items():
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
            _known[key_hash] = _read(path, key)
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
            return None
        _known[key_hash][cls] = measured
        _log(cls, measured, "measured")
        try:
            _write(path, key, cls, measured)
        except OSError as err:
            logger.debug("could not write the dispatch cache %s (%s)", path, err)
        return measured


def forget() -> None:
    """Drop what this process knows (the next use reads the cache files again)."""
    with _lock:
        _known.clear()
        _failed.clear()

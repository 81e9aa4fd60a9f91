"""The measured CPU dispatch's data and its cache file: :class:`Measured`, the CPU key and the per-CPU file.

The file is ``<cache_dir>/dispatch/<cpu-key-hash>.json`` (``kernel_cache.cache_dir``: ``$HF_VLM_GPTQ_CACHE``,
else ``$XDG_CACHE_HOME/hf_vlm_gptq``, else ``~/.cache/hf_vlm_gptq``), one entry per shape class, merged
under the folder's lock and written as a temporary file renamed over the old one; read back with validation
(a file of another schema or CPU key, or anything unreadable, is ignored and said at debug level).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import kernel_cache

logger = logging.getLogger(__name__)

SCHEMA = 3  # 2: dequantize + matmul on the measured dense engine (ops/dense.py); 3: batches up to 1024
DENSE = "dense"  # the yardstick: F.linear on a dequantized copy in the activation dtype
KEY_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vbmi", "avx512_bf16", "amx_tile",
             "amx_bf16", "asimd", "sve", "bf16")


@dataclass(frozen=True)
class Measured:
    """Seconds per call of each backend (and of :data:`DENSE`) at each measured batch; ``complete``: every
    planned batch was measured (else rows past the last one are not covered)."""

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


@functools.lru_cache(maxsize=1)
def code_hash() -> str:
    """A hash of what the timings depend on besides the CPU: the C kernels' sources and the backends' code
    (another build of either is measured again, not ranked by an older one's times)."""
    ops = Path(kernel_cache.__file__).parent
    files = sorted((ops / "csrc").glob("*")) + sorted(Path(__file__).parent.glob("*.py"))
    digest = hashlib.sha256()
    for path in files:
        try:
            data = path.read_bytes() if path.is_file() else b""
        except OSError:  # unreadable: its name still counts
            data = b"?"
        digest.update(path.name.encode() + b"\0" + data)
    return digest.hexdigest()[:16]


def cpu_key(threads: int | None = None) -> dict[str, Any]:
    """What the measurements hold for: CPU model and kernel flags, machine, torch version, thread count, and
    the code measured (:func:`code_hash`)."""
    model, flags = cpu_identity()
    return {"model": model, "flags": [f for f in KEY_FLAGS if f in flags], "machine": platform.machine(),
            "torch": torch.__version__, "threads": threads or torch.get_num_threads(), "code": code_hash()}


@functools.lru_cache(maxsize=64)
def _cpu_hash(threads: int, identity: tuple[str, frozenset[str]]) -> str:  # identity: part of the cache key
    return hashlib.sha256(json.dumps(cpu_key(threads), sort_keys=True).encode()).hexdigest()[:16]


def cpu_hash() -> str:
    """The hash of :func:`cpu_key` naming this host's cache file (cached per thread count)."""
    return _cpu_hash(torch.get_num_threads(), cpu_identity())


def cache_path(key_hash: str) -> Path:
    return kernel_cache.cache_dir() / "dispatch" / f"{key_hash}.json"


def read_cache(path: Path, key: dict[str, Any]) -> dict[str, Measured]:
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


def write_cache(path: Path, key: dict[str, Any], cls: str, measured: Measured) -> None:
    """Merge one class into the file: under the folder's lock, a temporary file renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with kernel_cache.CacheLock(path.parent):
        classes = {c: m.to_json() for c, m in read_cache(path, key).items()}
        classes[cls] = measured.to_json()
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"schema": SCHEMA, "cpu": key, "classes": classes}, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            kernel_cache.fsync_dir(path.parent)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

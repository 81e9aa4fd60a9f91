"""How many CPU threads torch uses while a model is quantized, chosen by measuring the machine as it is now.

torch's CPU ops run on an OpenMP pool whose threads spin at every barrier (libgomp's default wait policy).
When another process holds a core, a thread waits for its descheduled peer at each of the thousands of small
ops of a block's replays and column sweeps: a 2-thread run then takes several times the wall time of a
1-thread run and burns several times the CPU. `OMP_WAIT_POLICY=PASSIVE` fixes that, but libgomp reads it
once, when torch is imported, so a library cannot set it (the `hf-vlm-gptq` command does, see
`hf_vlm_gptq_launcher.py`). What a library can do is choose the thread count: `AdaptiveThreads` takes one
thread while Linux reports CPU pressure (other work waiting for the cores), else times a few parallel ops
with the caller's thread count and with one thread and keeps the faster; it re-decides before each block
(re-probing when the last probe is more than a few seconds old) and gives the caller's count back at the
end. The probe is compute-bound (a sine over a few hundred KB per op, one barrier per op), so on free cores
more threads clearly win (a memory-bound probe gains little from a second thread and made the choice a coin
toss), and beside a busy process every op waits for the descheduled peer. The pressure shortcut is set above what this process's own threads cause on free cores
(a few %). `HF_VLM_GPTQ_ADAPTIVE_THREADS=0` switches it off.

Inference has the same trap at a finer grain: a 1-row matmul of a packed layer is a fraction of a millisecond
with one barrier, and beside one CPU-bound process its two spinning threads took 2.5x the wall time of one
thread. :data:`CPU_PRESSURE` (a :class:`PressureWatch`) tells the packed modules, at a cost of a clock read per
call, whether work has been waiting for the cores in the last ~0.1 s (PSI's cumulative stall time, read at
most once per window); while it has, their matmuls run on half the threads, then half again, down to one
(:func:`intra_op_threads`). The same variable switches it off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator

import torch

logger = logging.getLogger(__name__)

__all__ = ["CPU_PRESSURE", "AdaptiveThreads", "PressureWatch", "adaptive_threads", "intra_op_threads", "probe_seconds"]

_PROBE_ELEMENTS = 1 << 18  # 1 MB of float32: split over the threads by torch's parallel_for
_PROBE_OPS = 24
_KEEP_MORE_IF_FASTER = 0.85  # more threads must beat one thread by 15% to be kept
# PSI "some avg10" above this: work is waiting for the cores. This process's own threads on free cores read
# 2-6 % on a 2-core host; one CPU-bound process beside our threads, tens of %.
_BUSY_PRESSURE_PCT = 20.0
# a probe (~40 ms on 2 cores) is kept for this long: blocks of small models take less than a probe's worth
# each, those of real models take seconds; the pressure shortcut is read before every block regardless
_PROBE_VALID_S = 5.0
_PSI_PATH = "/proc/pressure/cpu"
_ENV = "HF_VLM_GPTQ_ADAPTIVE_THREADS"


def cpu_pressure() -> float | None:
    """Share of the last 10 s in which runnable work waited for a CPU (Linux PSI "some avg10"), in %; None
    where the kernel does not report it."""
    try:
        with open(_PSI_PATH) as handle:
            return float(handle.readline().split("avg10=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return None


def probe_seconds(threads: int, buffer: torch.Tensor) -> float:
    """Wall time of a fixed run of small compute-bound parallel ops with `threads` intra-op threads (the best
    of two)."""
    torch.set_num_threads(threads)
    out = torch.empty_like(buffer)
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        for _ in range(_PROBE_OPS):
            torch.sin(buffer, out=out)
        best = min(best, time.perf_counter() - start)
    return best


class AdaptiveThreads:
    """Chooses between the caller's torch thread count and one thread, by measurement, while it is active."""

    def __init__(self, enabled: bool = True) -> None:
        self.initial = torch.get_num_threads()
        self.enabled = (enabled and self.initial > 1
                        and os.environ.get(_ENV, "1") != "0")
        self.current = self.initial
        self._buffer = torch.linspace(0, 100, _PROBE_ELEMENTS) if self.enabled else None
        self._probed_at: float | None = None  # when the last probe decided (None: none, or the shortcut did)

    def refresh(self) -> int:
        """Measure both counts now, keep the faster one; returns the thread count in use.

        Where Linux reports CPU pressure (PSI), runnable work that waited for a CPU in the last 10 s means
        other processes want these cores: one thread then, without probing (a short probe can fall inside
        one scheduler slice and look fast)."""
        if not self.enabled:
            return self.current
        pressure = cpu_pressure()
        if pressure is not None and pressure > _BUSY_PRESSURE_PCT:
            many, one, chosen = float("nan"), float("nan"), 1
            self._probed_at = None
        elif self._probed_at is not None and time.monotonic() - self._probed_at < _PROBE_VALID_S:
            return self.current  # the last probe is recent
        else:
            many = probe_seconds(self.initial, self._buffer)
            one = probe_seconds(1, self._buffer)
            chosen = self.initial if many < _KEEP_MORE_IF_FASTER * one else 1
            self._probed_at = time.monotonic()
        if chosen != self.current:
            logger.info("CPU threads for quantization: %d (CPU pressure %s%%; parallel ops took %.1f ms with %d "
                        "threads, %.1f ms with 1: %s)", chosen, pressure, many * 1e3, self.initial, one * 1e3,
                        "the cores are free" if chosen > 1 else "other processes hold the cores")
        self.current = chosen
        torch.set_num_threads(chosen)
        return chosen

    def restore(self) -> None:
        torch.set_num_threads(self.initial)


@contextlib.contextmanager
def adaptive_threads(enabled: bool = True) -> Iterator[AdaptiveThreads]:
    """Measure and choose now, let the caller `refresh()` before each block, restore the count on exit
    (`enabled=False`: a no-op policy, e.g. when the blocks run on a GPU)."""
    policy = AdaptiveThreads(enabled)
    try:
        policy.refresh()
        yield policy
    finally:
        policy.restore()


def _stall_total_us(path: str) -> int | None:
    """PSI's cumulative "some" CPU stall time in microseconds (None where it cannot be read)."""
    try:
        with open(path) as handle:
            return int(handle.readline().split("total=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return None


class PressureWatch:
    """How many of the caller's threads to use now: the CPU pressure over the last ``window_s``, from the
    growth of PSI's stall counter (read at most once per window, so :meth:`threads` is a clock read between
    reads). Each window with pressure halves the count (down to one thread) and holds it for ``hold_s``; a hold
    that ends without pressure doubles it back one step. On 2 cores beside one CPU-bound process that is one
    thread; on 16 cores beside one, 8 (its fair share) rather than 1. Fewer threads beside a busy process cause
    no pressure, so only a try with more can show that the other process is gone (about one window of
    oversubscription per hold). Never fewer where PSI is missing or ``HF_VLM_GPTQ_ADAPTIVE_THREADS=0``
    (checked at each read)."""

    def __init__(self, path: str = _PSI_PATH, window_s: float = 0.1, hold_s: float = 2.0,
                 busy_pct: float = _BUSY_PRESSURE_PCT) -> None:
        self.path, self.window_s, self.hold_s, self.busy_pct = path, window_s, hold_s, busy_pct
        self._next_read = float("-inf")
        self._last: tuple[float, int] | None = None  # (monotonic time, stall total in us) of the last read
        self._halvings = 0
        self._hold_until = float("-inf")

    def threads(self, count: int) -> int:
        """The share of ``count`` threads to use now (``count`` when the cores are free)."""
        now = time.monotonic()
        if now >= self._next_read:
            self._read(now, count)
        return max(1, count >> self._halvings)

    def _read(self, now: float, count: int) -> None:
        self._next_read = now + self.window_s
        total = _stall_total_us(self.path) if os.environ.get(_ENV, "1") != "0" else None
        if total is None:
            self._last, self._halvings = None, 0
            return
        if self._last is not None and now - self._last[0] < 10 * self.window_s:  # a long gap tells nothing
            stalled_pct = (total - self._last[1]) / 1e4 / (now - self._last[0])
            if stalled_pct > self.busy_pct:
                self._halvings = min(self._halvings + 1, max(count.bit_length() - 1, 0))
                self._hold_until = now + self.hold_s
            elif self._halvings and now >= self._hold_until:
                self._halvings -= 1
                self._hold_until = now + self.hold_s
        self._last = (now, total)


CPU_PRESSURE = PressureWatch()


@contextlib.contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """torch (and the kernels that read its count) on ``count`` intra-op threads inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)

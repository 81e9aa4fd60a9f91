"""The bench scripts' one harness: the timer, the environment of a run, scratch folders, and the results
writer.

A run writes into its own folder, bench/runs/<time>/ (untracked), unless BENCH_RESULTS_DIR names another:
BENCH_RESULTS_DIR=bench/results updates the tracked results the README quotes. BENCH_RESULTS_TAG=<tag> puts
the tag into every file name (``ops_<tag>_cpu.md``): a run on another kind of CPU beside the usual one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("BENCH_RESULTS_DIR")
               or Path(__file__).resolve().parent / "runs" / time.strftime("%Y%m%d-%H%M%S"))
# the CPU features that decide which kernels run (x86 flags, Arm features), as /proc/cpuinfo spells them
CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2", "bf16", "i8mm")


# --- timing -------------------------------------------------------------------------------------------------
def _syncer(device: str | torch.device | None) -> Callable[[], None]:
    """What waits for the device's queued work: CUDA's synchronize, a no-op elsewhere."""
    if device is not None and torch.device(device).type == "cuda":
        return functools.partial(torch.cuda.synchronize, device)
    return lambda: None


class Stopwatch:
    """``with Stopwatch(device) as w:`` times its block, synchronizing the device at both ends.

    ``w.seconds``: wall seconds (while the block runs: so far); ``w.cpu_seconds``: this process's CPU
    seconds; ``w.end``: the ``time.perf_counter()`` value at the end. One instance can time many blocks.
    """

    def __init__(self, device: str | torch.device | None = None) -> None:
        self._sync = _syncer(device)
        self.start = self.end = 0.0
        self.cpu_seconds = 0.0
        self._running = False

    @classmethod
    def started(cls, device: str | torch.device | None = None) -> Stopwatch:
        """A running stopwatch (for a whole script: read ``.seconds`` as it goes)."""
        return cls(device).__enter__()

    def __enter__(self) -> Stopwatch:
        self._sync()
        self._cpu0 = time.process_time()
        self._running = True
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._sync()
        self.end = time.perf_counter()
        self._running = False
        self.cpu_seconds = time.process_time() - self._cpu0

    @property
    def seconds(self) -> float:
        return (time.perf_counter() if self._running else self.end) - self.start


@dataclass
class Timing:
    """Per-call seconds of repeated measurements (one sample each) and the result of the last call."""

    samples: list[float]
    result: Any = None

    @property
    def best(self) -> float:
        return min(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def p10(self) -> float:
        return sorted(self.samples)[len(self.samples) // 10]


def repeat(fn: Callable[[], Any], *, reps: int = 1, calls: int = 1, warmup: int = 0,
           device: str | torch.device | None = None) -> Timing:
    """``warmup`` untimed calls, then ``reps`` samples, each the mean time of ``calls`` back-to-back calls.

    Best-of-N: ``.best`` (on a shared host slower runs measure other people's jobs); ``.median`` otherwise.
    """
    for _ in range(warmup):
        fn()
    watch, samples, out = Stopwatch(device), [], None
    for _ in range(reps):
        with watch:
            for _ in range(calls):
                out = fn()
        samples.append(watch.seconds / calls)
    return Timing(samples, out)


def round_robin(fns: dict[str, Callable[[], Any]], *, device: str | torch.device | None, min_time: float,
                block: int = 1, skip: int = 0, warmup: int = 0, min_rounds: int = 3,
                max_rounds: int = 200) -> dict[str, Timing]:
    """Per-call times of several variants, taken in turns: each round runs every variant ``block`` times
    (the first ``skip`` calls of a block, which refill caches after the other variants ran, are dropped),
    for at least ``min_rounds`` rounds and until ``min_time`` seconds have passed (at most ``max_rounds``).

    Taking turns spreads drifts of a shared host's load over all variants; read ``.p10`` (or ``.median``).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    watch = Stopwatch(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    start, rounds = time.perf_counter(), 0
    while rounds < min_rounds or (time.perf_counter() - start < min_time and rounds < max_rounds):
        for name, fn in fns.items():
            for i in range(block):
                with watch:
                    fn()
                if i >= skip:
                    times[name].append(watch.seconds)
        rounds += 1
    return {name: Timing(ts) for name, ts in times.items()}


# --- the environment ----------------------------------------------------------------------------------------
def loadavg() -> list[str] | None:
    path = Path("/proc/loadavg")
    return path.read_text().split()[:3] if path.exists() else None


def cpu_pressure() -> float | None:
    """Share of the last 10 s in which runnable work waited for a CPU (Linux PSI "some avg10"), in %.

    On this project's shared 2-core host it swings from 0 to >90 within a minute; above ~20 every small op
    can take milliseconds, so a CPU timing taken then says little.
    """
    path = Path("/proc/pressure/cpu")
    if not path.exists():
        return None
    first = path.read_text().split("\n")[0]
    return float(first.split("avg10=")[1].split()[0])


def wait_for_quiet(limit_pct: float = 20.0, max_wait_s: float = 300.0) -> float | None:
    """On CPU, wait (up to `max_wait_s`) until the CPU pressure is below `limit_pct`; returns the last reading."""
    deadline = time.perf_counter() + max_wait_s
    pressure = cpu_pressure()
    while pressure is not None and pressure > limit_pct and time.perf_counter() < deadline and \
            not torch.cuda.is_available():
        time.sleep(5)
        pressure = cpu_pressure()
    return pressure


def cpu_info() -> dict[str, Any]:
    """The CPU's model, which of `CPU_FLAGS` it has, its core count and the cores this process may use."""
    from hf_vlm_gptq.ops.backends.dispatch_cache import cpu_identity  # what the CPU dispatch is keyed on

    model, flags = cpu_identity()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "flags": [f for f in CPU_FLAGS if f in flags], "cores": os.cpu_count(),
            "usable_cores": usable}


def device_tag() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def env_info() -> dict[str, Any]:
    """Versions, CPU and device, and what says whether a CPU timing was disturbed: load average, CPU
    pressure (PSI) and this process's major page faults."""
    import resource

    import transformers

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "cpu": cpu_info(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "loadavg": loadavg(), "cpu_pressure_avg10": cpu_pressure(), "major_page_faults": usage.ru_majflt}


def env_markdown(env: dict[str, Any]) -> str:
    """The environment section of a results file."""
    cpu = env["cpu"]
    return "\n".join([
        "## Environment", "",
        f"- {env['date']}: python {env['python']}, torch {env['torch']}, transformers {env['transformers']}",
        f"- CPU: {cpu['model']}, {cpu['cores']} cores ({cpu['usable_cores']} usable, torch threads "
        f"{env['threads']}); flags: {' '.join(cpu['flags']) or '-'}",
        f"- GPU: {env['cuda'] or 'none'}",
        f"- load average {' '.join(env['loadavg'] or ['?'])}, CPU pressure (PSI avg10) "
        f"{env['cpu_pressure_avg10']} %, major page faults {env['major_page_faults']} (at the end of the run)",
    ])


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A temporary folder for a bench's models and checkpoints, removed when the bench ends, however it ends
    (an error, Ctrl-C, ``sys.exit``, a SIGTERM from ``timeout``): runs of a few hundred MB each must not pile
    up in /tmp."""
    def _exit_on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_DFL and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_term)
    try:
        with tempfile.TemporaryDirectory(prefix=prefix, ignore_cleanup_errors=True) as tmp:
            yield Path(tmp)
    finally:
        if previous is signal.SIG_DFL and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


def write_results(stem: str, payload: dict[str, Any], markdown: str, *, device_suffix: bool = True,
                  path: Path | None = None) -> Path:
    """`<RESULTS>/<stem>[_<$BENCH_RESULTS_TAG>]_<cpu|cuda>.{json,md}` (no suffix with ``device_suffix=False``;
    ``path``: that markdown file and the .json beside it); returns the markdown path.

    The JSON is ``payload`` with an ``environment`` entry (`env_info` now), the markdown ``markdown`` with
    the same environment appended.
    """
    if path is None:
        if os.environ.get("BENCH_RESULTS_TAG"):
            stem = f"{stem}_{os.environ['BENCH_RESULTS_TAG']}"
        path = RESULTS / (f"{stem}_{device_tag()}.md" if device_suffix else f"{stem}.md")
    path.parent.mkdir(parents=True, exist_ok=True)
    env = env_info()
    path.with_suffix(".json").write_text(json.dumps({**payload, "environment": env}, indent=2, default=str) + "\n")
    path.write_text(markdown.rstrip() + "\n\n" + env_markdown(env) + "\n")
    return path


def timing_cells(times: dict[str, Timing], unit: str = "s") -> dict[str, float]:
    """``{name}_{unit}_p10`` and ``{name}_{unit}_median`` of each variant (``unit``: "s" or "ms")."""
    scale = {"s": 1.0, "ms": 1e3}[unit]
    return {f"{name}_{unit}_{stat}": getattr(t, stat) * scale for name, t in times.items() for stat in ("p10", "median")}


def run_cpu_rows(stem: str, params: Iterable[Any], bench_row: Callable[[Any], dict],
                 render: Callable[[list[dict]], str], log: logging.Logger) -> Path:
    """A CPU micro-bench: one row per parameter, the rendered table logged and written (`write_results`) under
    the command, the CPU's model and flags, the thread count and the load average before and after."""
    load_before = loadavg()
    rows = [bench_row(p) for p in params]
    table = render(rows)
    log.info("%s", table)
    cpu, load_after, threads = cpu_info(), loadavg(), torch.get_num_threads()
    payload = {"rows": rows, "cpu": cpu, "torch_threads": threads, "loadavg_before": load_before,
               "loadavg_after": load_after}
    path = write_results(stem, payload, f"# python -m bench.{stem} ({device_tag()}; CPU: {cpu['model']}, flags "
                                        f"{' '.join(cpu['flags'])}; {threads} threads; loadavg before {load_before}, "
                                        f"after {load_after})\n\n{table}\n")
    log.info("wrote %s", path)
    return path

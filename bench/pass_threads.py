"""The same small matmuls run in the main thread and in paused threads taking turns (the pattern of
``hf_vlm_gptq/stepped.py``: one thread per calibration call, each stopped before every sequential group),
side by side, on this CPU.

    BENCH_RESULTS_DIR=bench/results python -m bench.pass_threads   # writes pass_threads_<device>.{json,md}

A block's pass of a small model runs ``F.linear`` on ~148 rows; inside the paused passes those calls took about
twice their isolated time in a profile of the quantization. Here 32 "passes" (threads) each run 6 calls of
``F.linear(148 x 512 -> 2048)`` per step and stop; 5 steps each, in turn; against the same 960 calls in the
main thread. Rounds alternate (best of 3 each); the ratio above 1 is what each switch of thread costs
(OpenMP gives every new calling thread a team of its own; the team of the thread that just stopped spins a
while at its barrier).
"""

from __future__ import annotations

import logging
import threading
import time

import torch
import torch.nn.functional as F

from bench.harness import cpu_pressure, device_tag, loadavg, write_results

logger = logging.getLogger("bench.pass_threads")
PASSES, STEPS, CALLS = 32, 5, 6


class _Pass:
    def __init__(self, body) -> None:
        self.body, self.steps = body, 0
        self.go, self.stopped = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while self.steps < STEPS:
            self.body()
            self.steps += 1
            self.stopped.set()
            self.go.wait()
            self.go.clear()

    def step(self) -> None:
        self.stopped.clear()
        if self.thread.ident is None:
            self.thread.start()
        else:
            self.go.set()
        self.stopped.wait()


def _seconds_per_call(in_threads: bool, body) -> float:
    start = time.perf_counter()
    if in_threads:
        passes = [_Pass(body) for _ in range(PASSES)]
        for _ in range(STEPS):
            for one in passes:
                one.step()
        for one in passes:
            one.go.set()
            one.thread.join()
    else:
        for _ in range(STEPS * PASSES):
            body()
    return (time.perf_counter() - start) / (STEPS * PASSES * CALLS)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    x, w = torch.randn(148, 512), torch.randn(2048, 512)

    def body() -> None:
        for _ in range(CALLS):
            F.linear(x, w)

    body()
    before = (loadavg(), cpu_pressure())
    best = {"main thread": float("inf"), "paused threads in turn": float("inf")}
    for _ in range(3):
        best["main thread"] = min(best["main thread"], _seconds_per_call(False, body))
        best["paused threads in turn"] = min(best["paused threads in turn"], _seconds_per_call(True, body))
    ratio = best["paused threads in turn"] / best["main thread"]
    table = "| where | ms per F.linear(148x512 -> 2048) |\n|---|---|\n" + "".join(
        f"| {k} | {v * 1e3:.2f} |\n" for k, v in best.items())
    text = (f"# python -m bench.pass_threads ({device_tag()}, torch threads {torch.get_num_threads()}, loadavg "
            f"before {before[0]}, CPU pressure {before[1]} %)\n\n{table}\npaused threads / main thread: "
            f"**{ratio:.2f}x**\n")
    logger.info("%s", text)
    path = write_results("pass_threads", {"seconds_per_call": best, "ratio": ratio, "loadavg_before": before[0],
                                          "cpu_pressure_before": before[1]}, text)
    logger.info("wrote %s", path)


if __name__ == "__main__":
    main()

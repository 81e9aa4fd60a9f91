"""The same small matmuls run in the main thread and through ``hf_vlm_gptq/stepped.py``'s paused passes (one
greenlet per calibration call, each stopped before every sequential group), side by side, on this CPU.

    BENCH_RESULTS_DIR=bench/results python -m bench.pass_threads   # writes pass_threads_<device>.{json,md}

A block's pass of a small model runs ``F.linear`` on ~148 rows. Here a toy block of 6 linears 512 -> 512 (each
its own sequential group, nothing solved) runs on 32 calls of 148 rows through ``forward_in_steps``, against
the same block on the same calls in the main thread. Rounds alternate (best of 3 each); the ratio above 1 is
what the stops cost (with one OS thread per pass, as before, two thread wake-ups per stop: 2.4-2.8x here)."""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from bench.harness import cpu_pressure, device_tag, loadavg, write_results
from hf_vlm_gptq.stepped import Lane, forward_in_steps

logger = logging.getLogger("bench.pass_threads")
CALLS, ROWS, WIDTH, LAYERS = 32, 148, 512, 6


def _seconds_per_linear(block: nn.Sequential, hidden: list[torch.Tensor], stepped: bool) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        if stepped:
            lane = Lane(block, [((h,), {}) for h in hidden], [[layer] for layer in block], lambda k, args: None)
            forward_in_steps([lane], lambda k: None)
        else:
            for h in hidden:
                block(h)
    return (time.perf_counter() - start) / (CALLS * LAYERS)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    block = nn.Sequential(*(nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS))).eval()
    hidden = [torch.randn(ROWS, WIDTH) * 0.05 for _ in range(CALLS)]
    _seconds_per_linear(block, hidden, stepped=False)
    before = (loadavg(), cpu_pressure())
    best = {"main thread": float("inf"), "paused passes (stepped.py)": float("inf")}
    for _ in range(3):
        best["main thread"] = min(best["main thread"], _seconds_per_linear(block, hidden, stepped=False))
        best["paused passes (stepped.py)"] = min(best["paused passes (stepped.py)"],
                                                 _seconds_per_linear(block, hidden, stepped=True))
    ratio = best["paused passes (stepped.py)"] / best["main thread"]
    table = f"| where | ms per F.linear({ROWS}x{WIDTH} -> {WIDTH}) |\n|---|---|\n" + "".join(
        f"| {k} | {v * 1e3:.3f} |\n" for k, v in best.items())
    text = (f"# python -m bench.pass_threads ({device_tag()}, torch threads {torch.get_num_threads()}, loadavg "
            f"before {before[0]}, CPU pressure {before[1]} %)\n\n{table}\npaused passes / main thread: "
            f"**{ratio:.2f}x**\n")
    logger.info("%s", text)
    path = write_results("pass_threads", {"seconds_per_linear": best, "ratio": ratio, "loadavg_before": before[0],
                                          "cpu_pressure_before": before[1]}, text)
    logger.info("wrote %s", path)


if __name__ == "__main__":
    main()

"""One GPTQ solve on CPU from fresh memory vs from the matrices of the solve before (ops/scratch.py).

    python -m bench.ops_solve_memory     # ~1-2 minutes on 2 cores; writes ops_solve_memory_cpu.{json,md}

``gptq_quantize_shared`` of a [1024, n] float32 weight, 4-bit g128 with the MSE clip search, on a Hessian of
random correlated inputs, at widths 2048 (the small config's MLP down), 4096 and 8192 (Qwen2-VL-7B's MLP
down is 18944 wide: the same trend, further). Variants, timed in turns (p10 and median of the rounds): the
solve's work matrices from fresh memory (every solve before this change), and from a ``MatrixPool`` that
kept the previous solve's (what the pipeline does from a block's second solve of a shape on). Minor page
faults per solve are counted next to the time: on a VM each fault of fresh memory costs microseconds.
"""

from __future__ import annotations

import logging
import resource
import statistics

import torch

from bench.harness import round_robin, run_cpu_rows, timing_cells
from hf_vlm_gptq.ops import gptq_quantize_shared
from hf_vlm_gptq.ops.scratch import MatrixPool

logger = logging.getLogger("bench.ops_solve_memory")
WIDTHS = (2048, 4096, 8192)
OUT = 1024


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def bench_width(n: int) -> dict:
    gen = torch.Generator().manual_seed(n)
    mix = torch.randn(n // 4, n, generator=gen)
    x = torch.randn(2 * n, n // 4, generator=gen) @ mix + 0.3 * torch.randn(2 * n, n, generator=gen)
    hessian = (2.0 / x.shape[0]) * (x.t() @ x)
    del x, mix
    weight = torch.randn(OUT, n, generator=gen)
    pool = MatrixPool()
    faults: dict[str, list[int]] = {"fresh": [], "pooled": []}

    def solve(name: str, p: MatrixPool | None):
        def fn() -> None:
            before = _faults()
            gptq_quantize_shared([weight], hessian, bits=4, group_size=128, clip=True, pool=p)
            faults[name].append(_faults() - before)
        return fn

    fns = {"fresh": solve("fresh", None), "pooled": solve("pooled", pool)}
    times = round_robin(fns, device="cpu", min_time=6.0 if n < 8192 else 20.0, warmup=1, min_rounds=3)
    row = {"width": n, "out": OUT, "kept_mb": pool.kept_bytes / 2**20, **timing_cells(times),
           "speedup_p10": times["fresh"].p10 / times["pooled"].p10,
           "speedup_median": times["fresh"].median / times["pooled"].median}
    row.update({f"{name}_faults_median": int(statistics.median(counts)) for name, counts in faults.items()})
    logger.info("%s", row)
    return row


def render(rows: list[dict]) -> str:
    lines = [f"gptq_quantize_shared, weight [{OUT}, n] float32, 4-bit g128, MSE clip; s per solve (p10 / median "
             "of rounds in turns) and minor page faults per solve (median)", "",
             "| n | fresh matrices | pooled matrices | speedup (p10 / median) | faults fresh | faults pooled |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['width']} | {r['fresh_s_p10']:.3f} / {r['fresh_s_median']:.3f} | "
                     f"{r['pooled_s_p10']:.3f} / {r['pooled_s_median']:.3f} | {r['speedup_p10']:.2f}x / "
                     f"{r['speedup_median']:.2f}x | {r['fresh_faults_median']} | {r['pooled_faults_median']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_cpu_rows("ops_solve_memory", WIDTHS, bench_width, render, logger)

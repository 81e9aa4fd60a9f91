"""Hessian accumulation on CPU: bf16 rows through the bf16 kernel (ops/cpu_gram.py) vs the float32 path.

    python -m bench.ops_hessian     # ~30 s on 2 cores; writes ops_hessian_cpu.{json,md} (bench.harness)
    python -m bench.ops --hessian   # the same

``HessianAccumulator`` fed 4096 bf16 rows in batches of 148 (a calibration call's tokens) at widths 512
(q/k/v, gate/up inputs of a small LLM), 1280 (a vision MLP), 2048 and 3584 (Qwen2-VL-7B's hidden size), the
matrix read at the end. Variants, timed in turns (p10 and median of the rounds): bf16 rows through the
kernel (the default where it is available and the faster of the two, ``hessian.gram_kernel_wins``; forced
here), the same bf16 rows on the float32 path (what bf16 rows take without it), and float32 rows of the same values on the float32 path (what a float32
model's rows take). The error column is the largest difference from the float64 matrix of the same values,
relative to its largest entry.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from bench.harness import round_robin, run_cpu_rows, timing_cells
from hf_vlm_gptq.ops import HessianAccumulator, cpu_gram
from hf_vlm_gptq.ops import hessian as H

logger = logging.getLogger("bench.ops_hessian")
WIDTHS = (512, 1280, 2048, 3584)
ROWS, BATCH = 4096, 148


@contextlib.contextmanager
def kernel_chosen(wins: bool):
    """bf16 rows through the kernel (``wins``) or the float32 path, whatever ``hessian.gram_kernel_wins``
    measured on this CPU."""
    threads = torch.get_num_threads()
    saved = H._gram_wins.get(threads)
    H._gram_wins[threads] = wins
    try:
        yield
    finally:
        if saved is None:
            H._gram_wins.pop(threads, None)
        else:
            H._gram_wins[threads] = saved


def _accumulate(batches: list[torch.Tensor], width: int) -> torch.Tensor:
    acc = HessianAccumulator(width)
    for b in batches:
        acc.add_batch(b)
    return acc.hessian


def bench_width(width: int) -> dict:
    gen = torch.Generator().manual_seed(width)
    x = (torch.randn(ROWS, width, generator=gen) * torch.rand(width, generator=gen) * 3).bfloat16()
    bf16 = list(x.split(BATCH))
    fp32 = [b.float() for b in bf16]
    exact = (2.0 / ROWS) * (x.double().t() @ x.double())

    def through(wins: bool) -> torch.Tensor:
        with kernel_chosen(wins):
            return _accumulate(bf16, width)

    fns = {"kernel": lambda: through(True), "bf16 float32 path": lambda: through(False),
           "fp32 float32 path": lambda: _accumulate(fp32, width)}
    errors = {name: float((fn().double() - exact).abs().max() / exact.abs().max()) for name, fn in fns.items()}
    times = round_robin(fns, device="cpu", min_time=4.0, warmup=1, min_rounds=5)
    row = {"width": width, "rows": ROWS, "kernel_used": H.gram_takes(bf16[0], torch.empty(width, width)),
           **timing_cells(times, "ms"), **{f"{name}_rel_err": err for name, err in errors.items()}}
    row["speedup_vs_bf16_float32_path"] = times["bf16 float32 path"].p10 / times["kernel"].p10
    row["speedup_vs_fp32_rows"] = times["fp32 float32 path"].p10 / times["kernel"].p10
    logger.info("%s", row)
    return row


def render(rows: list[dict]) -> str:
    lines = [f"HessianAccumulator, {ROWS} rows in batches of {BATCH}, ms (p10 / median of rounds in turns); "
             "error = max |H - H_float64| / max |H_float64|", "",
             "| width | bf16 rows, kernel | bf16 rows, float32 path | fp32 rows, float32 path | kernel speedup "
             "(vs bf16 / fp32 path) | error kernel / float32 path |", "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[f'{n}_ms_p10']:.1f} / {r[f'{n}_ms_median']:.1f}"
                 for n in ("kernel", "bf16 float32 path", "fp32 float32 path")]
        lines.append(f"| {r['width']} | {' | '.join(cells)} | {r['speedup_vs_bf16_float32_path']:.2f}x / "
                     f"{r['speedup_vs_fp32_rows']:.2f}x | {r['kernel_rel_err']:.1e} / "
                     f"{r['bf16 float32 path_rel_err']:.1e} |")
    reason = cpu_gram.unavailable_reason(cpu_gram._check)
    if reason is not None:
        lines.append(f"\nThe kernel is unavailable here ({reason}): the first column is the float32 path too.")
    elif rows and not rows[0]["kernel_used"]:
        lines.append("\nThe kernel loses to the float32 path on this CPU (`hessian.gram_kernel_wins`), so bf16 "
                     "rows take the float32 path by default; the first column forces the kernel.")
    return "\n".join(lines)


def run() -> None:
    run_cpu_rows("ops_hessian", WIDTHS, bench_width, render, logger)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run()

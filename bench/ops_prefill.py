"""Packed layers at prefill and vision-tower batch sizes on CPU: the default path vs dense bf16.

    python -m bench.ops_prefill                         # ~2-3 minutes on 2 cores; writes ops_prefill_cpu.{json,md}
    python -m bench.ops_prefill --forced amx,dequant    # only these backends forced (~1 minute)

A vision tower multiplies every patch of an image at once (a 1344 x 1344 picture is 9216 patches before
Qwen2-VL's merger) and a prompt's prefill every token, so a layer there sees 1024-4096 rows. Shapes: Qwen2-VL's
ViT (width 1280: attention projection 1280x1280, fused qkv 3840x1280, MLP 5120x1280 and 1280x5120) and a
4096x4096 LLM layer; 4-bit g128, bf16 activations, at 256 / 1024 / 4096 rows. Variants, timed in turns
(p10 and median): dense bf16 ``nn.Linear`` holding the dequantized weight, ``kernel="auto"`` (the measured
dispatch), and each CPU backend that serves the layer forced (``--forced``: only those named; the kernels
built for few rows take 5-10x dense here and, taken in turns, slow the variants after them down too). The
results file records the CPU model and flags.
"""

from __future__ import annotations

import argparse
import logging

import torch
from torch import nn

from bench.harness import round_robin, run_cpu_rows, timing_cells
from hf_vlm_gptq.ops import QuantLinear, rtn_quantize
from hf_vlm_gptq.ops.backends import BACKENDS, DISPATCH

logger = logging.getLogger("bench.ops_prefill")
SHAPES = ((1280, 1280), (3840, 1280), (5120, 1280), (1280, 5120), (4096, 4096))  # (out, in)
BATCHES = (256, 1024, 4096)


def bench_shape(shape: tuple[int, int], only: set[str] | None = None) -> list[dict]:
    out_f, in_f = shape
    gen = torch.Generator().manual_seed(out_f + in_f)
    result = rtn_quantize(torch.randn(out_f, in_f, generator=gen) * 0.02, bits=4, group_size=128)
    with torch.no_grad():
        auto = QuantLinear.from_result(result, None, torch.bfloat16)
        dense = nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16)
        dense.weight.copy_(auto.dequantize_weight(torch.bfloat16))
    forced = {}
    for name in DISPATCH["cpu"]:
        if (only is None or name in only) and BACKENDS[name].unavailable_reason(auto, torch.bfloat16,
                                                                                 torch.device("cpu")) is None:
            with torch.no_grad():
                module = QuantLinear.from_result(result, None, torch.bfloat16)
            module.kernel = name
            forced[name] = module
    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, in_f, generator=gen).to(torch.bfloat16)
        fns = {"dense_bf16": lambda x=x: dense(x), "auto": lambda x=x: auto(x)}
        fns.update({f"{name}_forced": (lambda m=m, x=x: m(x)) for name, m in forced.items()})
        with torch.inference_mode():
            times = round_robin(fns, device="cpu", min_time=3.0, warmup=2, min_rounds=5)
        row = {"shape": f"{out_f}x{in_f}", "batch": batch, **timing_cells(times, "ms"),
               "speedup_p10": times["dense_bf16"].p10 / times["auto"].p10}
        logger.info("%s", row)
        rows.append(row)
    return rows


def render(groups: list[list[dict]]) -> str:
    rows = [r for group in groups for r in group]
    forced = sorted({k.removesuffix("_ms_p10") for r in rows for k in r if k.endswith("_forced_ms_p10")})
    lines = ["4-bit g128 QuantLinear vs dense bf16 nn.Linear at prefill batch sizes, ms per call (p10 of calls "
             "in turns); speedup = dense / auto", "",
             "| layer | rows | dense bf16 | auto | speedup | " + " | ".join(forced) + " |",
             "|---|---|---|---|---|" + "---|" * len(forced)]
    for r in rows:
        cells = [f"{r[f'{name}_ms_p10']:.3f}" if f"{name}_ms_p10" in r else "-" for name in forced]
        lines.append(f"| {r['shape']} | {r['batch']} | {r['dense_bf16_ms_p10']:.3f} | {r['auto_ms_p10']:.3f} | "
                     f"{r['speedup_p10']:.2f}x | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forced", default=None, help="comma-separated backends to force (default: every one)")
    args = parser.parse_args()
    only = None if args.forced is None else set(args.forced.split(","))
    unknown = (only or set()) - set(DISPATCH["cpu"])
    if unknown:
        parser.error(f"--forced names no CPU backend: {sorted(unknown)} (choose from {list(DISPATCH['cpu'])})")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_cpu_rows("ops_prefill", SHAPES, lambda shape: bench_shape(shape, only), render, logger)


if __name__ == "__main__":
    main()

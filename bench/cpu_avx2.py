"""The AVX2 low-bit CPU kernel (ops/cpu_avx2.py) against dense nn.Linear, side by side, on this CPU.

    BENCH_RESULTS_DIR=bench/results python -m bench.cpu_avx2   # writes cpu_avx2_<device>.{json,md}

One 4096x4096 layer, 4 bits, group 128, batch (rows) 1 / 4 / 8 / 16 / 64 / 256 / 1024, one layer called
again and again ("hot"), with one thread and with torch's thread count (on a shared host one thread is the
steadier measurement: a thread of a team waits for its descheduled peer). Variants: dense ``nn.Linear`` in bf16 and fp32 (the weight dequantized once), the AVX2
kernel forced with bf16 and fp32 inputs, torch's int4 kernel (bf16, up to 256 rows), dequantize + matmul on
every call (bf16), and the default policy ("auto", no dense cache) in bf16 and fp32. They are timed in
turns (``harness.round_robin``) and the 10th percentile is reported; ratios are dense time / variant time
(above 1: faster than dense). The host's load average and CPU pressure are recorded before and after.
"""

from __future__ import annotations

import json
import logging

import torch
from torch import nn

from bench.harness import cpu_pressure, device_tag, loadavg, round_robin, write_results
from hf_vlm_gptq.ops import QuantLinear, rtn_quantize
from hf_vlm_gptq.ops.backends import BACKENDS, DISPATCH, MAX_BATCH, LayerShape

logger = logging.getLogger("bench.cpu_avx2")
N, BITS, GROUP = 4096, 4, 128
BATCHES = (1, 4, 8, 16, 64, 256, 1024)
INT4_MAX_BATCH = 256  # a matrix-vector kernel: seconds per call beyond this
DENSE = ("dense_bf16", "dense_fp32")


def _variants() -> dict[str, tuple[nn.Module, torch.dtype]]:
    torch.manual_seed(0)
    result = rtn_quantize(torch.randn(N, N), bits=BITS, group_size=GROUP)

    def packed(kernel: str, dtype: torch.dtype) -> tuple[nn.Module, torch.dtype]:
        module = QuantLinear.from_result(result, None, dtype)
        module.kernel, module.cache_dequantized = kernel, False
        return module, dtype

    def dense(dtype: torch.dtype) -> tuple[nn.Module, torch.dtype]:
        linear = nn.Linear(N, N, bias=False, dtype=dtype)
        linear.weight.data.copy_(result.dequantize().to(dtype))
        return linear, dtype

    return {
        "dense_bf16": dense(torch.bfloat16), "dense_fp32": dense(torch.float32),
        "avx2_bf16": packed("avx2", torch.bfloat16), "avx2_fp32": packed("avx2", torch.float32),
        "int4_bf16": packed("int4", torch.bfloat16), "dequant_bf16": packed("dequant", torch.bfloat16),
        "auto_bf16": packed("auto", torch.bfloat16), "auto_fp32": packed("auto", torch.float32),
    }


def bench(threads: int) -> list[dict]:
    variants = _variants()
    rows = []
    with torch.inference_mode():
        for batch in BATCHES:
            x = torch.randn(batch, N)
            inputs = {torch.bfloat16: x.bfloat16(), torch.float32: x}
            fns = {name: (lambda m=m, x=inputs[dt]: m(x)) for name, (m, dt) in variants.items()
                   if not (name == "int4_bf16" and batch > INT4_MAX_BATCH)}
            timing = round_robin(fns, device="cpu", min_time=2.0 if batch <= 64 else 1.0, block=3, skip=1,
                                 warmup=1, min_rounds=3)
            row = {"threads": threads, "batch": batch, "load_before": loadavg()}
            for name, t in timing.items():
                row[f"{name}_ms"], row[f"{name}_median_ms"] = t.p10 * 1e3, t.median * 1e3
            for name in timing:
                for dense in DENSE:
                    row[f"{name}_vs_{dense}"] = row[f"{dense}_ms"] / row[f"{name}_ms"]
            bf16 = [n for n in timing if n.endswith("bf16") and not n.startswith("auto")]
            row["fastest_bf16"] = min(bf16, key=lambda n: row[f"{n}_ms"])
            row["load_after"] = loadavg()
            rows.append(row)
            logger.info("batch %d: %s", batch, {k: round(v, 2) for k, v in row.items() if k.endswith("_ms")})
    return rows


def render(rows: list[dict]) -> str:
    names = [k[:-3] for k in rows[0] if k.endswith("_ms") and not k.endswith("median_ms")]
    head = "| threads | batch | " + " | ".join(f"{n} ms" for n in names) + " | avx2 bf16 / dense bf16 | avx2 fp32 / dense " \
           "fp32 | auto bf16 / dense bf16 | fastest bf16 path | load avg |"
    lines = [head, "|" + "---|" * (len(names) + 7)]
    for r in rows:
        cells = [f"{r[f'{n}_ms']:.2f}" if f"{n}_ms" in r else "-" for n in names]
        lines.append(f"| {r['threads']} | {r['batch']} | " + " | ".join(cells) + f" | {r['avx2_bf16_vs_dense_bf16']:.2f}x | "
                     f"{r['avx2_fp32_vs_dense_fp32']:.2f}x | {r['auto_bf16_vs_dense_bf16']:.2f}x | "
                     f"{r['fastest_bf16']} | {' '.join(r['load_before'] or [])} |")
    return "\n".join(lines)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    reason = BACKENDS["avx2"].unavailable_reason(LayerShape(BITS, GROUP, N, N), torch.bfloat16, torch.device("cpu"))
    if reason is not None:
        raise SystemExit(f"the AVX2 kernel is unavailable here: {reason}")
    pressure, default = cpu_pressure(), torch.get_num_threads()
    rows = []
    for threads in sorted({1, default}):
        torch.set_num_threads(threads)
        rows += bench(threads)
    torch.set_num_threads(default)
    meta = {"threads": sorted({1, default}), "cpu_pressure_before": pressure, "cpu_pressure_after": cpu_pressure(),
            "dispatch": DISPATCH["cpu"], "max_batch": MAX_BATCH["cpu"]}
    text = (f"# AVX2 low-bit CPU kernel vs dense nn.Linear ({device_tag()})\n\n"
            f"4096x4096, {BITS}-bit, group {GROUP}, one layer (hot); 10th percentile of interleaved rounds; "
            "ratios: dense ms / variant ms (above 1: faster than dense).\n\n" + render(rows)
            + f"\n\n`{json.dumps(meta)}`\n")
    path = write_results("cpu_avx2", {"rows": rows, **meta}, text)
    logger.info("wrote %s", path)


if __name__ == "__main__":
    main()

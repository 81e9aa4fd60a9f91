"""The FMA low-bit CPU kernel (ops/cpu_avx2.py: its AVX2 and AVX-512 builds) against dense nn.Linear and
torch's int4 kernel, side by side, on this CPU.

    BENCH_RESULTS_DIR=bench/results python -m bench.cpu_avx2   # writes cpu_avx2_<device>.{json,md}

4096x4096 layers, group 128: 4 bits (batch 1 / 4 / 8 / 16 / 64 / 256 / 1024 rows, with torch's thread count
and with one thread: on a shared host one thread is the steadier measurement, as a thread of a team waits for
its descheduled peer), then 4-bit act-order, 2 and 8 bits (1 / 4 / 16 / 64 / 256 rows, torch's thread count).
One layer called again and again ("hot"). Variants: dense ``nn.Linear`` in bf16 and fp32 (the weight
dequantized once), each build of the kernel this CPU runs (bf16 inputs, called directly), the kernel as the
default policy picks it with fp32 inputs, torch's int4 kernel (4 bits, bf16, up to 256 rows), dequantize +
matmul on every call (4 bits, bf16), and the default policy ("auto", no dense cache) in bf16. They are timed
in turns (``harness.round_robin``) and the 10th percentile is reported; ratios are dense time / variant time
(above 1: faster than dense). The host's load average and CPU pressure are recorded before and after.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable

import torch
from torch import nn

from bench.harness import cpu_pressure, device_tag, loadavg, round_robin, write_results
from hf_vlm_gptq.ops import QuantLinear, cpu_avx2, gptq_quantize, rtn_quantize
from hf_vlm_gptq.ops.backends import BACKENDS, DISPATCH, MAX_BATCH, LayerShape

logger = logging.getLogger("bench.cpu_avx2")
N, GROUP = 4096, 128
BATCHES = (1, 4, 8, 16, 64, 256, 1024)
OTHER_BATCHES = (1, 4, 16, 64, 256)
# (label, bits, act-order, batches, thread counts: "default" and/or 1)
LAYERS = (("4-bit", 4, False, BATCHES, ("default", 1)), ("4-bit act-order", 4, True, OTHER_BATCHES, ("default",)),
          ("2-bit", 2, False, OTHER_BATCHES, ("default",)), ("8-bit", 8, False, OTHER_BATCHES, ("default",)))
INT4_MAX_BATCH = 256  # a matrix-vector kernel: seconds per call beyond this


def _result(bits: int, act_order: bool):
    torch.manual_seed(0)
    w = torch.randn(N, N)
    if not act_order:
        return rtn_quantize(w, bits=bits, group_size=GROUP)
    x = torch.randn(2048, N) * torch.rand(N).add_(0.1)  # uneven column scales: act-order reorders the groups
    return gptq_quantize(w, x.T @ x / 2048, bits=bits, group_size=GROUP, act_order=True)


def _variants(bits: int, act_order: bool, builds: dict[str, Callable]) -> dict[str, Callable[[torch.Tensor], object]]:
    """``{name: fn(x)}``, x the bf16 input (fp32 variants convert it once, outside the timing)."""
    result = _result(bits, act_order)

    def packed(kernel: str, dtype: torch.dtype) -> QuantLinear:
        module = QuantLinear.from_result(result, None, dtype)
        module.kernel, module.cache_dequantized = kernel, False
        return module

    def dense(dtype: torch.dtype) -> nn.Linear:
        linear = nn.Linear(N, N, bias=False, dtype=dtype)
        linear.weight.data.copy_(result.dequantize().to(dtype))
        return linear

    fma = packed("avx2", torch.bfloat16)
    weights = fma._prepare("avx2", torch.empty(1, N, dtype=torch.bfloat16))  # the backend's layout (sorted copy)
    variants: dict[str, Callable] = {"dense_bf16": dense(torch.bfloat16), "dense_fp32": dense(torch.float32)}
    for name, fn in builds.items():
        variants[f"{name.removeprefix('lowbit_gemm_')}_bf16"] = (
            lambda x, fn=fn: cpu_avx2.run_build(fn, x, weights.fused, None, weights.input_order))
    variants["fma_fp32"] = packed("avx2", torch.float32)
    if bits == 4:
        variants["int4_bf16"] = packed("int4", torch.bfloat16)
        variants["dequant_bf16"] = packed("dequant", torch.bfloat16)
    variants["auto_bf16"] = packed("auto", torch.bfloat16)
    return variants


def bench(label: str, bits: int, act_order: bool, batches: tuple[int, ...], threads: int,
          builds: dict[str, Callable]) -> list[dict]:
    variants = _variants(bits, act_order, builds)
    rows = []
    with torch.inference_mode():
        for batch in batches:
            x = torch.randn(batch, N)
            inputs = {"bf16": x.bfloat16(), "fp32": x}
            fns = {name: functools.partial(fn, inputs[name.rsplit("_", 1)[1]]) for name, fn in variants.items()
                   if not (name == "int4_bf16" and batch > INT4_MAX_BATCH)}
            timing = round_robin(fns, device="cpu", min_time=1.5 if batch <= 64 else 0.8, block=3, skip=1,
                                 warmup=1, min_rounds=3)
            row = {"layer": label, "threads": threads, "batch": batch, "load_before": loadavg()}
            for name, t in timing.items():
                row[f"{name}_ms"], row[f"{name}_median_ms"] = t.p10 * 1e3, t.median * 1e3
            bf16 = [n for n in timing if n.endswith("bf16") and not n.startswith(("auto", "dense"))]
            row["fastest_bf16"] = min(bf16, key=lambda n: row[f"{n}_ms"])
            row["load_after"] = loadavg()
            rows.append(row)
            logger.info("%s, %d threads, batch %d: %s", label, threads, batch,
                        {k: round(v, 2) for k, v in row.items() if k.endswith("_ms") and "median" not in k})
    return rows


def render(rows: list[dict]) -> str:
    """One table per layer: ms per variant, then each bf16 variant's ratio to dense bf16 (fp32 to fp32)."""
    out = []
    for label in dict.fromkeys(r["layer"] for r in rows):
        part = [r for r in rows if r["layer"] == label]
        names = list(dict.fromkeys(k[:-3] for r in part for k in r if k.endswith("_ms") and "median" not in k))
        ratios = [n for n in names if not n.startswith("dense")]
        head = ("| threads | batch | " + " | ".join(f"{n} ms" for n in names) + " | "
                + " | ".join(f"{n} / dense" for n in ratios) + " | fastest bf16 path | load avg |")
        lines = [f"### {label}", "", head, "|" + "---|" * (len(names) + len(ratios) + 4)]
        for r in part:
            cells = [f"{r[f'{n}_ms']:.2f}" if f"{n}_ms" in r else "-" for n in names]
            for n in ratios:
                dense = r["dense_fp32_ms"] if n.endswith("fp32") else r["dense_bf16_ms"]
                cells.append(f"{dense / r[f'{n}_ms']:.2f}x" if f"{n}_ms" in r else "-")
            lines.append(f"| {r['threads']} | {r['batch']} | " + " | ".join(cells)
                         + f" | {r['fastest_bf16']} | {' '.join(r['load_before'] or [])} |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    reason = BACKENDS["avx2"].unavailable_reason(LayerShape(4, GROUP, N, N), torch.bfloat16, torch.device("cpu"))
    if reason is not None:
        raise SystemExit(f"the FMA kernel is unavailable here: {reason}")
    builds = cpu_avx2.builds()
    pressure, default = cpu_pressure(), torch.get_num_threads()
    rows = []
    for label, bits, act_order, batches, thread_counts in LAYERS:
        for threads in dict.fromkeys(default if t == "default" else t for t in thread_counts):
            torch.set_num_threads(threads)
            rows += bench(label, bits, act_order, batches, threads, builds)
    torch.set_num_threads(default)
    meta = {"builds": list(builds), "build_in_use": cpu_avx2.build_in_use(), "cpu_pressure_before": pressure,
            "cpu_pressure_after": cpu_pressure(), "dispatch": DISPATCH["cpu"], "max_batch": MAX_BATCH["cpu"]}
    text = (f"# FMA low-bit CPU kernel (AVX2 / AVX-512 builds) vs dense nn.Linear ({device_tag()})\n\n"
            f"4096x4096, group {GROUP}, one layer (hot); 10th percentile of interleaved rounds; ratios: dense ms / "
            "variant ms (above 1: faster than dense; fp32 variants against dense fp32). The build variants call "
            f"each build directly; the default policy serves with `{cpu_avx2.build_in_use()}`.\n\n" + render(rows)
            + f"\n\n`{json.dumps(meta)}`\n")
    path = write_results("cpu_avx2", {"rows": rows, **meta}, text)
    logger.info("wrote %s", path)


if __name__ == "__main__":
    main()

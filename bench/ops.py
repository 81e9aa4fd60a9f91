"""ops benchmark: GPTQ solve time vs a plain eager loop, and 4-bit QuantLinear vs dense bf16 Linear.

    python -m bench.ops            # ~2 minutes on 2 CPU cores; writes ops_<device>.{json,md} (bench.harness)
    python -m bench.ops --kernels  # only the CUDA kernel rows (bench/ops_kernels.py; ~60 s on an H200)
    python -m bench.ops --kernels --small   # those rows on tiny shapes (CPU: Triton interpreter, a dry run)
    python -m bench.ops --dispatch # only the measured-dispatch rows (bench/ops_dispatch.py; 1-5 minutes)
    python -m bench.ops --dequant  # only the dequantization rows (~30 s)
    python -m bench.ops --hessian  # only the CPU Hessian rows, bf16 kernel vs float32 path (bench/ops_hessian.py)

Solve: a 4096x4096 and a 4096->11008 layer (weight [11008, 4096]), 4-bit, group 128, symmetric, Hessian
from random correlated inputs. Ours is ``gptq_quantize`` end to end, including its exact proxy loss
``tr((W-Q) H (W-Q)^T)``; the reference is the textbook eager loop (blocks of 128 with lazy updates, a
Python loop over columns inside each block, Hessian inverse via cholesky -> cholesky_inverse -> cholesky),
timed alone and with the same proxy-loss evaluation so both sides deliver the same outputs. Best of 2.

Other bit widths: the same layer at 2 and 8 bits, batch 1 / 16 / 256 (hot), default path vs dense bf16 and
vs dequantize + matmul.

Matmul: a 4096x4096 layer, batch (rows) 1 / 4 / 16 / 64 / 256 / 1024, bf16 activations: dense bf16
``nn.Linear``, our default path ("auto": torch's int4 kernel up to a few rows, then the fused 4-bit GEMM on
CPUs that have it, the AMX kernel from a few rows on CPUs with AMX), auto with a dense cache, and each path
forced. The variants are timed
round-robin, call by call, and the 10th percentile is reported: the host is shared with other jobs, and
interleaving plus a low percentile keeps their load from landing on one variant only.

Dequantization: ``dequantize_weight`` of the 4096x4096 4-bit g128 layer to bf16 and fp32, the torch path
against the C kernel (``ops/cpu_dequant.py``), with 1 and 2 threads, in turns, p10 and median; each call
allocates its output as the library's callers do.

Then the dispatch rows of bench/ops_dispatch.py (the batch ranges measured on this host next to the table's,
and "auto" with measuring on and off vs dense bf16). With a GPU the run ends with the kernel rows of
bench/ops_kernels.py (fused Triton matmul vs torch int4 vs dense bf16 on 7B shapes, GPTQ sweep fused vs
torch loop, Hessian bf16 vs fp32 rows).
"""

from __future__ import annotations

import argparse
import json
import logging

import torch
from torch import nn

from bench._common import correlated_hessian
from bench.harness import Stopwatch, cpu_info, device_tag, loadavg, repeat, round_robin, write_results
from bench.ops_dispatch import run_dispatch
from bench.reference_gptq import fasterquant, proxy_loss
from hf_vlm_gptq.ops import QuantLinear, cpu_dequant, gptq_quantize, packing, rtn_quantize
from hf_vlm_gptq.ops.backends import BACKENDS, MAX_BATCH, LayerShape

logger = logging.getLogger("bench.ops")
BITS, GROUP = 4, 128
BATCHES = (1, 4, 16, 64, 256, 1024)
INT4_BENCH_MAX_BATCH = 256


def bench_solve(out_f: int, in_f: int) -> dict:
    """Our GPTQ solve against the reference loop on one layer, best of 2 each."""
    hessian = correlated_hessian(in_f, tokens=4096, seed=0)
    weight = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(1))
    ours_t = repeat(lambda: gptq_quantize(weight, hessian, bits=BITS, group_size=GROUP), reps=2)
    ref_t = repeat(lambda: fasterquant(weight, hessian, bits=BITS, group_size=GROUP, clip=False), reps=2)
    t_ours, ours, t_ref, q = ours_t.best, ours_t.result, ref_t.best, ref_t.result
    loss_t = repeat(lambda: proxy_loss(weight, q, hessian))
    ref_loss, t_loss = loss_t.result, loss_t.best
    return {
        "shape": f"{out_f}x{in_f}",
        "ours_s": t_ours,
        "reference_loop_s": t_ref,
        "reference_loop_plus_loss_s": t_ref + t_loss,
        "speedup_vs_loop": t_ref / t_ours,
        "speedup_vs_loop_plus_loss": (t_ref + t_loss) / t_ours,
        "damp_ours": ours.damp,
        "loss_ours": ours.loss,
        "loss_reference": ref_loss,
        "loss_rtn": rtn_quantize(weight, bits=BITS, group_size=GROUP, hessian=hessian).loss,
    }


def _time_calls(fns: dict, device: str, min_time: float, block: int, skip: int, warmup: int = 0) -> dict:
    """``{name: (p10, median)}`` in ms per call, the variants taken in turns (`harness.round_robin`)."""
    timings = round_robin(fns, device=device, min_time=min_time, block=block, skip=skip, warmup=warmup)
    return {name: (t.p10 * 1e3, t.median * 1e3) for name, t in timings.items()}


def bench_matmul(device: str, n: int = 4096, layers: int = 8) -> list[dict]:
    """Two regimes per batch size:

    * ``hot``: one layer called repeatedly -- its 4-bit weights (8.5 MB) stay in the CPU's last-level
      cache while the bf16 ones (32 MB) do not, which flatters the 4-bit side;
    * ``stream``: calls cycle through ``layers`` distinct layers, so every call streams its weights from
      memory, as decoding through a real model does.
    """
    torch.manual_seed(0)
    results = [rtn_quantize(torch.randn(n, n), bits=BITS, group_size=GROUP) for _ in range(layers)]

    def make(kind: str, i: int) -> nn.Module:
        if kind == "dense_bf16":
            return nn.Linear(n, n, bias=False, dtype=torch.bfloat16, device=device)
        module = QuantLinear.from_result(results[i], None, torch.bfloat16).to(device)
        module.kernel = {"int4_kernel": "int4", "fused_kernel": "fused", "amx_kernel": "amx",
                         "dequant_uncached": "dequant"}.get(kind, "auto")
        module.cache_dequantized = kind == "auto_cached"  # "auto" is the default policy: no dense cache
        return module

    kinds = ["dense_bf16", "auto", "auto_cached", "int4_kernel", "fused_kernel", "amx_kernel", "dequant_uncached"]
    for kind, backend in (("fused_kernel", "fused"), ("amx_kernel", "amx")):
        if BACKENDS[backend].unavailable_reason(LayerShape(BITS, GROUP, n, n), torch.bfloat16, torch.device(device)):
            kinds.remove(kind)
    stacks = {kind: [make(kind, i) for i in range(layers)] for kind in kinds}
    rows = []
    with torch.inference_mode():
        for batch in BATCHES:
            if batch > INT4_BENCH_MAX_BATCH:  # matrix-vector kernel: ~0.1 ms per row here, seconds per call
                stacks.pop("int4_kernel", None)
            x = torch.randn(batch, n, dtype=torch.bfloat16, device=device)
            for regime in ("hot", "stream"):
                if regime == "hot":
                    fns = {k: (lambda m=ms[0], x=x: m(x)) for k, ms in stacks.items()}
                    block, skip = 6, 2
                else:
                    cycle = {k: iter(range(10**9)) for k in stacks}
                    fns = {
                        k: (lambda ms=ms, c=cycle[k], x=x: ms[next(c) % layers](x))
                        for k, ms in stacks.items()
                    }
                    block, skip = layers, 0
                timing = _time_calls(  # the warm-up builds lazy kernel weights / caches outside the timing
                    fns, device, min_time=1.0 if batch >= 256 else 1.5, block=block, skip=skip, warmup=layers
                )
                row = {"device": device, "batch": batch, "regime": regime}
                for name, (p10, median) in timing.items():
                    row[f"{name}_ms"], row[f"{name}_median_ms"] = p10, median
                row["speedup_auto"] = row["dense_bf16_ms"] / row["auto_ms"]
                row["speedup_auto_cached"] = row["dense_bf16_ms"] / row["auto_cached_ms"]
                rows.append(row)
    return rows


def bench_bits(device: str, n: int = 4096) -> list[dict]:
    """Other bit widths (one layer, hot): 2 and 8 bits have no torch kernel; on CPU the fused kernel's GEMM
    path (or the AMX kernel, where the CPU has AMX) serves them, elsewhere dequantize + matmul."""
    rows = []
    dense = nn.Linear(n, n, bias=False, dtype=torch.bfloat16, device=device)
    with torch.inference_mode():
        for bits in (2, 8):
            result = rtn_quantize(torch.randn(n, n, generator=torch.Generator().manual_seed(bits)), bits=bits,
                                  group_size=GROUP)
            module = QuantLinear.from_result(result, None, torch.bfloat16).to(device)
            forced = QuantLinear.from_result(result, None, torch.bfloat16).to(device)
            forced.kernel = "dequant"
            for batch in (1, 16, 256):
                x = torch.randn(batch, n, dtype=torch.bfloat16, device=device)
                fns = {"dense_bf16": lambda x=x: dense(x), "auto": lambda x=x, m=module: m(x),
                       "dequant_uncached": lambda x=x, m=forced: m(x)}
                timing = _time_calls(fns, device, min_time=1.0, block=6, skip=2)
                row = {"device": device, "bits": bits, "batch": batch}
                for name, (p10, _median) in timing.items():
                    row[f"{name}_ms"] = p10
                row["speedup_auto"] = row["dense_bf16_ms"] / row["auto_ms"]
                rows.append(row)
    return rows


def _torch_dequant(module: QuantLinear, dtype: torch.dtype) -> torch.Tensor:
    """``module.dequantize_weight(dtype)`` through the torch path (the kernel's state set aside for the call)."""
    saved = cpu_dequant._state
    cpu_dequant._state = {"ready": True, "reason": "bench: the torch path"}
    try:
        return module.dequantize_weight(dtype)
    finally:
        cpu_dequant._state = saved


def bench_dequant(n: int = 4096) -> list[dict]:
    """The weight of one packed layer to bf16 / fp32: the torch path vs the CPU kernel, 1 and 2 threads."""
    module = QuantLinear.from_result(rtn_quantize(torch.randn(n, n, generator=torch.Generator().manual_seed(0)),
                                                  bits=BITS, group_size=GROUP), None, torch.bfloat16)
    reason = cpu_dequant.unavailable_reason(packing._dequant_kernel_check)
    if reason is not None:
        logger.info("dequantization rows skipped: %s", reason)
        return []
    rows, threads = [], torch.get_num_threads()
    try:
        for nthreads in (1, 2):
            torch.set_num_threads(nthreads)
            for dtype in (torch.bfloat16, torch.float32):
                fns = {"torch": lambda d=dtype: _torch_dequant(module, d),
                       "kernel": lambda d=dtype: module.dequantize_weight(d)}
                timing = round_robin(fns, device="cpu", min_time=2.0, block=3, skip=1, warmup=1, min_rounds=4)
                row = {"dtype": str(dtype).removeprefix("torch."), "threads": nthreads}
                for name, t in timing.items():
                    row[f"{name}_ms"], row[f"{name}_median_ms"] = t.p10 * 1e3, t.median * 1e3
                row["speedup"] = row["torch_ms"] / row["kernel_ms"]
                rows.append(row)
    finally:
        torch.set_num_threads(threads)
    return rows


def render_dequant(rows: list[dict]) -> str:
    lines = ["dequantize_weight of a 4096x4096 4-bit g128 layer, ms per call (p10 / median)", "",
             "| dtype | threads | torch path | kernel | speedup (p10) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['threads']} | {r['torch_ms']:.1f} / {r['torch_median_ms']:.1f} | "
                     f"{r['kernel_ms']:.1f} / {r['kernel_median_ms']:.1f} | {r['speedup']:.1f}x |")
    return "\n".join(lines)


def run_kernels(small: bool) -> None:
    """The kernel rows (bench.ops_kernels); ``small``: tiny shapes, in the Triton interpreter without CUDA."""
    if small:  # before the Triton kernel modules are imported: on a host without CUDA, use the interpreter
        from hf_vlm_gptq.testing.triton_interp import use_interpreter

        use_interpreter()
    from bench.ops_kernels import run_kernels as run

    run(small)


def render_bits(rows: list[dict]) -> str:
    lines = ["QuantLinear 4096x4096 at 2 and 8 bits (g128, hot) vs dense bf16, ms per call (p10)", "",
             "| device | bits | batch | dense bf16 | auto (default) | dequant+matmul | speedup default |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['device']} | {r['bits']} | {r['batch']} | {r['dense_bf16_ms']:.3f} | {r['auto_ms']:.3f} | "
                     f"{r['dequant_uncached_ms']:.3f} | {r['speedup_auto']:.2f}x |")
    return "\n".join(lines)


def render(solves: list[dict], matmuls: list[dict]) -> str:
    lines = [
        "GPTQ solve (4-bit, g128, sym), seconds, best of 2",
        "",
        "| layer (out x in) | ours (incl. exact loss) | eager loop | eager loop + same loss | "
        "speedup vs loop + loss | loss ours / loop / RTN |",
        "|---|---|---|---|---|---|",
    ]
    for s in solves:
        lines.append(
            f"| {s['shape']} | {s['ours_s']:.2f} | {s['reference_loop_s']:.2f} | "
            f"{s['reference_loop_plus_loss_s']:.2f} | {s['speedup_vs_loop_plus_loss']:.2f}x | "
            f"{s['loss_ours']:.4g} / {s['loss_reference']:.4g} / {s['loss_rtn']:.4g} |"
        )
    lines += [
        "",
        "QuantLinear 4096x4096 (4-bit g128) vs dense bf16 nn.Linear, ms per call (p10). hot: one layer "
        "called repeatedly; stream: 8 layers in turn (weights come from memory, as in a model)",
        "",
        "| device | batch | regime | dense bf16 | auto (default, no cache) | auto + dense cache | int4 kernel | "
        "fused kernel | AMX kernel | dequant+matmul | speedup default | speedup cached |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(m: dict, key: str) -> str:
        return f"{m[key]:.3f}" if key in m else "-"

    for m in matmuls:
        lines.append(
            f"| {m['device']} | {m['batch']} | {m['regime']} | {m['dense_bf16_ms']:.3f} | {m['auto_ms']:.3f} | "
            f"{m['auto_cached_ms']:.3f} | {cell(m, 'int4_kernel_ms')} | {cell(m, 'fused_kernel_ms')} | "
            f"{cell(m, 'amx_kernel_ms')} | "
            f"{m['dequant_uncached_ms']:.3f} | {m['speedup_auto']:.2f}x | {m['speedup_auto_cached']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", action="store_true", help="only the kernel rows (bench/ops_kernels.py)")
    parser.add_argument("--small", action="store_true", help="kernel rows on tiny shapes (a dry run)")
    parser.add_argument("--dispatch", action="store_true", help="only the measured-dispatch rows (CPU)")
    parser.add_argument("--dequant", action="store_true", help="only the dequantization rows (CPU)")
    parser.add_argument("--hessian", action="store_true", help="only the Hessian rows (CPU, bench/ops_hessian.py)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.kernels:
        run_kernels(args.small)
        return
    if args.dispatch:
        run_dispatch()
        return
    if args.hessian:
        from bench.ops_hessian import run as run_hessian

        run_hessian()
        return
    if args.dequant:
        rows, load_before = bench_dequant(), loadavg()
        table = render_dequant(rows)
        logger.info("%s", table)
        path = write_results("ops_dequant", {"dequant": rows, "cpu": cpu_info(), "loadavg_before": load_before,
                                             "loadavg_after": loadavg()},
                             f"# python -m bench.ops --dequant ({device_tag()}; CPU: {cpu_info()['model']})\n\n"
                             + table + "\n")
        logger.info("wrote %s", path)
        return
    wall = Stopwatch.started()
    load_before = loadavg()
    solves = [bench_solve(4096, 4096), bench_solve(11008, 4096)]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    matmuls = [row for device in devices for row in bench_matmul(device)]
    other_bits = [row for device in devices for row in bench_bits(device)]
    dequant = bench_dequant()
    table = render(solves, matmuls) + "\n\n" + render_bits(other_bits) + "\n\n" + render_dequant(dequant)
    logger.info("%s", table)
    meta = {
        "cpu": cpu_info(),  # which CPU the rows were measured on (model, kernel flags, cores)
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),  # 2 cores: anything well above 2 means other jobs shared the run
        "cpu_int4_max_batch": MAX_BATCH["cpu"]["int4"],
        "cuda_int4_max_batch": MAX_BATCH["cuda"]["int4"],
        **{f"cpu_{name}_kernel": BACKENDS[name].unavailable_reason(LayerShape(BITS, GROUP, 4096, 4096),
                                                                   torch.bfloat16, torch.device("cpu")) or "available"
           for name in ("fused", "amx")},
        "wall_s": round(wall.seconds, 1),
    }
    payload = {"meta": meta, "solve": solves, "matmul": matmuls, "other_bits": other_bits, "dequant": dequant}
    path = write_results("ops", payload, f"# ops benchmark ({device_tag()}; CPU: {meta['cpu']['model']}, "
                         f"flags {' '.join(meta['cpu']['flags'])})\n\n{table}\n\n`{json.dumps(meta)}`\n")
    logger.info("wrote %s (%.0f s)", path, meta["wall_s"])
    run_dispatch()
    if torch.cuda.is_available():
        run_kernels(small=False)


if __name__ == "__main__":
    main()

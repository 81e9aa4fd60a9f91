"""Kernel rows of the ops benchmark (``python -m bench.ops --kernels``; also part of the default run of
bench/ops.py when a GPU is present). Writes ops_kernels_<cuda|cpu>.{json,md} (bench.harness).

On Qwen2-VL-7B LLM shapes (out x in: 3584x3584, 18944x3584, 3584x18944), 4-bit g128, bf16 activations, batch
1 / 16 / 256, four layers per shape called in turn (their weights exceed the L2 cache, as in a model), median
of 5 x 40 back-to-back calls: the fused Triton kernel (``kernel="triton"``), torch's int4 kernel, the default
``"auto"`` policy, dense bf16 (holding the same dequantized weight). GPTQ column sweep on 3584 / 18944 input
columns: the torch loop vs the fused Triton sweep on the same inputs (codes agreement and proxy losses
reported), and ``gptq_quantize`` end to end (fused on CUDA). Hessian accumulation (8 batches of 512 rows):
fp32 rows (fp32 path) vs bf16 rows (one ``torch.mm(..., out_dtype=float32)`` per batch on CUDA).

``--small`` runs the same code on tiny shapes; on a host without CUDA the Triton kernels then run in the
interpreter (a dry run of the script: the timings mean nothing there).
"""

from __future__ import annotations

import json
import logging

import torch
from torch import nn

from bench._common import correlated_inputs
from bench.harness import Stopwatch, repeat, write_results
from hf_vlm_gptq.ops import HessianAccumulator, QuantLinear, gptq_quantize, rtn_quantize
from hf_vlm_gptq.ops import gptq as G

logger = logging.getLogger("bench.ops")
BITS, GROUP = 4, 128
KERNEL_SHAPES = {"7b": [(3584, 3584), (18944, 3584), (3584, 18944)], "small": [(48, 256), (32, 384)]}
SOLVE_SHAPES = {"7b": [(3584, 3584), (3584, 18944)], "small": [(32, 256)]}


def bench_kernel_matmul(device: str, shapes: list[tuple[int, int]], layers: int = 4) -> list[dict]:
    """Fused Triton kernel vs torch int4 vs the "auto" policy vs dense bf16, per shape and batch."""
    rows = []
    calls, repeats = (40, 5) if device == "cuda" else (2, 1)
    for out_f, in_f in shapes:
        torch.manual_seed(0)
        results = [rtn_quantize(torch.randn(out_f, in_f, device=device), bits=BITS, group_size=GROUP)
                   for _ in range(layers)]
        stacks: dict[str, list] = {"dense_bf16": [], "triton": [], "int4": [], "auto": []}
        for res in results:
            for kind in ("triton", "int4", "auto"):
                m = QuantLinear.from_result(res, None, torch.bfloat16)
                m.kernel = kind
                stacks[kind].append(m)
            dense = nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16, device=device)
            dense.weight.data.copy_(stacks["auto"][-1].dequantize_weight(torch.bfloat16))
            stacks["dense_bf16"].append(dense)
        with torch.inference_mode():
            for batch in (1, 16, 256):
                x = torch.randn(batch, in_f, device=device).to(torch.bfloat16)
                ref = stacks["dense_bf16"][0](x).float()
                row = {"device": device, "shape": f"{out_f}x{in_f}", "batch": batch}
                row["triton_rel_err"] = float((stacks["triton"][0](x).float() - ref).abs().max() / ref.abs().max())
                for kind, mods in stacks.items():
                    cycle = iter(range(10**9))
                    for m in mods:  # compile / build kernel formats outside the timing
                        m(x)
                    # median over `repeats` of the mean time of `calls` back-to-back calls
                    row[f"{kind}_us"] = 1e6 * repeat(lambda mods=mods, c=cycle, x=x: mods[next(c) % layers](x),
                                                     reps=repeats, calls=calls, device=device).median
                row["triton_vs_dense"] = row["dense_bf16_us"] / row["triton_us"]
                row["triton_vs_int4"] = row["int4_us"] / row["triton_us"]
                rows.append(row)
                logger.info("%s", row)
    return rows


def _timed(device: str, fn, *args, **kwargs) -> tuple[float, object]:
    """Seconds of one synchronized call, and its result."""
    timing = repeat(lambda: fn(*args, **kwargs), device=device)
    return timing.best, timing.result


def bench_kernel_solve(device: str, shapes: list[tuple[int, int]], tokens: int) -> list[dict]:
    """GPTQ column sweep: torch loop vs fused Triton on the same (w, U); gptq_quantize end to end; and the
    Hessian accumulation of bf16 rows (tensor-core path on CUDA) vs the same rows in fp32."""
    from hf_vlm_gptq.ops.triton_gptq import gptq_columns_triton

    rows = []
    small_w = torch.randn(16, 256, device=device)  # compile the fused sweep's configuration once
    gptq_columns_triton(small_w, torch.eye(256, device=device), BITS, GROUP, True, False, 128)
    for out_f, in_f in shapes:
        x = correlated_inputs(in_f, tokens, seed=0, device=device)
        hessian = (2.0 / tokens) * (x.T @ x)
        w = torch.randn(out_f, in_f, device=device, generator=torch.Generator(device=device).manual_seed(1))
        u = G.upper_inverse_cholesky(hessian, 0.01 * float(hessian.diagonal().mean()))
        args = (w, u, BITS, GROUP, True, False, 128)
        t_loop, a = _timed(device, G._gptq_columns, *args)
        t_fused, b = _timed(device, gptq_columns_triton, *args)
        t_e2e, res = _timed(device, gptq_quantize, w, hessian, bits=BITS, group_size=GROUP)
        loss = [float(G._row_losses(w, q_t, hessian).sum()) for q_t in (a[3], b[3])]
        hess = {}
        for name, dtype in (("fp32_rows", torch.float32), ("bf16_rows", torch.bfloat16)):
            acc = HessianAccumulator(in_f, device=device)
            batches = [x[i : i + tokens // 8].to(dtype) for i in range(0, tokens, tokens // 8)]
            hess[name], _ = _timed(device, lambda acc, batches: [acc.add_batch(b) for b in batches], acc, batches)
        rows.append({
            "device": device, "shape": f"{out_f}x{in_f}", "sweep_torch_loop_s": t_loop, "sweep_fused_s": t_fused,
            "speedup": t_loop / t_fused, "same_codes": float((a[0] == b[0]).float().mean()),
            "loss_torch_loop": loss[0], "loss_fused": loss[1], "gptq_quantize_s": t_e2e, "loss_e2e": res.loss,
            "hessian_fp32_rows_s": hess["fp32_rows"], "hessian_bf16_rows_s": hess["bf16_rows"],
        })  # fmt: skip
        logger.info("%s", rows[-1])
    return rows


def render_kernels(matmuls: list[dict], solves: list[dict]) -> str:
    lines = [
        "Fused Triton matmul vs torch int4 vs dense bf16 (4-bit g128, bf16 activations), us per call, 4 layers "
        "in turn",
        "",
        "| device | layer (out x in) | batch | dense bf16 | triton | int4 | auto | triton vs dense | triton vs int4 "
        "| triton max rel err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in matmuls:
        lines.append(
            f"| {m['device']} | {m['shape']} | {m['batch']} | {m['dense_bf16_us']:.1f} | {m['triton_us']:.1f} | "
            f"{m['int4_us']:.1f} | {m['auto_us']:.1f} | {m['triton_vs_dense']:.2f}x | {m['triton_vs_int4']:.2f}x | "
            f"{m['triton_rel_err']:.1e} |"
        )
    lines += [
        "",
        "GPTQ column sweep (4-bit g128 sym), seconds: torch loop vs fused Triton on the same inputs; gptq_quantize "
        "end to end; Hessian of 8 batches, fp32 rows vs bf16 rows",
        "",
        "| device | layer | torch loop | fused | speedup | same codes | loss loop / fused | gptq_quantize | "
        "Hessian fp32 rows / bf16 rows |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in solves:
        lines.append(
            f"| {s['device']} | {s['shape']} | {s['sweep_torch_loop_s']:.3f} | {s['sweep_fused_s']:.3f} | "
            f"{s['speedup']:.1f}x | {s['same_codes']:.5f} | {s['loss_torch_loop']:.5g} / {s['loss_fused']:.5g} | "
            f"{s['gptq_quantize_s']:.3f} | {s['hessian_fp32_rows_s']:.3f} / {s['hessian_bf16_rows_s']:.3f} |"
        )
    return "\n".join(lines)


def run_kernels(small: bool) -> None:
    """The kernel rows alone: ops_kernels_<device>.{json,md} in the results folder."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = "small" if small else "7b"
    wall = Stopwatch.started()
    matmuls = bench_kernel_matmul(device, KERNEL_SHAPES[size])
    solves = bench_kernel_solve(device, SOLVE_SHAPES[size], tokens=64 if small else 4096)
    table = render_kernels(matmuls, solves)
    logger.info("%s", table)
    meta = {"size": size, "wall_s": round(wall.seconds, 1)}
    path = write_results("ops_kernels", {"meta": meta, "matmul": matmuls, "solve": solves},
                         f"# ops kernel benchmark ({device}, {size})\n\n{table}\n\n`{json.dumps(meta)}`\n")
    logger.info("wrote %s (%.0f s)", path, meta["wall_s"])

"""Memory of quantizing: peak process memory against the model's size, live Hessians, and per block.

    python -m bench.memory [--config small] [--llm-layers 8] [--hidden 512] [--samples 16]      # CPU
    python -m bench.memory --config 7b [--llm-layers 2 --vision-depth 2 --samples 128]         # CUDA

small: child processes on the same model (so each peak is its own): load only; load + one float forward per
calibration sample (what calibration needs at least); load + quantize (our pipeline); and "blocks": the
offload path forced on CPU (the weights stay put, the calibration passes run module by module) with
per-block figures, the same code the CUDA mode measures. The quantize child also counts the Hessian
accumulators alive at the same time (the pipeline promises one group's at a time).

7b (CUDA): the Qwen2-VL-7B config (random bf16 weights, built on the GPU and moved to the host) is quantized
with its weights kept on the CPU and `calibration_device="cuda"`: peak GPU and host memory overall, per
block (solve + replay) and per capture pass, then the same figures extrapolated to the whole 7B and to
Qwen2-VL-72B (hidden 8192, intermediate 29568, 80 layers, same vision tower) from the per-block ones.
Writes memory_<cpu|cuda>.{json,md} (bench.harness says where).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import weakref

from bench.harness import REPO, RESULTS, Stopwatch, env_info, scratch_dir, wait_for_quiet, write_results
from bench.memory_blocks import BlockProbe, extrapolate, render_blocks


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, path: str, samples: int) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import hf_vlm_gptq
    from hf_vlm_gptq.calib import build_model_inputs, builtin_samples
    from hf_vlm_gptq.ops import hessian as hessian_mod

    live: weakref.WeakSet = weakref.WeakSet()
    peak = {"count": 0, "bytes": 0}
    original_init = hessian_mod.HessianAccumulator.__init__

    def counting_init(self, columns, *args, **kwargs):
        original_init(self, columns, *args, **kwargs)
        live.add(self)
        peak["count"] = max(peak["count"], len(live))
        peak["bytes"] = max(peak["bytes"], sum(a.hessian.numel() * a.hessian.element_size() for a in live))

    hessian_mod.HessianAccumulator.__init__ = counting_init
    cuda = torch.cuda.is_available()
    watch = Stopwatch.started()
    extra = {}
    if mode == "quantize":
        cfg = hf_vlm_gptq.VLMGPTQConfig(num_samples=samples, w_groupsize=128)
        model = AutoModelForImageTextToText.from_pretrained(path, quantization_config=cfg, dtype=torch.bfloat16)
    elif mode == "blocks":
        from hf_vlm_gptq.api import quantize

        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16)
        batches = build_model_inputs(builtin_samples(samples), AutoProcessor.from_pretrained(path))
        cfg = hf_vlm_gptq.VLMGPTQConfig(w_groupsize=128, calibration_device="cpu", calibration_offload=True)
        with BlockProbe("cpu") as probe:
            quantize(model, cfg, data=batches, progress=False)
        extra = {"blocks": probe.rows, "captures": probe.captures}
    else:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16)
        if cuda:
            model.to("cuda")
        if mode == "forward":
            processor = AutoProcessor.from_pretrained(path)
            with torch.no_grad():
                for batch in build_model_inputs(builtin_samples(samples), processor):
                    model(**{k: v.to(model.device) for k, v in batch.items()})
    out = {
        "mode": mode,
        "seconds": round(watch.seconds, 2),
        "peak_rss_MB": _peak_rss_mb(),
        "model_MB": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        "max_live_hessians": peak["count"],
        "max_live_hessian_MB": peak["bytes"] / 2**20,
        **extra,
    }
    if cuda:
        out["peak_gpu_MB"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def child_7b(args) -> dict:
    """Quantize the 7B config with its weights on the host and the calibration on the GPU."""
    import torch

    from bench._common import qwen2vl_config, random_qwen2vl, synthetic_batches
    from hf_vlm_gptq import VLMGPTQConfig
    from hf_vlm_gptq.api import quantize

    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU only for a dry run of this code
    cuda = device == "cuda"
    config = qwen2vl_config("7b", args.llm_layers, args.vision_depth)
    with Stopwatch() as build:
        model = random_qwen2vl(config, device, torch.bfloat16).to("cpu")  # a GPU init is much faster than a CPU one
        if cuda:
            torch.cuda.empty_cache()
        batches = synthetic_batches(args.samples, args.seq_len, text_only_every=8)
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    batches_mb = sum(t.numel() * t.element_size() for b in batches for t in b.values()) / 2**20
    rss_before = _peak_rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    cfg = VLMGPTQConfig(num_samples=args.samples, w_groupsize=128, calibration_device=device,
                        calibration_offload=True)
    with Stopwatch(device) as watch, BlockProbe(device) as probe:
        quantize(model, cfg, data=batches, progress=False)
    return {"mode": "offload_7b", "build_s": build.seconds, "seconds": watch.seconds,
            "llm_layers": config.text_config.num_hidden_layers, "vision_depth": config.vision_config.depth,
            "samples": args.samples, "tokens": sum(b["input_ids"].shape[-1] for b in batches),
            "model_MB": model_mb, "batches_MB": batches_mb, "peak_rss_before_MB": rss_before,
            "peak_rss_MB": _peak_rss_mb(), "peak_gpu_MB": torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0,
            "blocks": probe.rows, "captures": probe.captures}


def _run_child(args, mode: str, path: str | None = None) -> dict:
    cmd = [sys.executable, "-m", __spec__.name, "--child", mode, "--samples", str(args.samples),
           "--seq-len", str(args.seq_len)]
    if path:
        cmd += ["--path", path]
    if args.llm_layers is not None:
        cmd += ["--llm-layers", str(args.llm_layers)]
    if args.vision_depth is not None:
        cmd += ["--vision-depth", str(args.vision_depth)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"child {mode} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main_small(args) -> None:
    from hf_vlm_gptq.testing import build_tiny_qwen2vl

    layers = args.llm_layers or 8
    with scratch_dir("bench_memory_") as tmp:
        path = build_tiny_qwen2vl(tmp / "model", num_llm_layers=layers, hidden_size=args.hidden,
                                  vision_embed_dim=256, vision_depth=args.vision_depth or 4,
                                  text_config={"intermediate_size": 4 * args.hidden})
        wait_for_quiet()
        rows = [_run_child(args, mode, str(path)) for mode in ("load", "forward", "quantize", "blocks")]
    base = rows[0]
    env = env_info()
    lines = [f"# python -m bench.memory --config small ({env['date']}, {'cuda' if env['cuda'] else 'cpu'}, Qwen2-VL-style "
             f"model with {layers} LLM layers, hidden {args.hidden}, {base['model_MB']:.1f} MB of bf16 weights, "
             f"{args.samples} calibration samples; loadavg {env['loadavg']}, CPU pressure "
             f"{env['cpu_pressure_avg10']} %)", "",
             "| run | seconds | peak RSS MB | over load-only MB | over load-only / model size | live Hessians (max) | "
             "their MB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        extra = r["peak_rss_MB"] - base["peak_rss_MB"]
        lines.append(f"| {r['mode']} | {r['seconds']} | {r['peak_rss_MB']:.0f} | {extra:.0f} | "
                     f"{extra / base['model_MB']:.2f}x | {r['max_live_hessians']} | {r['max_live_hessian_MB']:.1f} |")
    lines += ["", "`blocks` = quantize with the offload path forced on CPU (calibration_offload=True), per block "
              "(host RSS after each block; on CUDA these columns are GPU peaks):", "",
              render_blocks(rows[-1]["blocks"], rows[-1]["captures"], "RSS MB")]
    table = "\n".join(lines)
    print(table)
    write_results("memory", {"env": env, "rows": rows}, table)


def main_7b(args) -> None:
    import torch

    if not torch.cuda.is_available():
        print("python -m bench.memory --config 7b needs CUDA; run --config small on CPU")
        return
    run = _run_child(args, "offload_7b")
    estimates = extrapolate(run)
    env = env_info()
    lines = [f"# python -m bench.memory --config 7b ({env['date']}, {env['cuda']}, torch {env['torch']})", "",
             f"Qwen2-VL-7B config with {run['llm_layers']} LLM layers and {run['vision_depth']} vision blocks "
             f"(random bf16 weights on the host: {run['model_MB']:.0f} MB), {run['samples']} samples "
             f"({run['tokens']} tokens, batches {run['batches_MB']:.0f} MB), weights kept on the CPU, "
             f"calibration_device='cuda'; quantize took {run['seconds']:.1f} s.", "",
             f"**Peak GPU {run['peak_gpu_MB'] / 1024:.2f} GB** (target < 10 GB); peak host RSS "
             f"{run['peak_rss_MB'] / 1024:.1f} GB.", "", "Per block / capture pass (GPU peak within it):", "",
             render_blocks(run["blocks"], run["captures"], "peak GPU MB"), "", estimates["markdown"]]
    table = "\n".join(lines)
    print(table)
    write_results("memory", {"env": env, "run": run, "estimates": estimates}, table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=("small", "7b"), default="small")
    parser.add_argument("--llm-layers", type=int, default=None, help="small: 8; 7b: 2 (the figures are per block)")
    parser.add_argument("--vision-depth", type=int, default=None, help="small: 4; 7b: 2")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--samples", type=int, default=None, help="small: 16; 7b: 128")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "offload_7b":
        print(json.dumps(child_7b(args)))
        return
    if args.child:
        print(json.dumps(child(args.child, args.path, args.samples)))
        return
    args.samples = args.samples or (16 if args.config == "small" else 128)
    if args.config == "7b":
        args.llm_layers = args.llm_layers or 2
        args.vision_depth = args.vision_depth or 2
        main_7b(args)
    else:
        main_small(args)
    print(f"results in {RESULTS}")


if __name__ == "__main__":
    main()

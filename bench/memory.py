"""Memory of quantizing: peak process memory against the model's own size, and live Hessians.

    python bench/memory.py [--llm-layers 8] [--hidden 512] [--samples 16]

Three child processes on the same model (so each peak is its own): load only; load + one float forward
per calibration sample (what calibration needs at least); load + quantize (our pipeline). On CUDA the
peak GPU memory is reported too. The quantize child also counts the Hessian accumulators alive at the
same time (the pipeline promises one block's — in fact one group's — at a time). Writes
bench/results/memory_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


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
    start = time.perf_counter()
    if mode == "quantize":
        cfg = hf_vlm_gptq.VLMGPTQConfig(num_samples=samples, w_groupsize=128)
        model = AutoModelForImageTextToText.from_pretrained(path, quantization_config=cfg, dtype=torch.bfloat16)
    else:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16)
        if cuda:
            model.to("cuda")
        if mode == "forward":
            processor = AutoProcessor.from_pretrained(path)
            with torch.no_grad():
                for batch in build_model_inputs(builtin_samples(samples), processor):
                    model(**{k: v.to(model.device) for k, v in batch.items()})
    seconds = time.perf_counter() - start
    out = {
        "mode": mode,
        "seconds": round(seconds, 2),
        "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "model_MB": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        "max_live_hessians": peak["count"],
        "max_live_hessian_MB": peak["bytes"] / 2**20,
    }
    if cuda:
        out["peak_gpu_MB"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm-layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.path, args.samples)))
        return

    import torch

    from hf_vlm_gptq.testing import build_tiny_qwen2vl

    path = build_tiny_qwen2vl(Path(tempfile.mkdtemp()) / "model", num_llm_layers=args.llm_layers,
                              hidden_size=args.hidden, vision_embed_dim=256, vision_depth=4,
                              text_config={"intermediate_size": 4 * args.hidden})
    rows = []
    for mode in ("load", "forward", "quantize"):
        cmd = [sys.executable, __file__, "--child", mode, "--path", str(path), "--samples", str(args.samples)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    base = rows[0]
    lines = [f"# bench/memory.py ({time.strftime('%Y-%m-%d')}, {'cuda' if torch.cuda.is_available() else 'cpu'}, "
             f"Qwen2-VL-style model with {args.llm_layers} LLM layers, hidden {args.hidden}, "
             f"{base['model_MB']:.1f} MB of bf16 weights, {args.samples} calibration samples)", "",
             "| run | seconds | peak RSS MB | over load-only MB | over load-only / model size | live Hessians (max) | "
             "their MB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        extra = r["peak_rss_MB"] - base["peak_rss_MB"]
        lines.append(f"| {r['mode']} | {r['seconds']} | {r['peak_rss_MB']:.0f} | {extra:.0f} | "
                     f"{extra / base['model_MB']:.2f}x | {r['max_live_hessians']} | {r['max_live_hessian_MB']:.1f} |")
    table = "\n".join(lines)
    print(table)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"memory_{device}.json").write_text(json.dumps(rows, indent=2))
    (RESULTS / f"memory_{device}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()

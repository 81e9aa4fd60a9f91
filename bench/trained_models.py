"""The trained fixtures' recipe and held-out accuracy, from their training records in the cache.

    python -m hf_vlm_gptq.testing.train_tiny --arch qwen2_vl --arch video_llama_3   # trains what is missing
    python -m bench.trained_models [--archs qwen2_vl,video_llama_3]

Writes trained_models_<cpu|cuda>.{json,md} (bench/harness.py decides the folder).
"""

from __future__ import annotations

import argparse
import json

from bench.harness import write_results
from hf_vlm_gptq.testing import train_tiny
from hf_vlm_gptq.testing.tasks import KINDS, TASKS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="qwen2_vl,video_llama_3")
    args = parser.parse_args()
    records = {}
    lines = ["# Trained tiny VLMs (hf_vlm_gptq.testing.train_tiny)", "",
             "Recipe (one for every family): " + ", ".join(f"{k} {v}" for k, v in train_tiny.RECIPE.items())
             + f"; sizes {train_tiny.SIZES} (by each builder's parameter names); AdamW (betas 0.9, 0.98, no decay "
               "on embeddings, norms, biases), cross-entropy on the answer tokens and the end-of-turn token only, "
               "linear warmup then cosine; every step draws 20 fresh items of the training split (2 per task). "
               "Held-out accuracy: teacher-forced exact match on the eval split (60 items per task; the "
               "`larger` digit pairs of the eval split are never trained on). Seconds: wall time of training "
               "on this shared 2-core host, 1 thread.", "",
             "| family | params | image | video | text | all | " + " | ".join(t for k in KINDS for t in TASKS[k])
             + " | s | cache key |",
             "|---|---|---|---|---|---|" + "---|" * sum(len(TASKS[k]) for k in KINDS) + "---|---|"]
    for arch in args.archs.split(","):
        path = train_tiny.trained_model_path(arch)
        if path is None:
            lines.append(f"| {arch} | not trained | | | | | " + "| " * sum(len(TASKS[k]) for k in KINDS) + "| |")
            continue
        rec = json.loads((path / "training.json").read_text())
        records[arch] = rec
        acc, by_task = rec["accuracy"], rec["accuracy_by_task"]
        lines.append(f"| {arch} | {rec['params'] / 1e6:.2f} M | {acc['image']:.1f} | {acc['video']:.1f} | "
                     f"{acc['text']:.1f} | {acc['all']:.1f} | "
                     + " | ".join(f"{by_task[t]:.1f}" for k in KINDS for t in TASKS[k])
                     + f" | {rec['seconds']:.0f} | {rec['key']} |")
    lines += ["", "Loss every 50 steps:", ""]
    lines += [f"- {arch}: {', '.join(str(x) for x in rec['loss_curve'])}" for arch, rec in records.items()]
    out = write_results("trained_models", records, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Where the CPU quantization time goes: the small config's LLM-only GPTQ under py-spy, summed by the innermost
project function of each sample.

    pip install py-spy   # not a project dependency
    python -m bench.quantize_profile            # records (py-spy, 50 Hz) and prints the table
    python -m bench.quantize_profile --run      # the workload alone (what py-spy records)

Same model and batches as `python -m bench.quantize_speed --config small` (LLM only, the reference's
algorithm: damping 0.01, 15-level grid, no GPTAQ, MSE clip). Writes quantize_profile_cpu.{json,md}
(bench.harness says where).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.harness import REPO, scratch_dir, write_results


def workload() -> None:
    import torch
    from transformers import AutoModelForImageTextToText

    from bench.quantize_speed import SAME_AS_REFERENCE, SMALL
    from hf_vlm_gptq import VLMGPTQConfig
    from hf_vlm_gptq.calib import builtin_samples
    from hf_vlm_gptq.testing import build_tiny_qwen2vl

    pictures = [s for s in builtin_samples(64, seed=0, with_video=False) if "image" in s][:32]
    config = VLMGPTQConfig(dataset=pictures, num_samples=32, w_groupsize=128, calibration_device="cpu",
                           quant_visual_clip=False, quant_cross_attention=False, **SAME_AS_REFERENCE)
    with scratch_dir("bench_qprof_") as tmp:
        path = build_tiny_qwen2vl(tmp / "model", seed=0, **SMALL)
        AutoModelForImageTextToText.from_pretrained(path, quantization_config=config, dtype=torch.float32)


# innermost frames of threads that only wait: a paused forward pass (stepped.py), and the thread that stepped
# a pass while that pass runs (its work is sampled in the pass's own thread)
WAITING = ("_Pass.wait_before", "_Pass.step")


def innermost_project_frames(raw: Path) -> tuple[collections.Counter, int]:
    """Samples per innermost `hf_vlm_gptq` function of each stack (py-spy's raw format), waiting threads
    left out."""
    counts: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        project = [f for f in stack.split(";") if "hf_vlm_gptq/" in f]
        if project and project[-1].split(" (")[0] in WAITING and "stepped.py" in project[-1]:
            continue
        total += int(n)
        key = (f"{project[-1].split(' (')[0]} ({project[-1].split('hf_vlm_gptq/')[-1].split(':')[0]})"
               if project else "(no project frame: imports, threads, interpreter)")
        counts[key] += int(n)
    return counts, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="store_true", help="run the workload only")
    parser.add_argument("--rate", type=int, default=50)
    args = parser.parse_args()
    if args.run:
        workload()
        return
    spy = shutil.which("py-spy")
    if spy is None:
        sys.exit("py-spy is not installed (pip install py-spy)")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "profile.txt"
        subprocess.run([spy, "record", "-r", str(args.rate), "-f", "raw", "-o", str(raw), "--",
                        sys.executable, "-m", "bench.quantize_profile", "--run"], cwd=REPO, check=True)
        counts, total = innermost_project_frames(raw)
    rows = [{"function": k, "share": round(v / total, 4), "samples": v} for k, v in counts.most_common(25)]
    lines = [f"# python -m bench.quantize_profile ({total} samples at {args.rate} Hz)", "",
             "| innermost project function | share of samples |", "|---|---|"]
    lines += [f"| {r['function']} | {100 * r['share']:.1f}% |" for r in rows]
    table = "\n".join(lines)
    print(table)
    write_results("quantize_profile", {"total_samples": total, "rate_hz": args.rate, "rows": rows}, table)


if __name__ == "__main__":
    main()

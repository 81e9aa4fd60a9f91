"""Task accuracy of trained tiny VLMs, float vs quantized: RTN and GPTQ per bit width and per part.

    python -m bench.accuracy [--archs qwen2_vl,video_llama_3] [--calib 64] [--eval 600] [--ablation]
                             [--llmc-python PATH] [--train]

The models are the trained fixtures of ``hf_vlm_gptq.testing.train_tiny`` (cached outside the repository;
``--train`` trains a missing one, a few minutes each on CPU, else that family is skipped with a note).
Questions are the trainer's held-out items (image, video and text-only kinds), scored by teacher-forced
exact match (= greedy decoding gives the answer and stops); KL is KL(float || quantized) of the answer-token
distributions (nats per answer token). Calibration: ``--calib`` items of the tasks' training split under
another seed (in-domain data, none of them scored; pictures, clips and text-only turns with their answers),
through the model's processor and chat template like any calibration set.

Rows, each on a fresh copy of the float model, all in one run: RTN and GPTQ at W4 g128, W3 g128, W2 g64, for
the vision parts only (tower + bridge), the LLM only and the whole model. "GPTQ" is the algorithm with the
options every earlier release used (MSE clip, damping 0.01, natural column order, plain Hessian, the
15-level symmetric grid); "GPTQ (defaults)" is this release's defaults when they differ. ``--ablation`` adds
whole-model GPTQ rows, one option changed at a time (clip, damping, act-order, group-aware order, Hessian
weighting, GPTAQ, the 16-level grid). Writes ``accuracy_<cpu|cuda>.{json,md}`` (see bench/harness.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import torch

import hf_vlm_gptq  # noqa: F401
from bench.harness import Stopwatch, loadavg, write_results
from hf_vlm_gptq import VLMGPTQConfig
from hf_vlm_gptq.api import quantize
from hf_vlm_gptq.arch import spec_for_name
from hf_vlm_gptq.config_fields import DEFAULTS, PART_SWITCHES
from hf_vlm_gptq.testing import train_tiny
from hf_vlm_gptq.testing.tasks import KINDS, task_samples

BITS = (("W4 g128", 4, 128), ("W3 g128", 3, 128), ("W2 g64", 2, 64))
CALIB_SEED = 1  # the trainer drew its training items with seed 0: these were never trained on

# The options every release before this one quantized with (the "plain GPTQ" rows).
PLAIN = {"percdamp": 0.01, "act_order": False, "group_order": False, "visual_w_clip": True, "llm_w_clip": True,
         "sym_full_range": False, "gptaq": False, "hessian_weighting": "none"}
ABLATION = {
    "no clip search": {"visual_w_clip": False, "llm_w_clip": False},
    "damping 0.1": {"percdamp": 0.1},
    "act-order": {"act_order": True},
    "group-aware order": {"group_order": True},
    "16-level grid": {"sym_full_range": True},
    "GPTAQ": {"gptaq": True},
    "balanced modalities": {"hessian_weighting": "balanced"},
    "vision tokens x4": {"hessian_weighting": "modality", "modality_weights": {"image": 4.0, "video": 4.0}},
    "gradient importance": {"hessian_weighting": "gradient"},
    # the winners of the single changes above, together
    "damping 0.1 + 16-level grid": {"percdamp": 0.1, "sym_full_range": True},
    "damping 0.1 + 16-level grid + GPTAQ": {"percdamp": 0.1, "sym_full_range": True, "gptaq": True},
    "damping 0.1 + 16-level grid + GPTAQ + gradient importance": {"percdamp": 0.1, "sym_full_range": True,
                                                                  "gptaq": True, "hessian_weighting": "gradient"},
    "damping 0.1 + 16-level grid + group-aware order": {"percdamp": 0.1, "sym_full_range": True,
                                                        "group_order": True},
}


def defaults() -> dict:
    """This release's defaults of the options PLAIN names (from the config's declarations)."""
    return {k: DEFAULTS[k] for k in PLAIN}


def part_flags(arch: str) -> dict[str, dict[str, bool]]:
    comps = spec_for_name(arch).components
    off = dict.fromkeys(PART_SWITCHES, False)
    visual = {c.flag: True for c in comps if c.part == "visual"}
    llm = {c.flag: True for c in comps if c.part == "llm"}
    return {"vision": {**off, **visual}, "llm": {**off, **llm}, "all": {**off, **visual, **llm}}


def calib_samples(n: int) -> list[dict]:
    keep = ("image", "video", "video_fps", "text", "answer")
    return [{k: v for k, v in item.items() if k in keep}
            for item in task_samples(n, "train", seed=CALIB_SEED)]


def score(result, reference) -> dict:
    acc = result.accuracy("kind")
    out = {k: round(acc.get(k, float("nan")), 2) for k in (*KINDS, "all")}
    out["by_task"] = {k: round(v, 2) for k, v in result.accuracy("task").items() if k != "all"}
    if reference is not None:
        out["kl"] = {k: round(v, 5) for k, v in result.kl_from(reference).items()}
    return out


def run_one(float_model, processor, batches, eval_batches, reference, overrides: dict) -> dict:
    model = copy.deepcopy(float_model)
    config = VLMGPTQConfig(dataset=None, calibration_device="cpu", **overrides)
    with Stopwatch() as watch:
        records = quantize(model, config, data=batches, processor=processor, progress=False)
    row = score(train_tiny.evaluate(model, eval_batches), reference)
    row["seconds"] = round(watch.seconds, 2)
    row["modules"] = len(records)
    row["fallbacks"] = sum(1 for r in records.values() if r.fallback)
    del model
    return row


def run_llmc(args, model_dir: Path, batches: list[dict], eval_batches, reference, label: str, bits: int,
             group: int) -> dict:
    """llm-compressor's GPTQ on the LLM (in its own virtualenv, bench/llmc_gptq.py), its compressed-tensors
    checkpoint loaded by plain transformers here and scored like our rows; {"skipped": why} when it cannot."""
    import subprocess
    import tempfile

    from transformers import AutoModelForImageTextToText

    python = Path(args.llmc_python) if args.llmc_python else None
    if python is None or not python.exists():
        return {"skipped": "no llm-compressor virtualenv on this host (--llmc-python PATH names one); column left out"}
    # its traced sequential pipeline needs every batch to take the same inputs: the picture batches only
    pictures = [b for b in batches if b.get("pixel_values") is not None and b.get("pixel_values_videos") is None]
    with tempfile.TemporaryDirectory(prefix="bench_acc_llmc_") as tmp:
        torch.save(pictures, f"{tmp}/batches.pt")
        cmd = [str(python), str(Path(__file__).with_name("llmc_gptq.py")), str(model_dir), f"{tmp}/batches.pt",
               f"{tmp}/out.json", "--bits", str(bits), "--group", str(group), "--save", f"{tmp}/model"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.llmc_timeout)
        if proc.returncode != 0:
            return {"skipped": f"llm-compressor failed: {proc.stderr.strip().splitlines()[-1:]}"}
        info = json.loads(Path(f"{tmp}/out.json").read_text())
        # llm-compressor 0.14 (under transformers 5.17) lists the dense modules by checkpoint names
        # ("visual.blocks.0.attn.qkv"), which miss this transformers' module names ("model.visual..."): the
        # recipe's own patterns instead, so compressed-tensors leaves the same modules dense here
        config_path = Path(f"{tmp}/model/config.json")
        saved = json.loads(config_path.read_text())
        saved["quantization_config"]["ignore"] = info["ignore"]
        config_path.write_text(json.dumps(saved, indent=2))
        model = AutoModelForImageTextToText.from_pretrained(f"{tmp}/model", dtype=torch.float32).eval()
        row = score(train_tiny.evaluate(model, eval_batches), reference)
    row.update(run=f"llm-compressor GPTQ {label}", part="llm", seconds=round(info["seconds"], 2),
               calib_batches=len(pictures), versions=info["versions"])
    return row


def render(report: dict) -> str:
    lines = ["# Task accuracy of trained tiny VLMs, float vs quantized", "",
             f"`python -m bench.accuracy {report['argv']}` — {report['when']}, torch {report['torch']}, "
             f"transformers {report['transformers']}, load average {report['loadavg']}.", "",
             "Accuracy in % on held-out items (teacher-forced exact match); KL = KL(float || quantized) of the "
             "answer-token distributions, nats per token; s = wall time of `quantize` (calibration included). "
             f"Calibration: {report['calib']} in-domain items (tasks' training split, seed {CALIB_SEED}). "
             "Parts: vision = vision tower with its conv stem + bridge (merger / projector); llm = decoder layers.",
             ""]
    for arch, data in report["archs"].items():
        if "skipped" in data:
            lines += [f"## {arch}", "", f"skipped: {data['skipped']}", ""]
            continue
        fl = data["float"]
        lines += [f"## {arch}", "",
                  f"Model: {data['model']}. Held-out items: {data['eval_items']} "
                  f"({', '.join(f'{k} {v}' for k, v in data['eval_counts'].items())}).", "",
                  "| run | part | image | video | text | all | KL image | KL video | KL text | s |",
                  "|---|---|---|---|---|---|---|---|---|---|",
                  f"| float | - | {fl['image']:.1f} | {fl['video']:.1f} | {fl['text']:.1f} | {fl['all']:.1f} "
                  "| - | - | - | - |"]
        for row in data["rows"]:
            kl = row.get("kl", {})
            lines.append(f"| {row['run']} | {row['part']} | {row['image']:.1f} | {row['video']:.1f} | "
                         f"{row['text']:.1f} | {row['all']:.1f} | {kl.get('image', 0):.4f} | "
                         f"{kl.get('video', 0):.4f} | {kl.get('text', 0):.4f} | {row['seconds']:.1f} |")
        llmc = data.get("llmc", {})
        if "skipped" in llmc:
            lines += ["", f"llm-compressor GPTQ (LLM only): {llmc['skipped']}", ""]
        else:
            lines += ["", "llm-compressor rows: its GPTQModifier (damping 0.01, no act-order, LLM only) on the "
                      "picture batches of the same calibration set (its sequential pipeline needs one input "
                      "layout), loaded by plain transformers; s = its `oneshot` call.", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="qwen2_vl,video_llama_3")
    parser.add_argument("--calib", type=int, default=64, help="calibration items")
    parser.add_argument("--eval", type=int, default=600, help="held-out items (a multiple of 10: every task alike)")
    parser.add_argument("--ablation", action="store_true", help="add whole-model GPTQ rows, one option changed")
    parser.add_argument("--ablation-bits", default="W3 g128,W2 g64", help="bit widths of the ablation rows")
    parser.add_argument("--skip-main", action="store_true", help="only the ablation rows (and their RTN rows)")
    parser.add_argument("--ablation-rows", default=None, help="comma-separated subset of the ablation names")
    parser.add_argument("--only-bits", default=None, help="comma-separated subset of 'W4 g128,W3 g128,W2 g64'")
    parser.add_argument("--parts", default="vision,llm,all")
    parser.add_argument("--train", action="store_true", help="train a family whose trained model is not cached")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="the fixture trained this many steps (default the recipe's; fewer: a harder fixture)")
    parser.add_argument("--llmc-python", default=None, help="python of a virtualenv with llmcompressor")
    parser.add_argument("--llmc-timeout", type=int, default=1800)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(args.threads)
    import transformers

    bits_wanted = BITS if args.only_bits is None else [b for b in BITS if b[0] in args.only_bits.split(",")]
    parts_wanted = args.parts.split(",")
    report = {"argv": " ".join(sys.argv[1:]), "when": time.strftime("%Y-%m-%d %H:%M"),
              "torch": torch.__version__, "transformers": transformers.__version__,
              "loadavg": " ".join(loadavg() or []), "calib": args.calib, "archs": {}}
    new_defaults = defaults()
    changed = {k: v for k, v in new_defaults.items() if PLAIN[k] != v}
    report["defaults_changed"] = changed
    for arch in args.archs.split(","):
        if train_tiny.trained_model_path(arch, args.train_steps) is None and not args.train:
            report["archs"][arch] = {"skipped": f"no trained model cached at {train_tiny.trained_dir(arch, args.train_steps)} "
                                                f"(python -m hf_vlm_gptq.testing.train_tiny --arch {arch}, or --train)"}
            print(f"{arch}: skipped (no trained model)")
            continue
        path = train_tiny.ensure_trained(arch, steps=args.train_steps)
        float_model, processor, _ = train_tiny.load_trained(arch, steps=args.train_steps)
        training = json.loads((path / "training.json").read_text())
        items = task_samples(args.eval, "eval", training["recipe"]["seed"])
        eval_batches = train_tiny.make_batches(processor, items)
        reference = train_tiny.evaluate(float_model, eval_batches)
        from hf_vlm_gptq.calib import build_model_inputs

        batches = build_model_inputs(calib_samples(args.calib), processor)
        data = {"model": f"{training['params'] / 1e6:.2f} M params, {training['sizes']}, trained "
                         f"{training['recipe']['steps']} steps ({path.name})",
                "eval_items": len(items), "eval_counts": {k: sum(1 for i in items if i["kind"] == k) for k in KINDS},
                "float": score(reference, None), "rows": []}
        print(f"{arch}: float {data['float']}", flush=True)
        parts = part_flags(arch)

        def add(run: str, part: str, overrides: dict, data=data, float_model=float_model, processor=processor,
                batches=batches, eval_batches=eval_batches, reference=reference) -> None:
            row = run_one(float_model, processor, batches, eval_batches, reference, overrides)
            row.update(run=run, part=part, options=overrides)
            data["rows"].append(row)
            print(f"  {run:<32} {part:<6} image {row['image']:5.1f} video {row['video']:5.1f} text {row['text']:5.1f}"
                  f" KL {row['kl']['all']:.4f} {row['seconds']:5.1f} s", flush=True)

        for label, bits, group in BITS:
            common = {"visual_w_bits": bits, "llm_w_bits": bits, "w_groupsize": group, "num_samples": args.calib}
            if not args.skip_main and (label, bits, group) in bits_wanted:
                for part in parts_wanted:
                    flags = parts[part]
                    add(f"RTN {label}", part, {**common, **flags, "visual_w_rtn": True, "llm_w_rtn": True})
                    add(f"GPTQ {label}", part, {**common, **flags, **PLAIN})
                    if changed:
                        add(f"GPTQ (defaults) {label}", part, {**common, **flags})
            if args.ablation and label in args.ablation_bits.split(","):
                if args.skip_main and args.ablation_rows is None:
                    add(f"RTN {label}", "all", {**common, **parts["all"], "visual_w_rtn": True, "llm_w_rtn": True})
                    add(f"GPTQ {label}", "all", {**common, **parts["all"], **PLAIN})
                for name, opts in ABLATION.items():
                    if args.ablation_rows is not None and name not in args.ablation_rows.split(","):
                        continue
                    add(f"GPTQ {label} + {name}", "all", {**common, **parts["all"], **PLAIN, **opts})
        data["llmc"] = {"skipped": "no llm-compressor virtualenv on this host (--llmc-python PATH names one)"}
        if args.llmc_python:
            for label, bits, group in bits_wanted:
                row = run_llmc(args, path, batches, eval_batches, reference, label, bits, group)
                if "skipped" in row:
                    data["llmc"] = row
                    break
                data["rows"].append(row)
                data["llmc"] = {"versions": row["versions"]}
                print(f"  {row['run']:<32} llm    image {row['image']:5.1f} video {row['video']:5.1f} "
                      f"text {row['text']:5.1f} KL {row['kl']['all']:.4f} {row['seconds']:5.1f} s", flush=True)
        report["archs"][arch] = data
        del float_model
    markdown = render(report)
    out = write_results("accuracy", report, markdown)
    print(markdown)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

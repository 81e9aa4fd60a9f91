"""Quality: relative logit error against the unquantized model, RTN vs GPTQ, per part switched on.

    python -m bench.quality [--archs NAME,NAME] [--samples 32] [--quick]     (default: every registered arch)

Builds a model of a few million parameters offline (random weights, real processor), calibrates on the
built-in set, and evaluates on held-out built-in samples (another seed: images, clips, text). Every row is
measured in the same run against the same float logits. Writes quality.{json,md} (bench.harness says where).
"""

from __future__ import annotations

import argparse
import inspect
import time
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import hf_vlm_gptq  # noqa: F401
from bench.harness import Stopwatch, scratch_dir, write_results
from hf_vlm_gptq import VLMGPTQConfig
from hf_vlm_gptq.arch import ARCHITECTURES, spec_for_name
from hf_vlm_gptq.calib import build_model_inputs, builtin_samples
from hf_vlm_gptq.config_fields import PART_SWITCHES

HELD_OUT = 24  # held-out built-in samples (another seed): 18 pictures, 4 clips, 2 text-only turns


def build(arch: str, root: Path) -> Path:
    """A few-million-parameter model of `arch` (widths that group size 128 divides, some it does not)."""
    builder = spec_for_name(arch).tiny_builder_function()
    params = inspect.signature(builder).parameters
    size = {"seed": 0, "num_llm_layers": 4, "vision_depth": 4, "hidden_size": 256}
    size["vision_embed_dim" if "vision_embed_dim" in params else "vision_hidden_size"] = 128
    if "vision_intermediate_size" in params:
        size["vision_intermediate_size"] = 432
    return builder(root / arch, **size)


def parts(arch: str) -> dict[str, dict[str, bool]]:
    """Row name -> flags: each part alone (the bridge: every visual component after the vision tower), then
    everything."""
    comps = spec_for_name(arch).components
    off = dict.fromkeys(PART_SWITCHES, False)
    vision = {c.flag: True for c in comps if c.name == "vision"}
    bridge = {c.flag: True for c in comps if c.part == "visual" and c.name != "vision"}
    llm = {c.flag: True for c in comps if c.part == "llm"}
    return {"vision": {**off, **vision}, "bridge": {**off, **bridge}, "llm": {**off, **llm},
            "all": {**off, **vision, **bridge, **llm}}


def kind_of(batch: dict) -> str:
    """Which held-out modality a processed sample is: "video", "image" or "text"."""
    return "video" if "pixel_values_videos" in batch else "image" if "pixel_values" in batch else "text"


def rel_errors(model, reference: list[torch.Tensor], inputs: list[dict]) -> dict[str, float]:
    """||logits - float logits|| / ||float logits|| over all held-out samples, and per modality."""
    sums: dict[str, list[float]] = {}
    with torch.no_grad():
        for ref, batch in zip(reference, inputs):
            out = model(**batch).logits
            for key in ("all", kind_of(batch)):
                num_den = sums.setdefault(key, [0.0, 0.0])
                num_den[0] += (out - ref).pow(2).sum().item()
                num_den[1] += ref.pow(2).sum().item()
    return {key: (num / den) ** 0.5 for key, (num, den) in sums.items()}


def run(archs: list[str], num_samples: int, quick: bool) -> list[dict]:
    rows = []
    with scratch_dir("bench_quality_") as root:
        for arch in archs:
            path = build(arch, root)
            processor = AutoProcessor.from_pretrained(path)
            float_model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
            held_out = build_model_inputs(builtin_samples(HELD_OUT, seed=777), processor, max_seq_len=1024)
            with torch.no_grad():
                reference = [float_model(**b).logits for b in held_out]
            n_params = sum(p.numel() for p in float_model.parameters())
            del float_model
            settings = [(4, 128), (3, 128)] if not quick else [(4, 128)]
            variants = [("split", {"visual_split": True, "llm_split": True})] if not quick else []
            for bits, group in settings:
                for part, flags in parts(arch).items():
                    for method in ("rtn", "gptq"):
                        rows.append(measure(arch, path, n_params, part, flags, method, bits, group, num_samples,
                                            reference, held_out, {}))
            for name, extra in variants:
                for method in ("rtn", "gptq"):
                    rows.append(measure(arch, path, n_params, f"all+{name}", parts(arch)["all"], method, 4, 128,
                                        num_samples, reference, held_out, extra))
    return rows


def measure(arch, path, n_params, part, flags, method, bits, group, num_samples, reference, held_out, extra):
    rtn = method == "rtn"
    cfg = VLMGPTQConfig(num_samples=num_samples, w_groupsize=group, visual_w_bits=bits, llm_w_bits=bits,
                        visual_w_rtn=rtn, llm_w_rtn=rtn, **flags, **extra)
    with Stopwatch() as watch:
        model = AutoModelForImageTextToText.from_pretrained(path, quantization_config=cfg, dtype=torch.float32)
    seconds = watch.seconds
    errors = rel_errors(model.eval(), reference, held_out)
    err = errors["all"]
    row = {"arch": arch, "params_M": round(n_params / 1e6, 2), "part": part, "method": method, "bits": bits,
           "group": group, "rel_logit_error": err,
           **{f"rel_logit_error_{kind}": errors[kind] for kind in ("image", "video", "text") if kind in errors},
           "quantize_s": round(seconds, 2)}
    per_kind = "  ".join(f"{k} {v:.4f}" for k, v in errors.items() if k != "all")
    print(f"{arch:<14} {part:<10} w{bits}g{group} {method:<4} rel.err {err:.4f}  ({per_kind})  ({seconds:.1f} s)",
          flush=True)
    return row


def to_markdown(rows: list[dict]) -> str:
    """One line per (arch, part, bits, group): RTN and GPTQ errors, and GPTQ / RTN overall and per modality."""
    lines = ["| arch | part | bits/group | RTN rel. err | GPTQ rel. err | GPTQ / RTN | image | video | text |",
             "|---|---|---|---|---|---|---|---|---|"]
    keyed = {(r["arch"], r["part"], r["bits"], r["group"], r["method"]): r for r in rows}
    for (arch, part, bits, group, method), r in keyed.items():
        if method != "gptq":
            continue
        rtn = keyed[(arch, part, bits, group, "rtn")]
        ratios = []
        for kind in ("image", "video", "text"):
            key = f"rel_logit_error_{kind}"
            ratios.append(f"{r[key] / rtn[key]:.2f}" if key in r and rtn.get(key) else "-")
        g, base = r["rel_logit_error"], rtn["rel_logit_error"]
        lines.append(f"| {arch} ({r['params_M']} M) | {part} | w{bits} g{group} | {base:.4f} | {g:.4f} | "
                     f"{g / base:.2f} | {' | '.join(ratios)} |")
    return "\n".join(lines)


NOTES = """Errors are relative L2 distances of the logits to the float model's; the last three columns are
GPTQ / RTN on the held-out pictures, clips and text-only turns (`-`: that part does not touch that input).
`all+split` is `all` with `visual_split` and `llm_split` (input channel 0 of fc2 / down_proj kept in full
precision): these random-weight models have no outlier channel 0, so it is expected to match `all`, not to
beat it; the row shows the split path runs and costs nothing."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default=",".join(spec.name for spec in ARCHITECTURES))
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="4-bit only, no split rows")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = run(args.archs.split(","), args.samples, args.quick)
    table = to_markdown(rows)
    print("\n" + table)
    write_results("quality", {"rows": rows, "samples": args.samples, "held_out": HELD_OUT},
                  f"# python -m bench.quality ({time.strftime('%Y-%m-%d')}, CPU, calibration {args.samples} built-in "
                  f"samples, {HELD_OUT} held-out samples of another seed)\n\n{table}\n\n{NOTES}\n",
                  device_suffix=False)


if __name__ == "__main__":
    main()

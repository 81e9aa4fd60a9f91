"""Quantization speed: our pipeline vs a plain eager GPTQ (bench/reference_gptq.py) vs llm-compressor, one run.

    python -m bench.quantize_speed --config small              # CPU: a mid-size Qwen2-VL-style model
    python -m bench.quantize_speed --config small --dtype bfloat16   # the same model in bf16 (as checkpoints are)
    python -m bench.quantize_speed --config 7b --llm-layers 4 --vision-depth 4 --max-minutes 4   # CUDA

Same model (same seed), same calibration batches, 4-bit, group 128, symmetric, MSE clip, act-order off,
damping 0.01, the 15-level grid (`SAME_AS_REFERENCE`; a row with this release's defaults beside it).
Ours goes through the public API: `from_pretrained(dir, quantization_config=VLMGPTQConfig(...))` for the
small config (a checkpoint on disk), `hf_vlm_gptq.api.quantize(model, cfg, data=batches)` for the 7B config
(random weights built directly on the GPU: a 16 GB checkpoint write + load would add the same time to every
row). The reference quantizes every part the same way with its own Hessians and solves. llm-compressor
(GPTQModifier, language model only: it has no path for the vision tower) runs in its own virtualenv as a
subprocess on the same batches, beside an LLM-only run of ours. Per-layer proxy losses
`tr((W-Q) H (W-Q)^T)` are compared with the reference's; later layers see slightly different inputs on each
side (each calibrates on its own quantized earlier layers), so the geometric mean of the per-layer ratios and
the sums per part are the figures to read (exit status 1 when ours is worse). CPU: fastest of 2 rounds, the
methods taking turns. Writes quantize_speed_<cpu|cuda>.{json,md} (bench.harness says where;
quantize_speed_<dtype>_<cpu|cuda> for a --dtype other than the config's default).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

import hf_vlm_gptq
from bench._common import PartTimer, checksum, qwen2vl_config, random_qwen2vl, synthetic_batches
from bench.harness import (
    Stopwatch,
    cpu_pressure,
    env_info,
    loadavg,
    scratch_dir,
    wait_for_quiet,
    write_results,
)
from bench.reference_gptq import reference_quantize
from hf_vlm_gptq import VLMGPTQConfig
from hf_vlm_gptq.api import quantize
from hf_vlm_gptq.config_fields import DEFAULTS

logger = logging.getLogger("bench.quantize_speed")
LLMC_PYTHON = "/work/llmc-venv/bin/python"
SMALL = {"hidden_size": 512, "num_llm_layers": 4, "vision_depth": 4, "vision_embed_dim": 256,
         "text_config": {"intermediate_size": 2048}, "max_pixels": 252 * 252}


# The algorithm the reference and llm-compressor's recipe run (damping 0.01, the 15-level symmetric grid,
# plain Hessians, natural order): ours runs the same, so times and losses compare like with like; this
# release's defaults (GPTAQ, damping 0.1, the 16-level grid) are the extra "ours, defaults" row.
SAME_AS_REFERENCE = {"percdamp": 0.01, "sym_full_range": False, "gptaq": False, "hessian_weighting": "none",
                     "group_order": False, "act_order": False}


def _cfg(args, **flags) -> VLMGPTQConfig:
    return VLMGPTQConfig(num_samples=args.samples, w_groupsize=args.group, max_seq_len=args.seq_len,
                         calibration_device=args.device, **{**SAME_AS_REFERENCE, **flags})


class Setup:
    """Builds the same model (and batches) for every method."""

    def __init__(self, args, tmp: Path) -> None:
        self.args = args
        self.dtype = getattr(torch, args.dtype)
        self.tmp = tmp
        if args.config == "small":
            from transformers import AutoProcessor

            from hf_vlm_gptq.calib import build_model_inputs, builtin_samples
            from hf_vlm_gptq.testing import build_tiny_qwen2vl

            self.path = build_tiny_qwen2vl(self.tmp / "model", seed=0, **SMALL)
            processor = AutoProcessor.from_pretrained(self.path)
            # pictures only: llm-compressor's traced pipeline needs every sample to take the same inputs
            pool = builtin_samples(2 * args.samples, seed=0, with_video=False)
            self.samples = [s for s in pool if "image" in s][:args.samples]
            self.batches = build_model_inputs(self.samples, processor, max_seq_len=args.seq_len)
        else:
            self.path = None
            self.config = qwen2vl_config(args.config, args.llm_layers, args.vision_depth)
            self.batches = synthetic_batches(args.samples, args.seq_len, text_only_every=8)
        self.fingerprint = None

    def model(self):
        if self.path is not None:
            from transformers import AutoModelForImageTextToText

            return AutoModelForImageTextToText.from_pretrained(self.path, dtype=self.dtype).eval()
        model = random_qwen2vl(self.config, self.args.device, self.dtype, seed=0)
        fp = checksum(model)
        if self.fingerprint is not None and fp != self.fingerprint:
            raise RuntimeError("two seeded builds of the model differ; the comparison would be meaningless")
        self.fingerprint = fp
        return model

    def ours(self, **flags) -> tuple[float, dict[str, float], dict]:
        """(seconds, seconds per part, records) of our pipeline through the public API."""
        cfg = _cfg(self.args, **flags)
        watch = Stopwatch(self.args.device)
        with PartTimer() as parts:
            if self.path is not None:
                from transformers import AutoModelForImageTextToText

                cfg.dataset = self.samples  # through the processor again: the same batches the others get
                with watch:
                    model = AutoModelForImageTextToText.from_pretrained(self.path, quantization_config=cfg,
                                                                        dtype=self.dtype)
                    records = hf_vlm_gptq.get_quantizers(model)
            else:
                model = self.model()
                with watch:
                    records = quantize(model, cfg, data=self.batches, progress=False)
        del model
        return watch.seconds, parts.seconds(watch.end), records


def _keep(best: dict[str, dict], name: str, seconds: float, parts: dict[str, float]) -> None:
    """Keep the fastest round of each method (other jobs on a shared host only ever slow a run down)."""
    if name not in best or seconds < best[name]["seconds"]:
        best[name] = {"name": name, "seconds": seconds, "parts": parts}


def run_llmc(setup: Setup, args) -> dict:
    """llm-compressor in its own virtualenv on the same batches; {"error": why} when it cannot run."""
    python = args.llmc_python
    if setup.path is None:
        return {"error": "not run for the random-weight 7B config (it needs a checkpoint on disk)"}
    if not python or not Path(python).exists():
        return {"error": f"no llm-compressor virtualenv at {python} (pip install llmcompressor there)"}
    batches = setup.tmp / "batches.pt"
    torch.save(setup.batches, batches)
    out = setup.tmp / "llmc.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [python, str(Path(__file__).with_name("llmc_gptq.py")), str(setup.path), str(batches), str(out),
           "--group", str(args.group), "--dtype", str(setup.dtype).removeprefix("torch.")]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.llmc_timeout, env=env,
                              cwd=setup.tmp)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.llmc_timeout} s"}
    if proc.returncode != 0 or not out.exists():
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    result = json.loads(out.read_text())
    # its log: "Quantizing 1 module(s): ['<name>']" then "METRIC - error <sum of err^2 / 2>"
    log = proc.stdout + proc.stderr
    names = re.findall(r"Quantizing 1 module\(s\): \['([^']+)'\]", log)
    errors = [float(x) for x in re.findall(r"METRIC - error ([0-9.eE+-]+)", log)]
    if names and len(names) == len(errors):
        # its Hessian is 2/samples * sum over tokens (ours: 2/tokens * sum): rescale to ours
        per_sample = sum(b["input_ids"].shape[-1] for b in setup.batches) / len(setup.batches)
        result["losses"] = {name: 2 * err / per_sample for name, err in zip(names, errors)}
    return result


def no_worse(parts: dict[str, dict]) -> tuple[bool, float]:
    """(verdict, geometric mean of the per-layer loss ratios ours / reference over every part).

    Each side calibrates later layers on its own quantized earlier ones, so single layers differ both ways by
    a few percent (more in bf16); the verdict asks the mean ratio to stay within 1% and no part's sum to be
    more than 3% worse.
    """
    logs = [math.log(r) for p in parts.values() for r in p["ratios_all"]]
    geomean = math.exp(sum(logs) / len(logs)) if logs else 1.0
    return geomean <= 1.01 and all(p["loss_ratio"] <= 1.03 for p in parts.values()), geomean


def compare(ours: dict, ref: dict) -> dict[str, dict]:
    """Per part: layers both solved, loss sums and ratio, worst and median per-layer ratio, solve seconds."""
    parts: dict[str, dict] = {}
    for path, rec in ref.records.items():
        if path not in ours:
            continue
        mine = ours[path]
        p = parts.setdefault(rec.component, {"layers": 0, "loss_ours": 0.0, "loss_ref": 0.0, "ratios": [],
                                              "layer_s_ours": 0.0, "layer_s_ref": 0.0})
        p["layers"] += 1
        p["loss_ours"] += mine.loss
        p["loss_ref"] += rec.loss
        p["ratios"].append(mine.loss / rec.loss if rec.loss > 0 else 1.0)
        p["layer_s_ours"] += mine.seconds
        p["layer_s_ref"] += rec.hessian_s + rec.solve_s
    for p in parts.values():
        ratios = sorted(p.pop("ratios"))
        p["ratios_all"] = ratios
        p["loss_ratio"] = p["loss_ours"] / p["loss_ref"] if p["loss_ref"] > 0 else 1.0
        p["worst_layer_ratio"], p["median_layer_ratio"] = ratios[-1], ratios[len(ratios) // 2]
    return parts


def render(args, rows: list[dict], parts: dict, llmc: dict, ours_llm: dict | None, meta: dict) -> str:
    """The markdown report."""
    dtype = "" if args.stem == "quantize_speed" else f" --dtype {args.dtype}"
    lines = [f"# python -m bench.quantize_speed --config {args.config}{dtype} ({meta['env']['date']}, "
             f"{meta['device']}, {args.samples} samples x ~{meta['tokens_per_sample']} tokens, w4 g{args.group}, "
             f"fastest of {args.repeat} rounds)", "",
             f"Model: {meta['model']}. loadavg before {meta['loadavg_before']}, after {meta['loadavg_after']}; CPU "
             f"pressure (PSI avg10, %) before {meta['cpu_pressure_before']}, after {meta['cpu_pressure_after']}.", "",
             "| run | total s | vision s | merger s | llm s |", "|---|---|---|---|---|"]
    for r in rows:
        p = r["parts"]
        lines.append(f"| {r['name']} | {r['seconds']:.1f} | {p.get('vision', 0):.1f} | {p.get('merger', 0):.1f} | "
                     f"{p.get('llm', 0):.1f} |")
    lines += ["", "Per part, layers solved by both (loss = sum of per-layer proxy losses; layer s = Hessian + solve "
              "seconds of those layers):", "",
              "| part | layers | loss ours | loss reference | ours / ref | median layer ratio | worst layer ratio | "
              "layer s ours | layer s ref | speedup |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, p in parts.items():
        lines.append(f"| {name} | {p['layers']} | {p['loss_ours']:.5g} | {p['loss_ref']:.5g} | {p['loss_ratio']:.4f} | "
                     f"{p['median_layer_ratio']:.4f} | {p['worst_layer_ratio']:.4f} | {p['layer_s_ours']:.1f} | "
                     f"{p['layer_s_ref']:.1f} | {p['layer_s_ref'] / max(p['layer_s_ours'], 1e-9):.2f}x |")
    verdict, geomean = no_worse(parts)
    lines += ["", f"Losses no worse than the reference: **{'yes' if verdict else 'NO'}** (geometric mean of the "
              f"per-layer ratios ours / reference {geomean:.4f}; asked: <= 1.01, and every part's sum <= 1.03x)"]
    if "error" in llmc:
        lines += ["", f"llm-compressor: not installed / failed: {llmc['error']}"]
    else:
        llm_s = {r["name"]: r["parts"].get("llm", r["seconds"]) for r in rows}
        ours_s, noclip_s = llm_s["ours, LLM only"], llm_s["ours, LLM only, no clip search"]
        lines += ["", f"llm-compressor {llmc['versions']['llmcompressor']} (transformers "
                  f"{llmc['versions']['transformers']}), GPTQModifier W4 g{args.group}, language model only: "
                  f"**{llmc['seconds']:.1f} s** (its `oneshot` call) vs ours with quant_llm only **{ours_s:.1f} s** "
                  f"(the LLM part of from_pretrained; {noclip_s:.1f} s without the MSE clip search, which "
                  f"llm-compressor does not do): llm-compressor / ours = {llmc['seconds'] / ours_s:.2f}x "
                  f"({llmc['seconds'] / noclip_s:.2f}x against no clip search)."]
        common = [k for k in llmc.get("losses", {}) if k in ours_llm]
        if common:
            lo, ll = sum(ours_llm[k] for k in common), sum(llmc["losses"][k] for k in common)
            lines.append(f"Its per-layer GPTQ error (tr((W-Q) H_damped (W-Q)^T) on its own Hessians, rescaled to "
                         f"our 2/tokens normalization; its grid: absmax/7.5, no clip search) summed over "
                         f"{len(common)} layers: {ll:.5g}; ours (LLM only): {lo:.5g}, ours / llm-compressor = "
                         f"{lo / ll:.3f}.")
    if meta.get("stopped_early"):
        lines += ["", f"The reference stopped at the time limit: blocks done {meta['blocks_done']}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=("small", "7b"), default="small")
    parser.add_argument("--samples", type=int, default=None, help="default: 32 (small), 128 (7b)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--llm-layers", type=int, default=None, help="7b: fewer LLM layers (default: all 28)")
    parser.add_argument("--vision-depth", type=int, default=None, help="7b: fewer vision blocks (default: 32)")
    parser.add_argument("--max-minutes", type=float, default=30.0, help="stop the reference when time is up")
    parser.add_argument("--repeat", type=int, default=None, help="rounds (fastest kept); default 2 on CPU, 1 on CUDA")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="the model's dtype; default float32 (small), bfloat16 (7b)")
    parser.add_argument("--skip-llmc", action="store_true")
    parser.add_argument("--llmc-python", default=LLMC_PYTHON)
    parser.add_argument("--llmc-timeout", type=int, default=900)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    deadline = time.perf_counter() + args.max_minutes * 60
    args.samples = args.samples or (32 if args.config == "small" else 128)
    default_dtype = "float32" if args.config == "small" else "bfloat16"
    args.dtype = args.dtype or default_dtype
    args.stem = "quantize_speed" if args.dtype == default_dtype else f"quantize_speed_{args.dtype}"
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.repeat = args.repeat or (1 if args.device == "cuda" else 2)
    with scratch_dir("bench_qspeed_") as tmp:
        code = run_rounds(args, tmp, deadline)
    sys.exit(code)


def run_rounds(args, tmp: Path, deadline: float) -> int:
    """The bench in ``tmp``; its exit status (1 where a part of ours lost to the reference)."""
    pressure_before = wait_for_quiet()
    load_before = loadavg()
    setup = Setup(args, tmp)
    logger.info("built the model and %d batches", len(setup.batches))

    best: dict[str, dict] = {}
    records = ref = ours_llm = None
    llmc: dict = {"error": "skipped (--skip-llmc)"} if args.skip_llmc else {}
    only_llm = {f: False for f in ("quant_visual_clip", "quant_cross_attention", "quant_visual_projector")}
    for round_ in range(args.repeat):
        if round_ and time.perf_counter() + 1.2 * sum(r["seconds"] for r in best.values()) > deadline:
            logger.info("no time for round %d", round_ + 1)
            break
        seconds, parts_s, recs = setup.ours()
        records = records or recs
        _keep(best, "ours", seconds, parts_s)
        d_s, d_parts, _ = setup.ours(**{k: DEFAULTS[k] for k in SAME_AS_REFERENCE})
        _keep(best, "ours, this release's defaults", d_s, d_parts)
        model = setup.model()
        with Stopwatch(args.device) as watch:
            run = reference_quantize(model, setup.batches, group_size=args.group, deadline=deadline)
        del model
        ref = ref or run
        if not run.stopped_early or round_ == 0:
            _keep(best, "reference (eager GPTQ)", watch.seconds, run.part_seconds)
        logger.info("round %d: ours %.1f s, reference %.1f s", round_ + 1, seconds, watch.seconds)
        if "error" in llmc:
            continue
        this = run_llmc(setup, args)
        if "error" in this:
            llmc = this
            continue
        llmc = this if "seconds" not in llmc or this["seconds"] < llmc["seconds"] else llmc
        _keep(best, "llm-compressor, LLM only", this["seconds"], {"llm": this["seconds"]})
        for name, extra in (("ours, LLM only", {}), ("ours, LLM only, no clip search", {"llm_w_clip": False})):
            s_, p_, recs_ = setup.ours(**only_llm, **extra)
            _keep(best, name, s_, p_)
            if not extra and ours_llm is None:
                ours_llm = {k: r.loss for k, r in recs_.items()}
    print(f"llm-compressor: {'ran' if 'error' not in llmc else 'not installed / failed: ' + llmc['error']}")
    rows = list(best.values())
    parts = compare(records, ref)

    tokens = sum(b["input_ids"].shape[-1] for b in setup.batches) // len(setup.batches)
    model_desc = (f"tiny Qwen2-VL {SMALL}, {args.dtype}" if args.config == "small" else
                  f"Qwen2-VL-{args.config.upper()} config, {setup.config.text_config.num_hidden_layers} LLM layers, "
                  f"{setup.config.vision_config.depth} vision blocks, random bf16 weights")
    meta = {"env": env_info(), "device": args.device, "model": model_desc, "tokens_per_sample": tokens,
            "loadavg_before": load_before, "loadavg_after": loadavg(), "cpu_pressure_before": pressure_before,
            "cpu_pressure_after": cpu_pressure(), "stopped_early": ref.stopped_early,
            "blocks_done": ref.blocks_done}
    table = render(args, rows, parts, llmc, ours_llm, meta)
    print(table)
    per_layer = {path: {"ours": records[path].loss, "reference": rec.loss, "ours_s": records[path].seconds,
                        "reference_hessian_s": rec.hessian_s, "reference_solve_s": rec.solve_s}
                 for path, rec in ref.records.items() if path in records}
    payload = {"meta": meta, "args": vars(args), "rows": rows, "parts": parts, "per_layer": per_layer,
               "llmc": llmc, "ours_llm_only": ours_llm}
    path = write_results(args.stem, payload, table)
    logger.info("wrote %s", path)
    return 0 if no_worse(parts)[0] else 1


if __name__ == "__main__":
    main()

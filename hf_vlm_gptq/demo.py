"""The offline demo: tiny VLM -> quantize on the built-in set -> save -> reload -> generate (image, video).

Everything is built on the spot (config, random weights, a tokenizer trained here, the real processor),
so it runs with no network. It exercises the same public path a user takes.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .arch import ARCHITECTURES, spec_for_name
from .calib import build_model_inputs, builtin_samples
from .config import VLMGPTQConfig
from .report import records_to_table

DEMO_ARCHS = tuple(spec.name for spec in ARCHITECTURES)


def _prompts(processor) -> dict[str, dict]:
    """Held-out prompts (no answer, so they end in a generation prompt): one picture and one clip."""
    samples = builtin_samples(12, seed=1234)
    picked = {kind: next(s for s in samples if kind in s) for kind in ("image", "video")}
    return {kind: build_model_inputs([{k: v for k, v in s.items() if k != "answer"}], processor,
                                     max_seq_len=2048)[0] for kind, s in picked.items()}


def run_demo(arch: str = "qwen2_vl", out_dir: str | Path | None = None, num_samples: int = 16,
             overwrite: bool = False) -> dict[str, Any]:
    """Run the whole path once and return what happened (report table, timings, reload check, text).

    `out_dir`: where the quantized checkpoint stays (an existing one is replaced only with `overwrite`, and
    only when this package wrote it); None: a temporary folder, removed with everything else the demo
    built before this returns."""
    from .outdir import OutputDir

    if arch not in DEMO_ARCHS:
        raise ValueError(f"demo arch must be one of {sorted(DEMO_ARCHS)}, got {arch!r}")
    if out_dir is not None:  # a bad --out (a file, a folder this package did not write, no --overwrite) fails now
        OutputDir(out_dir, overwrite=overwrite, command="demo").discard()
    with tempfile.TemporaryDirectory(prefix="hf_vlm_gptq_demo_") as work:
        report = _run(arch, Path(work), out_dir, num_samples, overwrite)
    if out_dir is None:
        report["checkpoint"] = "(a temporary folder, removed; pass --out DIR to keep it)"
    return report


def _run(arch: str, work: Path, out_dir: str | Path | None, num_samples: int, overwrite: bool) -> dict[str, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from . import get_quantizers
    from .outdir import save_model_atomic

    source = spec_for_name(arch).build_tiny(work / "tiny-float")
    out = Path(out_dir) if out_dir is not None else work / "tiny-w4g32"

    processor = AutoProcessor.from_pretrained(source)
    config = VLMGPTQConfig(num_samples=num_samples, w_groupsize=32)
    start = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(source, quantization_config=config, dtype=torch.float32)
    quantize_seconds = time.perf_counter() - start
    table = records_to_table(get_quantizers(model))
    save_model_atomic(model, out, processor=processor, overwrite=overwrite, command="demo")

    reloaded = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    report: dict[str, Any] = {"table": table, "checkpoint": str(out), "quantize_seconds": round(quantize_seconds, 2),
                              "reload_logits_max_abs_diff": 0.0}
    for kind, inputs in _prompts(processor).items():
        with torch.no_grad():
            diff = (model(**inputs).logits - reloaded(**inputs).logits).abs().max().item()
            generated = reloaded.generate(**inputs, max_new_tokens=8, do_sample=False)
        report["reload_logits_max_abs_diff"] = max(report["reload_logits_max_abs_diff"], diff)
        new_tokens = generated[:, inputs["input_ids"].shape[1]:]
        report[f"generated_{kind}"] = repr(processor.batch_decode(new_tokens, skip_special_tokens=True)[0])
    return report

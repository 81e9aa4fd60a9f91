"""Promises about numbers that go wrong, and an honest report (issue 10, points 13 and 15).

Point 13: each problem names the layer, and is found before the work it would spoil.
* Non-finite weights (inf / nan) in any layer that would be quantized: an error naming every such layer,
  before the first calibration pass (nothing is quantized).
* A weight too large for a float16 scale (the checkpoint stores scales in float16): the same, up front.
* An fp16 overflow in the calibration forward pass: an error naming the first layer whose input holds inf /
  nan, before its Hessian is used.
* Scales that underflow to 0 in float16: recorded in the module's stats (`scales_underflow`), with a
  warning naming the layer, and shown in the report.

Point 15: a layer that saw no usable input has `loss: null`, not 0.0; a layer that saw samples whose inputs
were all zero says so ("inputs all zero"), not "no calibration input".
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn
from transformers import AutoModelForImageTextToText

import hf_vlm_gptq
from hf_vlm_gptq import VLMGPTQConfig
from hf_vlm_gptq.api import quantize

LLM = "model.language_model.layers"
TEXT = [{"text": "Write a haiku about autumn.", "answer": "Red leaves fall slowly, one by one."},
        {"text": "What is two plus two?", "answer": "Two plus two is four."},
        {"text": "Name a color.", "answer": "Blue, like the sky."}]


def load(path, dtype=torch.float32):
    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).eval()


def config(**options) -> VLMGPTQConfig:
    options = {"w_groupsize": 32, "num_samples": 3, **options}
    return VLMGPTQConfig(**options)


class CountForwards:
    """Counts forward passes of the whole model."""

    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        model.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1


def report_rows(model) -> dict[str, dict]:
    return {row["path"]: row for row in json.loads(hf_vlm_gptq.quantization_report(model, as_json=True))["modules"]}


# --- point 13 ---------------------------------------------------------------------------------------


def test_non_finite_weights_are_named_before_calibration_starts(tiny_qwen2vl_dir):
    model = load(tiny_qwen2vl_dir)
    with torch.no_grad():
        model.get_submodule(f"{LLM}.1.mlp.down_proj").weight[3, 5] = float("nan")
        model.get_submodule("model.visual.blocks.0.attn.qkv").weight[0, 0] = float("inf")
        model.get_submodule("model.lm_head" if hasattr(model.model, "lm_head") else "lm_head").weight[0, 0] = \
            float("nan")  # not quantized: not this check's business
    forwards = CountForwards(model)
    with pytest.raises(ValueError, match="non-finite weights") as err:
        quantize(model, config(), data=TEXT, progress=False)
    message = str(err.value)
    assert f"{LLM}.1.mlp.down_proj (1 of" in message and "model.visual.blocks.0.attn.qkv (1 of" in message
    assert "lm_head" not in message
    assert forwards.calls == 0  # found before the first calibration pass
    assert isinstance(model.get_submodule("model.visual.patch_embed.proj"), nn.Conv3d)  # nothing quantized


def test_non_finite_weights_in_a_kept_or_disabled_part_are_not_an_error(tiny_qwen2vl_dir):
    model = load(tiny_qwen2vl_dir)
    with torch.no_grad():
        model.get_submodule(f"{LLM}.1.mlp.down_proj").weight[3, 5] = float("nan")
        model.get_submodule("model.visual.blocks.0.attn.qkv").weight[0, 0] = float("inf")
    records = quantize(model, config(quant_visual_clip=False, quant_cross_attention=False, llm_w_rtn=True,
                                     modules_to_not_convert=[f"{LLM}.1.mlp.down_proj"]), data=TEXT, progress=False)
    assert f"{LLM}.0.mlp.down_proj" in records and f"{LLM}.1.mlp.down_proj" not in records


def test_a_weight_too_large_for_float16_scales_is_named_before_calibration(tiny_qwen2vl_dir):
    model = load(tiny_qwen2vl_dir)
    with torch.no_grad():
        model.get_submodule(f"{LLM}.0.self_attn.q_proj").weight[2, 7] = 1e6  # finite, but 1e6 / 7 > 65504
    forwards = CountForwards(model)
    with pytest.raises(ValueError, match=rf"float16 scales.*{LLM}\.0\.self_attn\.q_proj \(largest weight 1e\+06"):
        quantize(model, config(), data=TEXT, progress=False)
    assert forwards.calls == 0


def test_an_fp16_overflow_in_calibration_names_the_layer(tiny_qwen2vl_dir):
    model = load(tiny_qwen2vl_dir, dtype=torch.float16)
    with torch.no_grad():  # gate and up ~1e3 each: their product overflows float16 (max 65504)
        model.get_submodule(f"{LLM}.0.mlp.gate_proj").weight.mul_(1e3)
        model.get_submodule(f"{LLM}.0.mlp.up_proj").weight.mul_(1e3)
    with pytest.raises(ValueError, match=rf"{LLM}\.0\.mlp\.down_proj: its calibration input holds inf.*float16"):
        quantize(model, config(quant_visual_clip=False, quant_cross_attention=False), data=TEXT, progress=False)
    # found while catching block 0's inputs, before any solve; the layers keep no checks once the run is over
    down = model.get_submodule(f"{LLM}.0.mlp.down_proj")
    assert isinstance(down, nn.Linear) and not down._forward_pre_hooks
    assert not any(m._forward_pre_hooks for m in model.model.language_model.modules())


def test_scales_that_underflow_in_float16_are_recorded_and_reported(tiny_qwen2vl_dir, caplog):
    model = load(tiny_qwen2vl_dir)
    gate = f"{LLM}.0.mlp.gate_proj"
    with torch.no_grad():
        model.get_submodule(gate).weight[:, :32].mul_(1e-12)  # the first group of every row: scale ~1e-13
    with caplog.at_level(logging.WARNING, logger="hf_vlm_gptq"):
        quantize(model, config(quant_visual_clip=False, quant_cross_attention=False), data=TEXT, progress=False)
    rows = model.get_submodule(gate).out_features
    assert any(gate in r.getMessage() and "underflow" in r.getMessage() for r in caplog.records)
    assert report_rows(model)[gate]["extra"]["scales_underflow"] == rows
    assert model.config.quantization_config.stats[gate]["scales_underflow"] == rows  # saved with the checkpoint
    table = hf_vlm_gptq.quantization_report(model)
    assert f"{rows} scales underflow to 0" in next(line for line in table.splitlines() if "0.mlp.gate_proj" in line)
    assert "scales_underflow" not in report_rows(model)[f"{LLM}.0.mlp.up_proj"]["extra"]


def test_the_underflow_note_survives_save_and_reload(tiny_qwen2vl_dir, tmp_path):
    model = load(tiny_qwen2vl_dir)
    gate = f"{LLM}.0.mlp.gate_proj"
    with torch.no_grad():
        model.get_submodule(gate).weight[:, :32].mul_(1e-12)
    quantize(model, config(quant_visual_clip=False, quant_cross_attention=False), data=TEXT, progress=False)
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "q", dtype=torch.float32)
    rows = model.get_submodule(gate).out_features
    assert report_rows(reloaded)[gate]["extra"]["scales_underflow"] == rows
    assert f"{rows} scales underflow to 0" in hf_vlm_gptq.quantization_report(reloaded)


# --- point 15 ---------------------------------------------------------------------------------------


def test_the_report_says_what_a_layer_saw(tiny_qwen2vl_dir):
    """Text-only samples: the vision parts see nothing. Layer 0's up_proj zeroed: its down_proj sees samples
    whose inputs are all zero."""
    model = load(tiny_qwen2vl_dir)
    with torch.no_grad():
        model.get_submodule(f"{LLM}.0.mlp.up_proj").weight.zero_()
    quantize(model, config(), data=TEXT, progress=False)
    rows = report_rows(model)
    table = hf_vlm_gptq.quantization_report(model)
    for path in ("model.visual.patch_embed.proj", "model.visual.blocks.0.attn.qkv", "model.visual.merger.mlp.0"):
        assert rows[path]["samples"] == 0 and rows[path]["fallback"] == "no calibration input"
        assert rows[path]["loss"] is None, path  # not 0.0
    down = rows[f"{LLM}.0.mlp.down_proj"]
    assert down["samples"] == 3 and down["tokens"] > 0
    assert down["loss"] is None
    assert down["fallback"].startswith("inputs all zero (3 samples")
    line = next(line for line in table.splitlines() if "layers.0.mlp.down_proj" in line)
    assert "inputs all zero" in line and "no calibration input" not in line
    assert rows[f"{LLM}.1.mlp.down_proj"]["loss"] > 0  # a layer with real input keeps its loss
    stats = model.config.quantization_config.stats
    assert stats[f"{LLM}.0.mlp.down_proj"]["loss"] is None and stats["model.visual.merger.mlp.0"]["loss"] is None

"""VideoLLaMA3 end to end through the public API, at a group size that divides its widths unevenly (32: the
112-wide vision MLP and the 588-wide Conv2d stem end in a partial group) and one wider than most layers (128):
from_pretrained quantizes every part, save/reload gives identical logits, generate() runs on an image and on
a video, and a bfloat16 reload still feeds the quantized stem (`pixel_values.type(self.dtype)`)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from hf_vlm_gptq import VLMGPTQConfig, get_quantizers, quantization_report
from hf_vlm_gptq.calib import build_model_inputs, builtin_samples
from hf_vlm_gptq.ops import QuantConv, QuantLinear

STEM = "model.vision_model.embeddings.patch_embedding"
VISION = "model.vision_model.encoder.layers"
PROJECTOR = "model.projector"
LLM = "model.language_model.layers"
VISION_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                  "mlp.fc2")
LLM_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")
NUM_SAMPLES = 12


def quantize(path, **options):
    options.setdefault("num_samples", NUM_SAMPLES)
    options.setdefault("w_groupsize", 32)
    return AutoModelForImageTextToText.from_pretrained(path, quantization_config=VLMGPTQConfig(**options),
                                                       dtype=torch.float32)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="module")
def eval_inputs(tiny_videollama3_dir):
    """Held-out prompts (another seed, no answer, so they end in a generation prompt): one image, one video."""
    processor = AutoProcessor.from_pretrained(tiny_videollama3_dir)
    samples = builtin_samples(12, seed=99)
    picked = {"image": next(s for s in samples if "image" in s), "video": next(s for s in samples if "video" in s)}
    return {kind: build_model_inputs([{k: v for k, v in s.items() if k != "answer"}], processor)[0]
            for kind, s in picked.items()}


@pytest.fixture(scope="module")
def float_model(tiny_videollama3_dir):
    return AutoModelForImageTextToText.from_pretrained(tiny_videollama3_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=[32, 128], ids=["g32", "g128"])
def quantized(request, tiny_videollama3_dir):
    return quantize(tiny_videollama3_dir, w_groupsize=request.param).eval()


@pytest.fixture(scope="module")
def saved(quantized, tmp_path_factory):
    out = tmp_path_factory.mktemp("vl3") / "tiny-w4"
    quantized.save_pretrained(out)
    AutoProcessor.from_pretrained(quantized.name_or_path).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def reloaded(saved):
    return AutoModelForImageTextToText.from_pretrained(saved, dtype=torch.float32).eval()


def test_every_part_is_packed_in_order(quantized):
    m = quantized
    assert isinstance(m.get_submodule(STEM), QuantConv)
    for i in range(len(m.get_submodule(VISION))):
        for name in VISION_LINEARS:
            assert isinstance(m.get_submodule(f"{VISION}.{i}.{name}"), QuantLinear)
    for name in ("readout.0", "readout.2"):
        assert isinstance(m.get_submodule(f"{PROJECTOR}.{name}"), QuantLinear)
    for i in range(len(m.get_submodule(LLM))):
        for name in LLM_LINEARS:
            assert isinstance(m.get_submodule(f"{LLM}.{i}.{name}"), QuantLinear)
    assert isinstance(m.lm_head, nn.Linear)
    records = get_quantizers(m)
    order = list(records)
    assert order[0] == STEM
    assert order.index(f"{VISION}.1.mlp.fc2") < order.index(f"{PROJECTOR}.readout.0") < order.index(
        f"{LLM}.0.self_attn.q_proj")
    assert all(r.method == "gptq" and r.fallback is None for r in records.values())
    # every sample with a picture or a clip reached the vision parts (each image or video is one input);
    # the text-only ones did not, and the language model saw every sample
    samples = builtin_samples(NUM_SAMPLES, seed=0)
    with_media = sum(1 for s in samples if "image" in s or "video" in s)
    assert any("video" in s for s in samples) and with_media < NUM_SAMPLES
    for path, rec in records.items():
        assert rec.samples == (NUM_SAMPLES if path.startswith(LLM) else with_media), path
    qkv = [records[f"{VISION}.0.self_attn.{n}_proj"] for n in "qkv"]
    assert len({(r.samples, r.tokens) for r in qkv}) == 1


def test_widths_the_group_size_does_not_divide(quantized):
    group = quantized.config.quantization_config.w_groupsize
    fc2 = quantized.get_submodule(f"{VISION}.0.mlp.fc2")  # 112 inputs
    stem = quantized.get_submodule(STEM)  # 3 * 14 * 14 = 588 inputs
    assert fc2.scales.shape == (-(-112 // group), 32)
    assert stem.scales.shape[0] == -(-588 // group)
    assert get_quantizers(quantized)[f"{VISION}.0.mlp.fc2"].group_size == (group if group < 112 else -1)


def test_quantized_logits_are_close_but_not_equal(quantized, float_model, eval_inputs):
    for kind, inputs in eval_inputs.items():
        q, f = logits(quantized, inputs), logits(float_model, inputs)
        err = ((q - f).norm() / f.norm()).item()
        assert 0 < err < 0.25, (kind, err)


def test_save_uses_module_names_and_reload_is_identical(saved, quantized, reloaded, eval_inputs):
    tensors = load_file(saved / "model.safetensors")
    for path in (STEM, f"{VISION}.0.self_attn.q_proj", f"{PROJECTOR}.readout.2", f"{LLM}.1.mlp.down_proj"):
        assert tensors[f"{path}.qweight"].dtype == torch.int32 and f"{path}.weight" not in tensors
    cfg = json.loads((saved / "config.json").read_text())["quantization_config"]
    assert cfg["modules"][STEM]["kind"] == "conv" and cfg["modules"][STEM]["padding"] == "valid"
    assert isinstance(reloaded.get_submodule(STEM), QuantConv)
    for inputs in eval_inputs.values():
        assert torch.equal(logits(reloaded, inputs), logits(quantized, inputs))


def test_reloaded_model_generates_on_image_and_video(reloaded, quantized, eval_inputs):
    for kind, inputs in eval_inputs.items():
        out = reloaded.generate(**inputs, max_new_tokens=5, do_sample=False)
        assert out.shape[1] > inputs["input_ids"].shape[1], kind
        assert torch.equal(out, quantized.generate(**inputs, max_new_tokens=5, do_sample=False)), kind


def test_bfloat16_reload_runs_the_quantized_stem(saved, eval_inputs):
    model = AutoModelForImageTextToText.from_pretrained(saved, dtype=torch.bfloat16).eval()
    assert model.model.vision_model.dtype == torch.bfloat16
    for kind, inputs in eval_inputs.items():
        out = logits(model, inputs)  # pixel_values are float32; the vision model casts them to its dtype
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all(), kind


def test_report_lists_every_part(quantized):
    table = quantization_report(quantized)
    assert STEM in table and "projector: 2 modules, 0 fallbacks" in table
    rows = json.loads(quantization_report(quantized, as_json=True))["modules"]
    assert [r["path"] for r in rows] == list(get_quantizers(quantized))
    assert {r["component"] for r in rows} == {"vision", "projector", "llm"}


# --- flags ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "options", "flag", "level"),
    [
        ("video_llama_3", {"quant_cross_attention": False}, "quant_cross_attention", logging.INFO),
        ("video_llama_3", {}, "quant_cross_attention", logging.DEBUG),  # default value: not worth an INFO line
        ("qwen2_vl", {"quant_visual_projector": False, "quant_cross_attention": True}, "quant_visual_projector",
         logging.INFO),
    ],
    ids=["vl3-changed", "vl3-default", "qwen-changed"],
)
def test_flag_of_the_other_architecture_is_logged_once(arch, options, flag, level, caplog, request):
    path = request.getfixturevalue("tiny_videollama3_dir" if arch == "video_llama_3" else "tiny_qwen2vl_dir")
    with caplog.at_level(logging.DEBUG, logger="hf_vlm_gptq"):
        model = quantize(path, num_samples=2, quant_visual_clip=False, quant_llm=False, **options)
    lines = [r for r in caplog.records if flag in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == level, [r.getMessage() for r in lines]
    assert "ignored" in lines[0].getMessage()
    assert {r.component for r in get_quantizers(model).values()} == {"projector" if arch == "video_llama_3"
                                                                     else "merger"}


def test_nothing_left_to_quantize_fails_before_loading_weights(tiny_videollama3_dir):
    with pytest.raises(ValueError, match=r"nothing to quantize.*quant_cross_attention") as info:
        quantize(tiny_videollama3_dir, quant_visual_clip=False, quant_visual_projector=False, quant_llm=False,
                 quant_cross_attention=True)
    assert any(entry.name == "_process_model_before_weight_loading" for entry in info.traceback)

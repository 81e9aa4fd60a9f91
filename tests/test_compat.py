"""The research code's function-level entry points (`hf_vlm_gptq.compat`): same names and arguments, an
argparse namespace with the research code's flag names, a dict keyed by the model's module paths, each
per-part function touching only its part, the wrong family refused, and a checkpoint that reloads."""

from __future__ import annotations

import argparse

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from hf_vlm_gptq import compat
from hf_vlm_gptq.calib import build_model_inputs, builtin_samples
from hf_vlm_gptq.ops import QuantConv, QuantLinear

PACKED = (QuantLinear, QuantConv)


def seed_args(**changes) -> argparse.Namespace:
    """The research code's flags (plus unrelated ones its scripts carry, which are ignored)."""
    args = dict(quant_visual_clip=True, quant_cross_attention=True, quant_visual_projector=True, quant_llm=True,
                visual_w_rtn=False, llm_w_rtn=False, visual_w_bits=4, llm_w_bits=4, w_groupsize=32,
                percdamp=0.01, act_order=False, visual_w_clip=True, llm_w_clip=True, visual_split=False,
                llm_split=False, nsamples=6, w_asym=False, model="tiny", eval_dataset="none", seed=0)
    args.update(changes)
    return argparse.Namespace(**args)


def load_float(path):
    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize(
    ("arch", "entry", "expected_keys"),
    [
        ("qwen2_vl", "qwen2vl_rtn_gptq_fwrd_plus",
         ["model.visual.patch_embed.proj", "model.visual.blocks.0.attn.qkv", "model.visual.merger.mlp.0",
          "model.language_model.layers.1.mlp.down_proj"]),
        ("video_llama_3", "videollama3_rtn_gptq_fwrd_plus",
         ["model.vision_model.embeddings.patch_embedding", "model.vision_model.encoder.layers.0.self_attn.q_proj",
          "model.projector.readout.2", "model.language_model.layers.1.mlp.down_proj"]),
    ],
)
def test_whole_model_entry_point_saves_a_checkpoint_that_reloads(arch, entry, expected_keys, request, tmp_path):
    path = request.getfixturevalue("tiny_qwen2vl_dir" if arch == "qwen2_vl" else "tiny_videollama3_dir")
    model = load_float(path)
    quantizers = getattr(compat, entry)(model, builtin_samples(6, seed=0), "cpu", "builtin", seed_args())
    assert set(expected_keys) <= set(quantizers)
    for key, record in quantizers.items():
        assert isinstance(model.get_submodule(key), PACKED) and record.path == key
        assert record.method == "gptq" and record.bits == 4
    model.save_pretrained(tmp_path / "ckpt")
    processor = AutoProcessor.from_pretrained(path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    inputs = build_model_inputs([next(s for s in builtin_samples(4, seed=7) if "image" in s)], processor)[0]
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)


def test_per_part_functions_quantize_only_their_part_and_add_up(tiny_qwen2vl_dir, tmp_path):
    model = load_float(tiny_qwen2vl_dir)
    data, args = builtin_samples(4, seed=0), seed_args(nsamples=4, llm_w_bits=8)
    calls = [
        (compat.gptq_qwen2vl_fwrd_visual_clip_conv1, "gptq", ("model.visual.patch_embed.",)),
        (compat.gptq_qwen2vl_fwrd_visual_clip_resblocks, "gptq", ("model.visual.blocks.",)),
        (compat.qwen2vl_visual_cross_attention_rtn, "rtn", ("model.visual.merger.",)),
        (compat.gptq_qwen2vl_fwrd_llm, "gptq", ("model.language_model.",)),
    ]
    seen: set[str] = set()
    for fn, method, prefixes in calls:
        quantizers = fn(model, data, "cpu", "builtin", args)
        assert quantizers and all(k.startswith(prefixes) for k in quantizers), (fn.__name__, list(quantizers))
        assert all(r.method == method for r in quantizers.values()), fn.__name__
        assert not seen & set(quantizers)
        seen |= set(quantizers)
    assert quantizers["model.language_model.layers.0.mlp.up_proj"].bits == 8
    packed = {n for n, m in model.named_modules() if isinstance(m, PACKED)}
    assert packed == seen
    model.save_pretrained(tmp_path / "ckpt")
    AutoProcessor.from_pretrained(tiny_qwen2vl_dir).save_pretrained(tmp_path / "ckpt")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    assert {n for n, m in reloaded.named_modules() if isinstance(m, PACKED)} == seen


def test_videollama3_projector_function_touches_only_the_projector(tiny_videollama3_dir):
    model = load_float(tiny_videollama3_dir)
    quantizers = compat.gptq_videollama3_fwrd_visual_projector(model, builtin_samples(3, seed=0), "cpu", "builtin",
                                                                seed_args(nsamples=3))
    assert sorted(quantizers) == ["model.projector.readout.0", "model.projector.readout.2"]
    assert sorted(n for n, m in model.named_modules() if isinstance(m, PACKED)) == sorted(quantizers)


@pytest.mark.parametrize(
    ("fn", "fixture", "match"),
    [
        ("qwen2vl_rtn_gptq_fwrd_plus", "tiny_videollama3_dir", r"for Qwen2-VL models.*'video_llama_3'.*videollama3_"),
        ("gptq_qwen2vl_fwrd_llm", "tiny_videollama3_dir", r"for Qwen2-VL models"),
        ("gptq_videollama3_fwrd_visual_projector", "tiny_qwen2vl_dir", r"for VideoLLaMA3 models.*qwen2vl_"),
    ],
)
def test_function_of_the_other_family_is_refused(fn, fixture, match, request):
    model = load_float(request.getfixturevalue(fixture))
    with pytest.raises(ValueError, match=match):
        getattr(compat, fn)(model, builtin_samples(2, seed=0), "cpu", "builtin", seed_args(nsamples=2))
    assert not any(isinstance(m, PACKED) for m in model.modules())


def test_config_from_args_maps_the_research_flag_names():
    cfg = compat.config_from_args(seed_args(nsamples=9, w_asym=True, visual_split=True), dev="cpu")
    assert (cfg.num_samples, cfg.sym, cfg.visual_split, cfg.calibration_device) == (9, False, True, "cpu")
    assert {"qwen2vl_rtn_gptq_fwrd_plus", "videollama3_rtn_gptq_fwrd_plus"} <= set(compat.__all__)


def test_research_entry_points_run_the_research_algorithm_unless_asked(tiny_qwen2vl_dir, monkeypatch):
    """The options the research code did not have stay at its algorithm (no GPTAQ, the 15-level grid), so a
    compat run reproduces it: the records equal those of api.quantize with those options set explicitly."""
    from hf_vlm_gptq import VLMGPTQConfig
    from hf_vlm_gptq.api import quantize
    from hf_vlm_gptq.config_fields import DEFAULTS

    cfg = compat.config_from_args(seed_args(nsamples=4), dev="cpu")
    assert (cfg.gptaq, cfg.sym_full_range, cfg.group_order, cfg.hessian_weighting) == (False, False, False, "none")
    assert DEFAULTS["gptaq"] and DEFAULTS["sym_full_range"]  # differs from the library's defaults on purpose
    asked = compat.config_from_args(seed_args(nsamples=4, gptaq=True), dev="cpu")
    assert asked.gptaq and not asked.sym_full_range
    monkeypatch.setenv("HF_VLM_GPTQ_ADAPTIVE_THREADS", "0")  # exact equality across runs: one thread count
    samples = builtin_samples(4, seed=0)
    research = VLMGPTQConfig(num_samples=4, w_groupsize=32, percdamp=0.01, calibration_device="cpu",
                             **compat.RESEARCH_ALGORITHM)
    model = load_float(tiny_qwen2vl_dir)
    via_compat = compat.gptq_qwen2vl_fwrd_llm(model, samples, "cpu", "builtin", seed_args(nsamples=4))
    model = load_float(tiny_qwen2vl_dir)
    explicit = quantize(model, research, data=samples, select={"llm": "all"}, progress=False)
    assert via_compat.keys() == explicit.keys() and via_compat
    assert all(via_compat[p].loss == explicit[p].loss for p in explicit)

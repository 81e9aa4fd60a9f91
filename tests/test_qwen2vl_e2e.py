"""Qwen2-VL end to end through the public API: from_pretrained quantizes, save_pretrained writes packed
safetensors, from_pretrained reads them back with identical logits, and broken checkpoints fail by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from generation_checks import assert_greedy
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

import hf_vlm_gptq
from hf_vlm_gptq import VLMGPTQConfig, get_quantizers
from hf_vlm_gptq.calib import build_model_inputs, builtin_samples
from hf_vlm_gptq.ops import QuantConv, QuantLinear
from hf_vlm_gptq.ops.cpu_kernel import FusedWeights

VISION = "model.visual.blocks"
MERGER = "model.visual.merger"
LLM = "model.language_model.layers"
STEM = "model.visual.patch_embed.proj"


def quantize(path, **options):
    options.setdefault("num_samples", 6)
    options.setdefault("w_groupsize", 32)
    cfg = VLMGPTQConfig(**options)
    return AutoModelForImageTextToText.from_pretrained(path, quantization_config=cfg, dtype=torch.float32)


@pytest.fixture(scope="module")
def eval_inputs(tiny_qwen2vl_dir):
    processor = AutoProcessor.from_pretrained(tiny_qwen2vl_dir)
    samples = [s for s in builtin_samples(8, seed=99, with_video=False) if "image" in s][:2]
    return build_model_inputs(samples, processor, max_seq_len=512)


@pytest.fixture(scope="module")
def float_model(tiny_qwen2vl_dir):
    return AutoModelForImageTextToText.from_pretrained(tiny_qwen2vl_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def quantized(tiny_qwen2vl_dir):
    return quantize(tiny_qwen2vl_dir).eval()


@pytest.fixture(scope="module")
def saved(quantized, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "tiny-w4"
    quantized.save_pretrained(out)
    AutoProcessor.from_pretrained(quantized.name_or_path).save_pretrained(out)
    return out


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_every_part_is_packed_in_order(quantized):
    m = quantized
    assert isinstance(m.get_submodule(STEM), QuantConv)
    for i in range(len(m.get_submodule(VISION))):
        for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            assert isinstance(m.get_submodule(f"{VISION}.{i}.{name}"), QuantLinear)
    for name in ("mlp.0", "mlp.2"):
        assert isinstance(m.get_submodule(f"{MERGER}.{name}"), QuantLinear)
    for i in range(len(m.get_submodule(LLM))):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            assert isinstance(m.get_submodule(f"{LLM}.{i}.{name}"), QuantLinear)
    assert isinstance(m.lm_head, nn.Linear)  # the head stays dense
    records = get_quantizers(m)
    order = list(records)
    assert order[0] == STEM
    assert order.index(f"{VISION}.0.attn.qkv") < order.index(f"{MERGER}.mlp.0") < order.index(f"{LLM}.0.self_attn.q_proj")
    assert all(r.method == "gptq" and r.fallback is None for r in records.values())
    assert all(r.samples > 0 and r.tokens > 0 for r in records.values())
    # q/k/v share one Hessian: same samples and tokens
    qkv = [records[f"{LLM}.0.self_attn.{n}_proj"] for n in "qkv"]
    assert len({(r.samples, r.tokens) for r in qkv}) == 1


def test_quantized_logits_are_close_but_not_equal(quantized, float_model, eval_inputs):
    for inputs in eval_inputs:
        err = rel_err(logits(quantized, inputs), logits(float_model, inputs))
        assert 0 < err < 0.25, err


def test_config_records_modules_and_stats_without_data(quantized):
    qc = quantized.config.quantization_config.to_dict()
    assert qc["quant_method"] == "vlm_gptq" and qc["format_version"] == hf_vlm_gptq.FORMAT_VERSION
    assert qc["modules"][STEM]["kind"] == "conv"
    assert qc["modules"][f"{LLM}.0.mlp.down_proj"] == {
        "kind": "linear", "in_features": 128, "out_features": 64, "bits": 4, "group_size": 32, "bias": False}
    stats = qc["stats"][f"{LLM}.1.mlp.down_proj"]
    assert stats["method"] == "gptq" and stats["samples"] > 0 and stats["loss"] >= 0 and stats["damp"] > 0
    assert "dataset" not in qc and "processor" not in qc


def test_save_writes_gptq_layout_and_reload_is_identical(saved, quantized, eval_inputs):
    tensors = load_file(saved / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj"  # transformers' legacy layout for Qwen2-VL
    assert tensors[f"{key}.qweight"].dtype == torch.int32
    assert tensors[f"{key}.qzeros"].dtype == torch.int32
    assert tensors[f"{key}.scales"].dtype == torch.float16
    assert tensors[f"{key}.g_idx"].dtype == torch.int32
    assert f"{key}.weight" not in tensors
    cfg = json.loads((saved / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "vlm_gptq" and len(cfg["modules"]) == len(get_quantizers(quantized))

    reloaded = AutoModelForImageTextToText.from_pretrained(saved, dtype=torch.float32).eval()
    assert isinstance(reloaded.get_submodule(STEM), QuantConv)
    # the per-module record survives the round trip (rebuilt from quantization_config)
    before, after = get_quantizers(quantized), get_quantizers(reloaded)
    assert set(after) == set(before) and next(iter(after)) == STEM  # module order (config.json sorts keys)
    for path, rec in before.items():
        got = after[path]
        assert (got.method, got.bits, got.group_size, got.in_features, got.out_features, got.samples) == (
            rec.method, rec.bits, rec.group_size, rec.in_features, rec.out_features, rec.samples), path
        assert got.loss == pytest.approx(rec.loss) and got.damp == pytest.approx(rec.damp)
    for inputs in eval_inputs:
        assert torch.equal(logits(reloaded, inputs), logits(quantized, inputs))


def test_reloaded_model_generates_and_runs_in_a_pipeline(saved, quantized, eval_inputs):
    from transformers import pipeline

    model = AutoModelForImageTextToText.from_pretrained(saved, dtype=torch.float32).eval()
    inputs = eval_inputs[0]
    prompt = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    new = out[0, prompt:].tolist()
    stops = set(model.generation_config.eos_token_id)
    assert 1 <= len(new) <= 5 and (len(new) == 5 or new[-1] in stops)  # shorter only when it stopped
    assert new[0] == int(logits(model, inputs)[0, -1].argmax())
    assert_greedy(model, inputs, out)  # the packed layers' decode calls (1 row) agree with the full pass
    # the same tokens as the model quantized in memory (the reload is bit-identical)
    assert torch.equal(out, quantized.generate(**inputs, max_new_tokens=5, do_sample=False))

    processor = AutoProcessor.from_pretrained(saved)
    image = next(s["image"] for s in builtin_samples(8, seed=5, with_video=False) if "image" in s)
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "Describe."}]}]
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    result = pipe(text=messages, max_new_tokens=4, return_full_text=False)
    # what the pipeline answers is the model's own greedy continuation of the chat prompt, decoded
    direct = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    expected = model.generate(**direct, max_new_tokens=4, do_sample=False)[0, direct["input_ids"].shape[1]:]
    assert result[0]["generated_text"] == processor.decode(expected, skip_special_tokens=True)


def test_push_to_hub_uploads_the_packed_checkpoint(quantized, eval_inputs, tmp_path, monkeypatch):
    """push_to_hub goes through save_pretrained: the files it commits are the packed checkpoint, and a model
    loaded from them gives identical logits. The Hub is replaced by a folder (no network here)."""
    import types

    import transformers.utils.hub as hub

    remote = tmp_path / "hub" / "me--tiny-w4"

    class FolderHub:
        def create_repo(self, repo_id, **_):
            return types.SimpleNamespace(repo_id=repo_id)

        def create_commit(self, repo_id, operations, **_):
            for op in operations:
                target = remote / op.path_in_repo
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(op.path_or_fileobj, target)
            return types.SimpleNamespace(commit_url=f"folder://{repo_id}")

    card = types.SimpleNamespace(save=lambda path: Path(path).write_text("model card"))
    monkeypatch.setattr(hub, "hf_api", FolderHub)
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *a, **k: card)
    quantized.push_to_hub("me/tiny-w4")
    tensors = load_file(remote / "model.safetensors")
    assert tensors["model.layers.0.mlp.down_proj.qweight"].dtype == torch.int32
    assert "model.layers.0.mlp.down_proj.weight" not in tensors
    assert json.loads((remote / "config.json").read_text())["quantization_config"]["quant_method"] == "vlm_gptq"
    reloaded = AutoModelForImageTextToText.from_pretrained(remote, dtype=torch.float32).eval()
    assert torch.equal(logits(reloaded, eval_inputs[0]), logits(quantized, eval_inputs[0]))


def test_bfloat16_reload_uses_fast_paths_that_agree_with_the_reference(saved, eval_inputs, monkeypatch):
    """Reloaded in bf16 (how users run it), the default kernel choice gives the logits of the reference path
    (dequantize + dense op everywhere) within bf16 rounding, and greedy generation works."""
    from hf_vlm_gptq.ops import cpu_amx, cpu_fused

    through_fast = []  # the kernel data of every call of the bf16 CPU kernels (fused, AMX)
    for kernel_module, name in ((cpu_fused, "fused_matmul"), (cpu_amx, "amx_matmul")):
        real = getattr(kernel_module, name)
        monkeypatch.setattr(kernel_module, name,
                            lambda x2, w, *a, real=real: through_fast.append(w) or real(x2, w, *a))
    model = AutoModelForImageTextToText.from_pretrained(saved, dtype=torch.bfloat16).eval()
    packed = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantConv))]
    probe = torch.empty(0, dtype=torch.bfloat16)
    fast = {}  # kernel data (built once per layer and kernel, then cached) -> the layer's path
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantConv)):
            for kernel in ("fused", "amx"):
                data = m._prepare(kernel, probe.new_empty(0, m.in_features))
                data = getattr(data, "fused", data)  # the AMX and FMA backends' GroupSorted hold the kernel data
                if isinstance(data, FusedWeights):
                    fast[id(data)] = name
    if cpu_fused.kernel_unavailable_reason() is None:
        assert f"{LLM}.0.mlp.down_proj" in fast.values()  # a host with the kernel serves the LLM's layers
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in eval_inputs[0].items()}
    fast_logits = logits(model, inputs).float()
    # the image prompt runs every packed layer, and every layer a bf16 kernel can serve went through one
    assert {fast.get(id(w), "another layer") for w in through_fast} == set(fast.values())
    for m in packed:
        m.kernel = "dequant"
    ref_logits = logits(model, inputs).float()
    assert float((fast_logits - ref_logits).norm() / ref_logits.norm()) < 2e-2
    for m in packed:
        m.kernel = "auto"
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4


def _corrupt_copy(saved, tmp_path, edit):
    bad = tmp_path / "bad"
    shutil.copytree(saved, bad)
    tensors = load_file(bad / "model.safetensors")
    edit(tensors)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    return bad


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t.pop("model.layers.1.mlp.down_proj.qweight"), "mlp.down_proj.qweight"),
        (lambda t: t.pop("visual.patch_embed.proj.scales"), "patch_embed.proj.scales"),
        (lambda t: t.__setitem__("model.layers.0.mlp.up_proj.qweight",
                                 t["model.layers.0.mlp.up_proj.qweight"][:-1].clone()), "mlp.up_proj.qweight"),
        (lambda t: t.__setitem__("visual.merger.mlp.0.g_idx",
                                 torch.full_like(t["visual.merger.mlp.0.g_idx"], 999)), "merger.mlp.0.g_idx"),
        (lambda t: t.__setitem__("visual.blocks.0.attn.qkv.scales",
                                 torch.full_like(t["visual.blocks.0.attn.qkv.scales"], float("nan"))),
         "attn.qkv.scales"),
    ],
    ids=["missing-qweight", "missing-conv-scales", "misshaped", "g_idx-out-of-range", "nan-scales"],
)
def test_broken_checkpoint_fails_naming_the_tensor(saved, tmp_path, edit, match):
    bad = _corrupt_copy(saved, tmp_path, edit)
    with pytest.raises((ValueError, RuntimeError), match=match):
        AutoModelForImageTextToText.from_pretrained(bad, dtype=torch.float32)


@pytest.mark.parametrize(
    ("flag", "paths"),
    [
        ("quant_visual_clip", [STEM, f"{VISION}.0.attn.qkv", f"{VISION}.1.mlp.fc2"]),
        ("quant_cross_attention", [f"{MERGER}.mlp.0", f"{MERGER}.mlp.2"]),
        ("quant_llm", [f"{LLM}.0.self_attn.q_proj", f"{LLM}.1.mlp.down_proj"]),
    ],
)
def test_each_flag_switches_its_part_off(tiny_qwen2vl_dir, flag, paths):
    model = quantize(tiny_qwen2vl_dir, num_samples=3, **{flag: False})
    records = get_quantizers(model)
    for path in paths:
        assert path not in records
        assert not isinstance(model.get_submodule(path), (QuantLinear, QuantConv))
    assert records  # the other parts were quantized


def test_rtn_per_part_and_bits_per_part(tiny_qwen2vl_dir):
    cfg = VLMGPTQConfig(num_samples=3, w_groupsize=32, visual_w_rtn=True, visual_w_bits=8, llm_w_bits=3)
    before = cfg.to_dict()
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2vl_dir, quantization_config=cfg,
                                                        dtype=torch.float32)
    assert cfg.to_dict() == before and cfg.manifest.is_empty  # the user's config object is left alone
    saved = model.config.quantization_config.to_dict()
    assert saved["modules"] and "bits" not in saved  # vision 8 bits, LLM 3: no single top-level bits
    records = get_quantizers(model)
    vision = [r for p, r in records.items() if p.startswith("model.visual")]
    llm = [r for p, r in records.items() if p.startswith(LLM)]
    assert vision and all(r.method == "rtn" and r.bits == 8 for r in vision)
    assert llm and all(r.method == "gptq" and r.bits == 3 for r in llm)


def test_unsupported_model_type_fails_before_loading_weights(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, vocab_size=100)).save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match=r"no handler for model_type .llama.*qwen2_vl"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=VLMGPTQConfig())


def test_bad_calibration_sample_fails_before_loading_weights(tiny_qwen2vl_dir):
    with pytest.raises(ValueError, match="sample 1"):
        quantize(tiny_qwen2vl_dir, dataset=[{"text": "ok"}, {"image": "/no/such/file.png"}])

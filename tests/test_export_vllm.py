"""`export_vllm` / `hf-vlm-gptq export-vllm` on a tiny quantized Qwen2-VL: vLLM's GPTQ config with `dynamic`
rules on vLLM's module names, packed tensors copied byte for byte, dense stem and merged split layers, a
plain-torch GPTQ reader that rebuilds the quantized model's logits from the export, and bad inputs that
fail before anything is written."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from hf_vlm_gptq import VLMGPTQConfig
from hf_vlm_gptq.calib import build_model_inputs, builtin_samples
from hf_vlm_gptq.cli import main
from hf_vlm_gptq.export_vllm import export_vllm, unsupported_reason
from hf_vlm_gptq.ops import pack_gptq, rtn_quantize
from hf_vlm_gptq.ops.packing import dequantize_packed
from hf_vlm_gptq.outdir import MARKER

PACKED = ("qweight", "qzeros", "scales", "g_idx")
STEM = "visual.patch_embed.proj"
SPLIT = ["visual.blocks.0.mlp.fc2", "visual.blocks.1.mlp.fc2"]


# --- how vLLM reads the export, written here independently of the package --------------------------------
def vllm_name(key: str) -> str:
    """vLLM's name for a Qwen2-VL checkpoint module (legacy `model.layers.N` keys, fused q/k/v, gate/up)."""
    if key.startswith("model."):
        key = "language_model." + key
    key = re.sub(r"\.(q|k|v)_proj$", ".qkv_proj", key)
    return re.sub(r"\.(gate|up)_proj$", ".gate_up_proj", key)


def vllm_scheme(qc: dict, name: str) -> tuple[int, int] | None:
    """(bits, group size) vLLM gives module `name`, None when a `-:` rule keeps it dense: the first
    `dynamic` key whose regex matches the start of the name decides, else the base config."""
    for key, override in qc["dynamic"].items():
        if re.match(key[2:], name):
            if key.startswith("-:"):
                return None
            return override.get("bits", qc["bits"]), override.get("group_size", qc["group_size"])
    return qc["bits"], qc["group_size"]


def unpack_gptq_v1(t: dict[str, torch.Tensor], bits: int, group_size: int) -> torch.Tensor:
    """Plain-torch GPTQ v1 reader: weight [out, in] = scale * (code - (stored zero + 1)), groups of
    `group_size` consecutive input columns (g_idx ignored, as vLLM does)."""
    per, mask = 32 // bits, 2**bits - 1
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    codes = ((t["qweight"].unsqueeze(1) >> shifts.view(1, -1, 1)) & mask).reshape(-1, t["qweight"].shape[1])
    zeros = ((t["qzeros"].unsqueeze(2) >> shifts.view(1, 1, -1)) & mask).reshape(t["qzeros"].shape[0], -1) + 1
    fin = codes.shape[0]
    group = torch.arange(fin) // (fin if group_size == -1 else group_size)
    scales = t["scales"].float()
    assert codes.shape[1] == scales.shape[1] and zeros.shape[1] == scales.shape[1] == t["qzeros"].shape[1] * per
    return (scales[group] * (codes.float() - zeros[group].float())).t().contiguous()


def dense_from_export(exported, out_dir):
    """A plain dense checkpoint from the export: every GPTQ module dequantized as `vllm_scheme` says."""
    config = json.loads((exported / "config.json").read_text())
    qc = config.pop("quantization_config")
    tensors = load_file(exported / "model.safetensors")
    for prefix in sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".qweight")}):
        scheme = vllm_scheme(qc, vllm_name(prefix))
        assert scheme is not None, f"{prefix} is packed but a -: rule keeps it dense"
        packed = {name: tensors.pop(f"{prefix}.{name}") for name in PACKED}
        tensors[f"{prefix}.weight"] = unpack_gptq_v1(packed, *scheme)
    out_dir.mkdir()
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config))
    return AutoModelForImageTextToText.from_pretrained(out_dir, dtype=torch.float32).eval()


# --- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quantized(tiny_qwen2vl_dir):
    """Vision 8-bit, LLM 4-bit, g32, split fc2 in the vision tower; float32."""
    cfg = VLMGPTQConfig(num_samples=3, w_groupsize=32, visual_w_bits=8, llm_w_bits=4, visual_split=True)
    return AutoModelForImageTextToText.from_pretrained(tiny_qwen2vl_dir, quantization_config=cfg,
                                                       dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def saved(quantized, tiny_qwen2vl_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("src") / "tiny-q"
    quantized.save_pretrained(out)
    AutoProcessor.from_pretrained(tiny_qwen2vl_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def exported(saved, tmp_path_factory):
    return export_vllm(saved, tmp_path_factory.mktemp("vllm") / "tiny-vllm")


def listing(path):
    return sorted(p.name for p in path.iterdir())


# --- tests ---------------------------------------------------------------------------------------------
def test_config_has_vllm_gptq_fields_and_dynamic_rules(exported, saved):
    config = json.loads((exported / "config.json").read_text())
    source = json.loads((saved / "config.json").read_text())
    qc = config["quantization_config"]
    assert {k: v for k, v in qc.items() if k != "dynamic"} == {
        "quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True,
        "checkpoint_format": "gptq", "lm_head": False}
    assert qc["dynamic"] == {  # dense rules first (first match wins), then the 8-bit vision part
        r"-:visual\.blocks\.0\.mlp\.fc2$": {}, r"-:visual\.blocks\.1\.mlp\.fc2$": {},
        r"-:visual\.patch_embed\.proj$": {}, r"+:visual\.": {"bits": 8}}
    assert list(qc["dynamic"])[-1] == r"+:visual\."
    assert vllm_scheme(qc, "visual.blocks.0.mlp.fc2") is None and vllm_scheme(qc, STEM) is None
    assert vllm_scheme(qc, "visual.blocks.1.attn.qkv") == vllm_scheme(qc, "visual.merger.mlp.2") == (8, 32)
    assert vllm_scheme(qc, "language_model.model.layers.1.self_attn.qkv_proj") == (4, 32)
    assert vllm_scheme(qc, "language_model.model.layers.0.mlp.gate_up_proj") == (4, 32)
    assert {k: v for k, v in config.items() if k != "quantization_config"} == {
        k: v for k, v in source.items() if k != "quantization_config"}
    # tokenizer, processor, chat template travel along; the marker says the folder is ours (--overwrite)
    assert (set(listing(saved)) - {"quantization_error.png"}) | {MARKER, "README.md"} == set(listing(exported))


def test_packed_modules_are_copied_byte_for_byte(exported, saved):
    src, out = load_file(saved / "model.safetensors"), load_file(exported / "model.safetensors")
    converted = (STEM, *SPLIT)
    for key, tensor in src.items():
        if tensor.dtype == torch.uint8:  # the plugin's guard tensor (plain transformers refuses the source)
            assert key not in out, key
            continue
        if key.startswith(converted):
            assert key not in out or key.endswith(".bias"), key
            continue
        got = out[key]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, key
        assert got.contiguous().view(torch.uint8).equal(tensor.contiguous().view(torch.uint8)), key
    packed = {k.rsplit(".", 1)[0] for k in out if k.endswith(".qweight")}
    assert len(packed) == 14 + 2 + 6  # LLM 2 x 7, merger 2, vision 2 x 3 (fc2 dense)
    assert not any(k.startswith(converted) and k.rsplit(".", 1)[1] in PACKED for k in out)


def test_dense_stem_and_merged_split_layers(exported, saved, quantized):
    src, out = load_file(saved / "model.safetensors"), load_file(exported / "model.safetensors")
    stem = quantized.get_submodule("model.visual.patch_embed.proj")
    expected = dequantize_packed(*(src[f"{STEM}.{n}"] for n in PACKED), bits=8, in_features=stem.in_features,
                                 out_features=stem.out_features, group_size=32, dtype=torch.float32)
    assert out[f"{STEM}.weight"].shape == (32, 3, 2, 14, 14)
    assert torch.equal(out[f"{STEM}.weight"], expected.reshape(32, 3, 2, 14, 14))
    assert torch.equal(out[f"{STEM}.weight"].flatten(1), stem.dequantize_weight(torch.float32))
    for key in SPLIT:
        split = quantized.get_submodule("model." + key)
        weight = torch.cat([split.L1.weight, split.L2.dequantize_weight(torch.float32)], dim=1)
        assert torch.equal(out[f"{key}.weight"], weight)
        assert torch.equal(out[f"{key}.bias"], split.L2.bias)


def test_plain_dense_model_from_the_export_matches_the_quantized_model(exported, quantized, tiny_qwen2vl_dir,
                                                                       tmp_path):
    dense = dense_from_export(exported, tmp_path / "dense")
    processor = AutoProcessor.from_pretrained(tiny_qwen2vl_dir)
    samples = [s for s in builtin_samples(6, seed=7, with_video=False) if "image" in s][:1]
    samples.append({"text": "A short question about the weather?"})
    for inputs in build_model_inputs(samples, processor, max_seq_len=512):
        with torch.no_grad():
            want, got = quantized(**inputs).logits, dense(**inputs).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_cpu_target_refuses_8_bit_or_writes_it_dense(saved, tmp_path):
    out = tmp_path / "cpu"
    with pytest.raises(ValueError, match=r"(?s)visual\.blocks\.0\.attn\.qkv: 8-bit.*--dense-unsupported"):
        export_vllm(saved, out, target="cpu")
    assert listing(tmp_path) == []
    export_vllm(saved, out, target="cpu", dense_unsupported=True)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"]) == (4, 32)
    assert all(k.startswith("-:") and k.endswith("$") for k in qc["dynamic"])
    assert vllm_scheme(qc, "visual.merger.mlp.0") is None and vllm_scheme(qc, "visual.blocks.1.attn.proj") is None
    tensors = load_file(out / "model.safetensors")
    assert "visual.merger.mlp.0.weight" in tensors and "visual.merger.mlp.0.qweight" not in tensors
    assert "model.layers.0.self_attn.q_proj.qweight" in tensors


def _edit_copy(saved, tmp_path, edit):
    bad = tmp_path / "edited"
    shutil.copytree(saved, bad)
    config = json.loads((bad / "config.json").read_text())
    tensors = load_file(bad / "model.safetensors")
    edit(config, tensors)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    (bad / "config.json").write_text(json.dumps(config))
    return bad


def _k_proj_per_channel(config, tensors):
    """Re-pack layer 0's k_proj with one group per row: its q/v shards keep group size 32."""
    key, path = "model.layers.0.self_attn.k_proj", "model.language_model.layers.0.self_attn.k_proj"
    weight = dequantize_packed(*(tensors[f"{key}.{n}"] for n in PACKED), bits=4, in_features=64,
                               out_features=32, group_size=32, dtype=torch.float32)
    r = rtn_quantize(weight, bits=4, group_size=-1)
    tensors.update({f"{key}.{n}": t for n, t in pack_gptq(r.codes, r.scales, r.zeros, r.g_idx, 4).items()})
    config["quantization_config"]["modules"][path]["group_size"] = -1


def _k_proj_float(config, tensors):
    """Layer 0's k_proj kept in full precision (as modules_to_not_convert would)."""
    key = "model.layers.0.self_attn.k_proj"
    packed = {n: tensors.pop(f"{key}.{n}") for n in PACKED}
    tensors[f"{key}.weight"] = dequantize_packed(*packed.values(), bits=4, in_features=64, out_features=32,
                                                 group_size=32, dtype=torch.float32)
    del config["quantization_config"]["modules"]["model.language_model.layers.0.self_attn.k_proj"]


@pytest.mark.parametrize(("edit", "match"), [
    (_k_proj_per_channel, r"self_attn\.\{k_proj,q_proj,v_proj\}: fused into language_model\.model\.layers\.0"
                          r"\.self_attn\.qkv_proj .*differ in bits/group size"),
    (_k_proj_float, r"self_attn\.\{q_proj,v_proj\}: fused into .*qkv_proj .*\['k_proj'\] not quantized"),
], ids=["group-sizes-differ", "one-shard-float"])
def test_fused_shards_must_run_packed_alike(saved, tmp_path, edit, match):
    src = _edit_copy(saved, tmp_path, edit)
    with pytest.raises(ValueError, match=match):
        export_vllm(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    out = export_vllm(src, tmp_path / "out", dense_unsupported=True)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert vllm_scheme(qc, "language_model.model.layers.0.self_attn.qkv_proj") is None
    assert vllm_scheme(qc, "language_model.model.layers.1.self_attn.qkv_proj") == (4, 32)
    tensors = load_file(out / "model.safetensors")
    assert {f"model.layers.0.self_attn.{s}_proj.weight" for s in "qkv"} <= set(tensors)


@pytest.mark.parametrize(("case", "error", "match"), [
    ("float", ValueError, r"not a checkpoint written by hf_vlm_gptq.*quant_method None"),
    ("video_llama_3", ValueError, r"model_type 'video_llama_3' \(VideoLLaMA3\): vLLM .* has no model class"),
    ("llava", ValueError, r"no handler for model_type 'llava'; supported: .*qwen2_vl"),
    ("out-exists", FileExistsError, r"exists; pass --overwrite"),
])
def test_bad_inputs_fail_before_writing_anything(saved, tiny_qwen2vl_dir, tmp_path, case, error, match):
    src, out = saved, tmp_path / "out"
    if case == "float":
        src = tiny_qwen2vl_dir
    elif case in ("video_llama_3", "llava"):
        src = _edit_copy(saved, tmp_path, lambda config, _t: config.update(model_type=case))
    else:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    before = listing(tmp_path)
    with pytest.raises(error, match=match):
        export_vllm(src, out)
    assert listing(tmp_path) == before  # no OUT, no temporary folder
    if case == "out-exists":
        assert listing(out) == ["keep.txt"]


@pytest.mark.parametrize(("entry", "sym", "contiguous", "target", "match"), [
    ({}, False, True, "cuda", "asymmetric grid .*sym=True"),
    ({"bits": 3}, True, True, "cuda", "3-bit; .*4/8-bit only"),
    ({"bits": 8}, True, True, "cpu", "8-bit; vLLM's cpu GPTQ kernel runs 4-bit only"),
    ({"group_size": 256}, True, True, "cuda", "group size 256; .*-1/32/64/128"),
    ({"in_features": 96, "group_size": 64}, True, True, "cuda", "not divisible by group size 64"),
    ({}, True, False, "cuda", "act-order .*act_order=False"),
    ({"in_features": 68, "group_size": -1}, True, True, "cuda", "not multiples of 8: the packed tensors are padded"),
    ({"out_features": 48}, True, True, "cpu", "not multiples of 32 .*CPU kernel"),
    ({"out_features": 48}, True, True, "cuda", None),
    ({}, True, True, "cpu", None),
])
def test_unsupported_reason_names_the_limit_and_the_fix(entry, sym, contiguous, target, match):
    entry = {"bits": 4, "group_size": 32, "in_features": 128, "out_features": 64, **entry}
    reason = unsupported_reason(entry, sym, contiguous, target)
    if match is None:
        assert reason is None
    else:
        assert reason is not None and re.search(match, reason), reason


def test_cli_export_vllm(saved, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="hf_vlm_gptq.export_vllm"):
        assert main(["export-vllm", str(saved), str(out), "--target", "cpu", "--dense-unsupported"]) == 0
    assert (out / "config.json").is_file() and "dense: visual.merger.mlp.0" in caplog.text
    assert main(["export-vllm", str(saved), str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_sharded_checkpoint_keeps_its_shards(quantized, tiny_qwen2vl_dir, tmp_path):
    src = tmp_path / "sharded"
    quantized.save_pretrained(src, max_shard_size="100KB")
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) > 1
    out = export_vllm(src, tmp_path / "out")
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in shards:
        assert {k for k, f in index.items() if f == shard} == set(load_file(out / shard))
    assert f"{STEM}.weight" in index and f"{STEM}.qweight" not in index
    assert index["model.layers.0.mlp.down_proj.qweight"].startswith("model-")

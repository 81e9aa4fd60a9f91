"""What loading a packed checkpoint promises when the checkpoint or the environment is wrong (issue 10,
points 1-4). Every case fails with an error naming the tensor, the module or the field; none ever runs a
layer on random or uninitialised weights.

1. Every tensor a module record implies is checked before (safetensors headers; a `pytorch_model.bin`
   memory-mapped) and after loading: the packed buffers, the bias, a split layer's `L1.weight`; `scales`
   must be float16, the rest int32.
2. Packed tensors of a module that `quantization_config.modules` does not list are an error naming it.
3. Without `import hf_vlm_gptq` (or with `quant_method` edited) plain transformers refuses the checkpoint:
   it holds a guard tensor whose shape can never match the float layer's weight.
4. A malformed module record (not an object, a field missing, an unknown kind) names module and field.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

import hf_vlm_gptq  # noqa: F401  (the plugin: registers quant_method "vlm_gptq")
from hf_vlm_gptq.ops import QuantLinear

LLM_Q = "model.language_model.layers.0.self_attn.q_proj"  # a packed Linear with a bias
VISION_QKV = "model.visual.blocks.0.attn.qkv"
STEM = "model.visual.patch_embed.proj"  # a packed conv
SPLIT = "model.visual.blocks.0.mlp.fc2"  # a split layer (L1 float, L2 packed)


def edit_tensors(ckpt, edit):
    tensors = load_file(ckpt / "model.safetensors")
    edit(tensors)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    return ckpt


def edit_config(ckpt, edit):
    config = json.loads((ckpt / "config.json").read_text())
    edit(config["quantization_config"])
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


def load(path):
    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)


# --- 1. every tensor a record implies ---------------------------------------------------------------
@pytest.mark.parametrize("key", ["model.layers.0.self_attn.q_proj.bias", "visual.blocks.0.attn.qkv.bias",
                                 "visual.blocks.0.mlp.fc2.L2.bias", "visual.blocks.0.mlp.fc2.L1.weight"],
                         ids=["llm-bias", "vision-bias", "split-bias", "split-L1"])
def test_a_missing_bias_or_float_part_fails_naming_the_tensor(packed_copy, key):
    edit_tensors(packed_copy, lambda t: t.pop(key))
    with pytest.raises(ValueError, match=key.replace(".", r"\.").removeprefix(r"model\.")):
        load(packed_copy)


@pytest.mark.parametrize("key", ["model.layers.0.self_attn.q_proj.bias", "visual.blocks.0.mlp.fc2.L1.weight",
                                 "model.layers.1.mlp.up_proj.scales"], ids=["bias", "split-L1", "scales"])
def test_the_check_after_loading_names_a_tensor_that_was_never_read(packed_copy, monkeypatch, key):
    """The second net (all there is for a checkpoint whose headers cannot be read first): with the header
    check switched off, the tensor transformers left uninitialised is still named after loading."""
    monkeypatch.setattr("hf_vlm_gptq.quantizer.check_checkpoint_files", lambda *args, **kwargs: None)
    edit_tensors(packed_copy, lambda t: t.pop(key))
    with pytest.raises(ValueError, match=rf"missing the tensor '.*{key.partition('.')[2].replace('.', '[.]')}'"):
        load(packed_copy)


@pytest.mark.parametrize("dtype", [torch.int32, torch.float32])
def test_scales_not_stored_as_float16_fail(packed_copy, dtype):
    key = "model.layers.1.mlp.up_proj.scales"
    edit_tensors(packed_copy, lambda t: t.__setitem__(key, t[key].to(dtype)))
    with pytest.raises(ValueError, match=r"up_proj\.scales.* stored as (I32|F32), expected float16"):
        load(packed_copy)


# --- 2. packed tensors nobody listed ------------------------------------------------------------------
def test_packed_tensors_of_a_module_missing_from_the_config_fail_naming_it(packed_copy):
    path = "model.language_model.layers.1.mlp.down_proj"

    def drop(qc):
        del qc["modules"][path]
        qc["stats"].pop(path, None)

    edit_config(packed_copy, drop)  # the weights still hold its qweight/qzeros/scales/g_idx
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj.*does not list"):
        load(packed_copy)


@pytest.mark.parametrize("case", ["unlisted-module", "int32-scales", "missing-bias"])
def test_a_pickle_checkpoint_gets_the_same_checks(packed_copy, case):
    """A `pytorch_model.bin` (transformers still loads them) is checked like safetensors before loading."""
    tensors = load_file(packed_copy / "model.safetensors")
    (packed_copy / "model.safetensors").unlink()
    if case == "unlisted-module":
        path = "model.language_model.layers.1.mlp.down_proj"
        edit_config(packed_copy, lambda qc: (qc["modules"].pop(path), qc["stats"].pop(path, None)))
        says = r"layers\.1\.mlp\.down_proj.*does not list"
    elif case == "int32-scales":
        key = "model.layers.1.mlp.up_proj.scales"
        tensors[key] = tensors[key].to(torch.int32)
        says = r"up_proj\.scales.* stored as I32, expected float16"
    else:
        tensors.pop("model.layers.0.self_attn.q_proj.bias")
        says = r"missing the tensor 'model\.language_model\.layers\.0\.self_attn\.q_proj\.bias'"
    torch.save(tensors, packed_copy / "pytorch_model.bin")
    with pytest.raises(ValueError, match=says):
        load(packed_copy)


def test_a_good_pickle_checkpoint_loads_packed(packed_copy):
    torch.save(load_file(packed_copy / "model.safetensors"), packed_copy / "pytorch_model.bin")
    (packed_copy / "model.safetensors").unlink()
    assert isinstance(load(packed_copy).get_submodule(LLM_Q), QuantLinear)


# --- 3. no plugin, or quant_method edited ---------------------------------------------------------------
def test_loading_without_the_plugin_fails_loudly(packed_qwen2vl_dir):
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForImageTextToText
        try:
            AutoModelForImageTextToText.from_pretrained({str(packed_qwen2vl_dir)!r}, dtype=torch.float32)
        finally:
            print("plugin imported:", "hf_vlm_gptq" in sys.modules)
        print("LOADED")
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["TRANSFORMERS_VERBOSITY"] = "warning"  # its warnings are part of what the user sees
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "plugin imported: False" in run.stdout, run.stdout + run.stderr
    assert run.returncode != 0 and "LOADED" not in run.stdout
    assert "ignore_mismatched_sizes" in run.stderr  # transformers' own refusal (its size-mismatch error)
    assert "vlm_gptq" in run.stderr  # and its warning names the quantization it does not know


def test_an_edited_quant_method_fails_loudly(packed_copy):
    edit_config(packed_copy, lambda qc: qc.__setitem__("quant_method", "gptq_vlm"))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        load(packed_copy)


def test_with_the_plugin_the_guard_is_silent_and_every_layer_is_packed(packed_qwen2vl_dir):
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        model = load(packed_qwen2vl_dir)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [m for m in seen if "UNEXPECTED" in m or "MISSING" in m or "MISMATCH" in m], seen
    assert isinstance(model.get_submodule(LLM_Q), QuantLinear)
    assert torch.isfinite(model.get_submodule(LLM_Q).bias).all()


# --- 4. malformed records ---------------------------------------------------------------------------
def _set(path, value):
    return lambda qc: qc["modules"].__setitem__(path, value)


def _pop(path, field):
    return lambda qc: qc["modules"][path].pop(field)


def _put(path, field, value):
    return lambda qc: qc["modules"][path].__setitem__(field, value)


@pytest.mark.parametrize(
    ("edit", "module", "field"),
    [
        (_set(LLM_Q, [4, 32]), LLM_Q, "JSON object"),
        (_set(VISION_QKV, "linear"), VISION_QKV, "JSON object"),
        (_pop(LLM_Q, "bits"), LLM_Q, "'bits'"),
        (_put(LLM_Q, "bits", "4"), LLM_Q, "'bits'"),
        (_put(LLM_Q, "kind", "lineer"), LLM_Q, "'kind'"),
        (_pop(LLM_Q, "out_features"), LLM_Q, "'out_features'"),
        (_pop(STEM, "kernel_size"), STEM, "'kernel_size'"),
        (_put(STEM, "conv_kind", "conv1d"), STEM, "'conv_kind'"),
        (_put(SPLIT, "bias", None), SPLIT, "'bias'"),
    ],
    ids=["list", "string", "no-bits", "bits-str", "unknown-kind", "no-out", "conv-no-kernel", "conv-kind",
         "bias-null"],
)
def test_a_malformed_module_record_names_the_module_and_the_field(packed_copy, edit, module, field):
    edit_config(packed_copy, edit)
    with pytest.raises(ValueError, match=rf"{module.replace('.', '[.]')}.*{field}"):
        load(packed_copy)

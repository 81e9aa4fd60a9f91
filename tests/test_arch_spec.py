"""arch/spec.py on hand-made specs and modules (no model): which blocks are caught fresh, how often a part runs
per batch, checkpoint and vLLM names, module lookup by candidate paths, and the tiny-builder reference."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from hf_vlm_gptq.arch import ARCHITECTURES, ArchSpec, ComponentSpec, VllmLayout, find_module, spec_for_name

_BUILT: list = []


def _fake_builder(out_dir, **kwargs):
    """A tiny builder that records how it was called."""
    _BUILT.append((out_dir, kwargs))
    return out_dir


def _component(**kw) -> ComponentSpec:
    fields = {"name": "llm", "flag": "quant_llm", "part": "llm", "blocks": ("model.layers",),
              "sequential": (("q", "k", "v"), ("o",))}
    fields.update(kw)
    return ComponentSpec(**fields)


def test_fresh_blocks():
    assert _component().fresh_blocks(None, 4) == {0}  # a chain: only the first block is caught
    config = types.SimpleNamespace(after=[1, 3, 7, -1])
    deep = _component(fresh_inputs=lambda cfg: cfg.after)
    assert deep.fresh_blocks(config, 5) == {0, 1, 3}  # indexes outside the stack are ignored
    assert _component(chained=False, fresh_inputs=lambda cfg: [1]).fresh_blocks(config, 3) == {0, 1, 2}


def test_calls_per_batch_counts_media_kinds():
    vision, llm = _component(name="vision", calls_per_media=True), _component()
    spec = ArchSpec("fam", "Fam", ("fam",), components=(vision, llm))
    image, video = torch.zeros(1), torch.zeros(1)
    assert spec.calls_per_batch(vision, {"pixel_values": image, "pixel_values_videos": video}) == 2
    assert spec.calls_per_batch(vision, {"pixel_values": image, "pixel_values_videos": None}) == 1
    assert spec.calls_per_batch(vision, {"input_ids": image}) == 0  # text only: the tower never runs
    assert spec.calls_per_batch(llm, {"input_ids": image}) == 1
    assert spec.flags() == {"quant_llm"}


def test_checkpoint_names():
    spec = ArchSpec("fam", "Fam", ("fam",), saved_prefixes=(("model.language_model.", "model."),
                                                             ("model.visual.", "visual.")))
    assert spec.checkpoint_names("model.language_model.layers.0.q.qweight") == [
        "model.language_model.layers.0.q.qweight", "model.layers.0.q.qweight"]
    assert spec.checkpoint_names("model.visual.blocks.1.qkv.scales") == [
        "model.visual.blocks.1.qkv.scales", "visual.blocks.1.qkv.scales"]
    assert spec.checkpoint_names("lm_head.weight") == ["lm_head.weight"]


def test_vllm_names():
    layout = VllmLayout("FamForCausalLM", prefixes=(("model.text.", "lm.model."), ("lm.", "language_model.")),
                        fused=(("language_model.", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
                               ("vision.", "gate_up", ("gate", "up"))))
    # each prefix rule applies to the result of the previous one
    assert layout.module_name("model.text.layers.0.mlp.down_proj") == "language_model.model.layers.0.mlp.down_proj"
    assert layout.module_name("model.text.layers.0.attn.k_proj") == "language_model.model.layers.0.attn.qkv_proj"
    assert layout.module_name("vision.blocks.2.mlp.up") == "vision.blocks.2.mlp.gate_up"
    assert layout.module_name("other.attn.k_proj") == "other.attn.k_proj"  # fusion applies under its prefix only
    assert layout.shards_of("qkv_proj", "language_model.model.layers.0.attn.qkv_proj") == ("q_proj", "k_proj",
                                                                                            "v_proj")
    assert layout.shards_of("qkv_proj", "vision.blocks.0.attn.qkv_proj") == ()
    assert layout.shards_of("gate_up", "vision.blocks.2.mlp.gate_up") == ("gate", "up")


def test_find_module_takes_the_first_candidate_on_module_boundaries():
    root = nn.Module()
    root.visual = nn.Module()
    root.visual.blocks = nn.ModuleList([nn.Linear(2, 2)])
    root.model = nn.Module()
    root.model.layers = nn.ModuleList([nn.Linear(2, 2)])
    path, module = find_module(root, ("model.visual.blocks", "visual.blocks", "model.layers"))
    assert path == "visual.blocks" and module is root.visual.blocks
    assert find_module(root, ("model.layer", "visual.block")) is None  # prefixes of a name do not match
    assert find_module(root, ("model.layers.0",))[1] is root.model.layers[0]


def test_tiny_builder_reference():
    from hf_vlm_gptq.testing import build_tiny_qwen2vl

    assert spec_for_name("qwen2_vl").tiny_builder_function() is build_tiny_qwen2vl
    for spec in ARCHITECTURES:  # every registered family names a builder that exists
        assert callable(spec.tiny_builder_function()), spec.name
    fake = ArchSpec("fam", "Fam", ("fam",), tiny_builder=f"{__name__}:_fake_builder")
    _BUILT.clear()
    assert fake.build_tiny("some/dir", seed=3, num_llm_layers=1) == "some/dir"
    assert _BUILT == [("some/dir", {"seed": 3, "num_llm_layers": 1})]
    with pytest.raises(ValueError, match=r"registered: .*qwen2_vl"):
        spec_for_name("no_such_family")

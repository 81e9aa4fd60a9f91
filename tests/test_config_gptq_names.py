"""transformers' GPTQConfig habits: its option names are aliases of ours, and its options that have no
counterpart here are refused with a hint naming what to use."""

from __future__ import annotations

import pytest

from hf_vlm_gptq import VLMGPTQConfig


def test_gptqconfig_names_set_our_fields():
    cfg = VLMGPTQConfig(bits=3, group_size=64, desc_act=True, damp_percent=0.05, model_seqlen=512, format="gptq")
    assert (cfg.visual_w_bits, cfg.llm_w_bits, cfg.w_groupsize, cfg.act_order) == (3, 3, 64, True)
    assert (cfg.percdamp, cfg.max_seq_len, cfg.checkpoint_format) == (0.05, 512, "gptq")
    d = cfg.to_dict()
    assert (d["bits"], d["group_size"], d["desc_act"]) == (3, 64, True)
    assert "damp_percent" not in d and "model_seqlen" not in d
    assert VLMGPTQConfig.from_dict(d).to_dict() == d


def test_the_issue_example():
    cfg = VLMGPTQConfig(bits=4, group_size=128, desc_act=True)
    assert (cfg.visual_w_bits, cfg.llm_w_bits, cfg.w_groupsize, cfg.act_order) == (4, 4, 128, True)


def test_bits_fills_the_part_not_given():
    cfg = VLMGPTQConfig(bits=4, visual_w_bits=8)
    assert (cfg.visual_w_bits, cfg.llm_w_bits) == (8, 4)
    cfg = VLMGPTQConfig(True, True, True, True, False, False, 8, bits=2)  # visual_w_bits=8 given by position
    assert (cfg.visual_w_bits, cfg.llm_w_bits) == (8, 2)
    mixed = VLMGPTQConfig(visual_w_bits=8, llm_w_bits=4)
    assert VLMGPTQConfig(**mixed.to_dict()).to_dict() == mixed.to_dict()  # the summary "bits" round-trips


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"group_size": 64, "w_groupsize": 32}, "group_size=64 .*w_groupsize=32"),
    ({"desc_act": True, "act_order": False}, "desc_act=True .*act_order=False"),
    ({"bits": 2, "visual_w_bits": 8, "llm_w_bits": 4}, "bits=2 .*visual_w_bits=8, llm_w_bits=4"),
])
def test_an_alias_that_disagrees_with_its_field_is_an_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VLMGPTQConfig(**kwargs)


def test_agreeing_alias_and_field_are_fine():
    assert VLMGPTQConfig(group_size=64, w_groupsize=64).w_groupsize == 64


def test_bad_alias_values_name_our_field():
    with pytest.raises(ValueError, match=r"VLMGPTQConfig\.visual_w_bits must be one of .*got 5\. \(set by GPTQConfig's name bits=5\)"):
        VLMGPTQConfig(bits=5)
    with pytest.raises(ValueError, match=r"VLMGPTQConfig\.w_groupsize .*\(set by GPTQConfig's name group_size=0\)"):
        VLMGPTQConfig(group_size=0)


@pytest.mark.parametrize(("name", "hint"), [
    ("tokenizer", "processor=AutoProcessor"),
    ("use_exllama", "kernel is chosen per layer"),
    ("block_name_to_quantize", "modules_to_not_convert"),
    ("batch_size", "its own forward pass"),
])
def test_gptqconfig_options_without_counterpart_are_refused_with_a_hint(name, hint):
    with pytest.raises(ValueError, match=f"no counterpart of GPTQConfig's {name} .*{hint}"):
        VLMGPTQConfig(**{name: 1})


def test_unknown_names_still_point_at_the_fields():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['nbits'\].*GPTQConfig's bits"):
        VLMGPTQConfig(nbits=4)

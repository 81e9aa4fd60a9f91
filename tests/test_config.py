"""VLMGPTQConfig: defaults of the research code, validation that names the field, safe serialization."""

import json

import pytest
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

import hf_vlm_gptq
from hf_vlm_gptq import VLMGPTQConfig, VLMGPTQHfQuantizer

# the research code's defaults, except percdamp: 0.1 since task accuracy was measured (README, "Quality")
SEED_DEFAULTS = {
    "quant_visual_clip": True, "quant_cross_attention": True, "quant_visual_projector": True, "quant_llm": True,
    "visual_w_rtn": False, "llm_w_rtn": False, "visual_w_bits": 4, "llm_w_bits": 4, "w_groupsize": 128,
    "percdamp": 0.1, "act_order": False, "visual_w_clip": True, "llm_w_clip": True, "visual_split": False,
    "llm_split": False, "sym": True,
}


def test_defaults_match_the_seed():
    cfg = VLMGPTQConfig()
    for name, value in SEED_DEFAULTS.items():
        assert getattr(cfg, name) == value, name
    assert cfg.dataset is None and cfg.processor is None


def test_registered_with_transformers_and_reimport_is_harmless():
    import importlib

    assert AUTO_QUANTIZATION_CONFIG_MAPPING["vlm_gptq"] is VLMGPTQConfig
    assert AUTO_QUANTIZER_MAPPING["vlm_gptq"] is VLMGPTQHfQuantizer
    importlib.reload(hf_vlm_gptq)
    hf_vlm_gptq._register()
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["vlm_gptq"].__name__ == "VLMGPTQConfig"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("llm_w_bits", 5), ("visual_w_bits", 16), ("llm_w_bits", True), ("visual_w_bits", "4"),
        ("w_groupsize", 0), ("w_groupsize", -2), ("w_groupsize", 12.5), ("w_groupsize", True),
        ("percdamp", -0.1), ("percdamp", 1.5), ("percdamp", "0.01"),
        ("act_order", 1), ("quant_llm", "yes"), ("llm_split", None), ("sym", 0),
        ("num_samples", 0), ("max_seq_len", 4), ("block_size", 0), ("seed", 1.0),
        ("calibration_device", 0), ("modules_to_not_convert", [1]),
    ],
)
def test_bad_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        VLMGPTQConfig(**{field: value})


def test_unknown_option_and_all_parts_off_are_errors():
    with pytest.raises(ValueError, match="llm_bits"):
        VLMGPTQConfig(llm_bits=4)
    with pytest.raises(ValueError, match="switch at least one on"):
        VLMGPTQConfig(quant_visual_clip=False, quant_cross_attention=False, quant_visual_projector=False,
                      quant_llm=False)


def test_to_dict_never_holds_calibration_data_and_round_trips():
    data = [{"text": "a secret calibration prompt"}]
    processor = type("Processor", (), {"apply_chat_template": lambda self, *a, **k: {}})()
    cfg = VLMGPTQConfig(dataset=data, processor=processor, llm_w_bits=3, act_order=True)
    d = cfg.to_dict()
    assert "dataset" not in d and "processor" not in d
    text = json.dumps(d)
    assert "secret" not in text
    assert d["quant_method"] == "vlm_gptq" and d["format_version"] == hf_vlm_gptq.FORMAT_VERSION
    back = VLMGPTQConfig.from_dict(json.loads(text))
    assert back.llm_w_bits == 3 and back.act_order is True and back.dataset is None


def test_newer_format_version_is_refused_with_advice():
    d = VLMGPTQConfig().to_dict()
    d["format_version"] = 99
    with pytest.raises(ValueError, match="format_version"):
        VLMGPTQConfig.from_dict(d)


def test_part_options():
    from hf_vlm_gptq.config_fields import PartOptions

    cfg = VLMGPTQConfig(visual_w_bits=8, llm_w_rtn=True, visual_split=True)
    assert cfg.part_options("visual") == PartOptions(bits=8, rtn=False, clip=True, split=True)
    assert cfg.part_options("llm") == PartOptions(bits=4, rtn=True, clip=True, split=False)
    with pytest.raises(ValueError, match="part"):
        cfg.part_options("audio")

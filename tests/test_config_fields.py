"""The one declaration of the config's options (`hf_vlm_gptq.config_fields.FIELDS`) and what it drives:
the README table, the CLI's options, the research-code names, the checkpoint manifest kept apart from the
options, and the old flat `quantization_config` layout still loading."""

from __future__ import annotations

import argparse
import inspect
import json
import re
from pathlib import Path

import pytest

from hf_vlm_gptq import FORMAT_VERSION, VLMGPTQConfig
from hf_vlm_gptq.cli import build_parser
from hf_vlm_gptq.compat import config_from_args
from hf_vlm_gptq.config_fields import (
    FIELDS,
    PART_SWITCHES,
    PARTS,
    RESEARCH_NAMES,
    PartOptions,
    markdown_table,
)
from hf_vlm_gptq.manifest import CheckpointManifest

README = Path(__file__).resolve().parents[1] / "README.md"
TABLE = re.compile(r"<!-- config-table:[^\n]*-->\n(.*?)\n<!-- /config-table -->", re.S)


def test_the_readme_table_is_the_declarations():
    found = TABLE.search(README.read_text())
    assert found, "README.md lost its <!-- config-table --> markers"
    assert found.group(1) == markdown_table(), (
        "README's options table differs from hf_vlm_gptq/config_fields.py; paste the output of\n"
        "python -c 'from hf_vlm_gptq.config_fields import markdown_table; print(markdown_table())'")
    for f in FIELDS:
        assert f"`{f.name}`" in found.group(1), f.name


def test_defaults_signature_and_stored_values_come_from_the_declarations():
    cfg = VLMGPTQConfig()
    params = inspect.signature(VLMGPTQConfig).parameters
    assert [p for p in params if p != "kwargs"] == [f.name for f in FIELDS]
    for f in FIELDS:
        assert params[f.name].default == f.default, f.name
        expected = [] if f.name == "modules_to_not_convert" else f.default  # None: no module kept
        assert getattr(cfg, f.name) == expected, f.name
        assert (f.name in cfg.to_dict()) == f.serialized, f.name


def _quantize_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["quantize"]
    group = next(g for g in sub._action_groups if g.title.startswith("quantization options"))
    return {a.dest: a for a in group._group_actions}


def test_cli_options_are_the_declared_flags():
    actions = _quantize_options(build_parser())
    assert set(actions) == {f.name for f in FIELDS if f.cli}
    for f in FIELDS:
        if f.cli:
            assert f.cli in actions[f.name].option_strings, f.name
            if f.allowed and f.type is not bool and not f.cli_help:
                assert f.allowed in actions[f.name].help, f.name  # --help says what is allowed
    assert {"--visual-w-bits", "--no-quant-llm", "--skip", "--device", "--offload", "--dataset"} <= {
        s for a in actions.values() for s in a.option_strings}


def test_research_names_reach_their_fields():
    values = {"nsamples": 9, "seqlen": 512, "visual_w_bits": 8, "llm_split": True, "quant_llm": False, "seed": 3}
    cfg = config_from_args(argparse.Namespace(**values))
    assert (cfg.num_samples, cfg.max_seq_len, cfg.visual_w_bits, cfg.llm_split, cfg.quant_llm, cfg.seed) == (
        9, 512, 8, True, False, 3)
    assert set(RESEARCH_NAMES.values()) >= {*PART_SWITCHES, "w_groupsize", "percdamp", "act_order", "sym"}


def test_part_options_are_typed_and_the_flat_names_are_views():
    cfg = VLMGPTQConfig(visual_w_bits=8, llm_w_clip=False)
    assert cfg.part_options("visual") == PartOptions(bits=8, rtn=False, clip=True, split=False)
    assert cfg.part_options("llm") == PartOptions(bits=4, rtn=False, clip=False, split=False)
    assert {f.part for f in FIELDS if f.part} == set(PARTS)
    cfg.llm_w_bits = 2  # transformers' from_dict(**kwargs) sets attributes by their flat names
    assert cfg.part_options("llm").bits == 2 and cfg.to_dict()["llm_w_bits"] == 2


def test_bits_summary_only_when_both_parts_agree():
    same = VLMGPTQConfig(visual_w_bits=8, llm_w_bits=8).to_dict()
    assert (same["bits"], same["group_size"], same["desc_act"]) == (8, 128, False)
    mixed = VLMGPTQConfig(visual_w_bits=8, llm_w_bits=4).to_dict()
    assert "bits" not in mixed and mixed["group_size"] == 128


def test_an_old_flat_quantization_config_still_loads_and_writes_back_the_same_keys():
    # what earlier versions wrote: flat options, manifest keys, and `bits` = the LLM's bits even when the
    # vision part had others
    modules = {"model.language_model.layers.0.mlp.down_proj": {
        "kind": "linear", "in_features": 128, "out_features": 64, "bits": 4, "group_size": 32, "bias": False}}
    old = {**{k: v for k, v in VLMGPTQConfig().to_dict().items() if k != "bits"}, "visual_w_bits": 8,
           "bits": 4, "modules": modules, "stats": {"x": {"loss": 1.0}}, "format_version": 1,
           "calibration_device": "cuda"}
    cfg = VLMGPTQConfig.from_dict(json.loads(json.dumps(old)))
    assert cfg.manifest == CheckpointManifest(modules, {"x": {"loss": 1.0}}, FORMAT_VERSION)
    assert (cfg.modules, cfg.stats, cfg.format_version) == (modules, {"x": {"loss": 1.0}}, 1)
    assert (cfg.visual_w_bits, cfg.llm_w_bits) == (8, 4)
    back = cfg.to_dict()
    assert {k: v for k, v in back.items() if k != "bits"} == {k: v for k, v in old.items() if k != "bits"}
    assert "bits" not in back  # vision 8, LLM 4: no single number to write


def test_the_manifest_is_not_an_option_and_not_settable():
    cfg = VLMGPTQConfig()
    assert cfg.manifest.is_empty and cfg.to_dict()["modules"] == {}
    with pytest.raises(AttributeError):
        cfg.modules = {"x": {}}
    saved = cfg.with_manifest(cfg.manifest.with_results({"a": {"kind": "linear"}}, {"a": {"loss": 0.5}}))
    assert saved.modules == {"a": {"kind": "linear"}} and cfg.manifest.is_empty  # cfg itself unchanged
    assert saved.to_dict() == {**cfg.to_dict(), "modules": {"a": {"kind": "linear"}}, "stats": {"a": {"loss": 0.5}}}

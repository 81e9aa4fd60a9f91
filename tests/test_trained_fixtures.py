"""Synthetic tasks and trained tiny VLMs (hf_vlm_gptq.testing.tasks / train_tiny).

The trained models are not built here (CI does not train: minutes of CPU each). Tests that need one use the
cached model (``python -m hf_vlm_gptq.testing.train_tiny``) or skip saying so; the rest run on the tiny
random models and a two-step training run.
"""

from __future__ import annotations

import json

import pytest
import torch

from hf_vlm_gptq.testing import train_tiny
from hf_vlm_gptq.testing.tasks import KINDS, TASKS, task_samples


def test_tasks_are_deterministic_and_cover_every_kind():
    a, b = task_samples(30, "eval"), task_samples(30, "eval")
    assert [x["answer"] for x in a] == [x["answer"] for x in b]
    assert [x["answer"] for x in task_samples(10, "eval", start=20)] == [x["answer"] for x in a[20:]]
    assert {x["kind"] for x in a} == set(KINDS)
    assert {x["task"] for x in a} == {t for kind in KINDS for t in TASKS[kind]}
    for item in a:
        assert item["answer"] and isinstance(item["text"], str)
        if item["kind"] == "image":
            assert item["image"].size == (56, 56)
        if item["kind"] == "video":
            assert len(item["video"]) == 4
    train = {x["text"] for x in task_samples(400, "train") if x["task"] == "larger"}
    held = {x["text"] for x in task_samples(400, "eval") if x["task"] == "larger"}
    assert held and not train & held  # held-out digit pairs are never trained on


@pytest.mark.parametrize("fixture", ["tiny_qwen2vl_dir", "tiny_videollama3_dir"])
def test_collate_puts_the_answer_at_the_end(fixture, request):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(request.getfixturevalue(fixture))
    items = task_samples(10, "eval")
    batch = train_tiny.collate(processor, items)
    assert len(batch.spans) == 10
    for item, (a, b), row in zip(items, batch.spans, batch.inputs["input_ids"]):
        assert processor.tokenizer.decode(row[a:b]) == item["answer"] + processor.tokenizer.eos_token
    assert "pixel_values" in batch.inputs and "pixel_values_videos" in batch.inputs


def test_two_step_training_writes_an_atomic_cache_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_VLM_GPTQ_CACHE", str(tmp_path))
    assert train_tiny.trained_model_path("qwen2_vl") is None
    monkeypatch.setitem(train_tiny.RECIPE, "steps", 2)
    monkeypatch.setitem(train_tiny.RECIPE, "eval_items", 10)
    monkeypatch.setitem(train_tiny.RECIPE, "warmup", 1)
    monkeypatch.setattr(train_tiny, "SIZES", {"hidden_size": 64, "num_llm_layers": 1, "vision_depth": 1,
                                              "vision_width": 32})
    path = train_tiny.ensure_trained("qwen2_vl", progress=False)
    assert path == train_tiny.trained_model_path("qwen2_vl") == train_tiny.trained_dir("qwen2_vl")
    record = json.loads((path / "training.json").read_text())
    assert record["recipe"]["steps"] == 2 and set(record["accuracy"]) >= set(KINDS)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary folder left behind
    loaded = train_tiny.load_trained("qwen2_vl")
    assert loaded is not None and loaded[2] == path


def test_a_shorter_trained_fixture_is_its_own_cache_entry(tmp_path, monkeypatch):
    """``steps=`` (the harder fixture of bench/accuracy.py --train-steps) trains that many steps into an entry
    of its own, beside the recipe's."""
    monkeypatch.setenv("HF_VLM_GPTQ_CACHE", str(tmp_path))
    monkeypatch.setitem(train_tiny.RECIPE, "steps", 3)
    monkeypatch.setitem(train_tiny.RECIPE, "eval_items", 10)
    monkeypatch.setitem(train_tiny.RECIPE, "warmup", 1)
    monkeypatch.setattr(train_tiny, "SIZES", {"hidden_size": 64, "num_llm_layers": 1, "vision_depth": 1,
                                              "vision_width": 32})
    assert train_tiny.cache_key("qwen2_vl", 3) == train_tiny.cache_key("qwen2_vl")  # the recipe's own count
    assert train_tiny.cache_key("qwen2_vl", 2) != train_tiny.cache_key("qwen2_vl")
    short = train_tiny.ensure_trained("qwen2_vl", progress=False, steps=2)
    assert train_tiny.trained_model_path("qwen2_vl") is None  # the recipe's entry is not made
    assert short == train_tiny.trained_model_path("qwen2_vl", 2)
    record = json.loads((short / "training.json").read_text())
    assert record["recipe"]["steps"] == 2 and record["key"] == train_tiny.cache_key("qwen2_vl", 2)
    assert train_tiny.load_trained("qwen2_vl", steps=2)[2] == short


def _trained(arch: str):
    loaded = train_tiny.load_trained(arch)
    if loaded is None:
        pytest.skip(f"no trained {arch} in the cache ({train_tiny.trained_dir(arch)}); train it with "
                    f"`python -m hf_vlm_gptq.testing.train_tiny --arch {arch}` (CI does not train)")
    return loaded


@pytest.mark.parametrize("arch", ["qwen2_vl", "video_llama_3"])
def test_trained_model_answers_and_survives_w4(arch):
    """The cached model scores what its training record says, and whole-model W4 g128 GPTQ keeps it."""
    from hf_vlm_gptq import VLMGPTQConfig
    from hf_vlm_gptq.api import quantize
    from hf_vlm_gptq.calib import build_model_inputs

    model, processor, path = _trained(arch)
    record = json.loads((path / "training.json").read_text())
    batches = train_tiny.make_batches(processor, task_samples(100, "eval", record["recipe"]["seed"]))
    before = train_tiny.evaluate(model, batches)
    acc = before.accuracy()
    assert acc["image"] >= 90 and acc["text"] >= 90 and acc["video"] >= 70, acc
    calib = [{k: v for k, v in item.items() if k in ("image", "video", "video_fps", "text", "answer")}
             for item in task_samples(16, "train", seed=1)]
    with torch.no_grad():
        quantize(model, VLMGPTQConfig(dataset=None, num_samples=16, calibration_device="cpu"),
                 data=build_model_inputs(calib, processor), progress=False)
    after = train_tiny.evaluate(model, batches)
    assert after.accuracy()["all"] >= acc["all"] - 3
    assert after.kl_from(before)["all"] < 0.05

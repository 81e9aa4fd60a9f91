"""Calibration passes with the weights kept in place (offload.py): the same code path as on a GPU, run with
execution device = CPU, where every module works on copies of its tensors that are put back afterwards."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
from transformers import AutoModelForImageTextToText, AutoProcessor

from hf_vlm_gptq import VLMGPTQConfig
from hf_vlm_gptq.api import quantize
from hf_vlm_gptq.calib import build_model_inputs, builtin_samples
from hf_vlm_gptq.offload import ExecutionOffload, same_device
from hf_vlm_gptq.pipeline import use_offload


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.LayerNorm(16), nn.Linear(16, 4))
    net.register_buffer("offset", torch.ones(4))
    return net


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_modules_run_on_copies_and_get_their_tensors_back():
    net = _net()
    originals = dict(list(net.named_parameters()) + list(net.named_buffers()))
    x = torch.randn(3, 8)
    expected = net(x)
    seen = []
    probe = net[0].register_forward_pre_hook(lambda m, _args: seen.append(m.weight))
    with ExecutionOffload(net, "cpu") as placed:
        out = net(x)
        net(x)
    probe.remove()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # the probe runs before the offload hook on the first call (original), then sees the resident copy
    assert seen[0] is originals["0.weight"]
    assert seen[1] is not originals["0.weight"] and torch.equal(seen[1], originals["0.weight"])
    assert placed.moves == 4  # root (buffer), Linear, LayerNorm, Linear: each copied once
    after = dict(list(net.named_parameters()) + list(net.named_buffers()))
    assert all(after[name] is tensor for name, tensor in originals.items())
    assert _hook_count(net) == 0


def test_without_room_on_the_device_modules_go_back_after_each_call():
    net = _net()
    x = torch.randn(2, 8)
    with ExecutionOffload(net, "cpu", max_resident_bytes=0) as placed:
        net(x)
        net(x)
    assert placed.moves == 8


def test_tensors_come_back_when_the_pass_is_cut_short():
    net = _net()
    weight = net[3].weight

    def stop(*_):
        raise RuntimeError("stop")

    handle = net[2].register_forward_hook(stop)
    with pytest.raises(RuntimeError, match="stop"), ExecutionOffload(net, "cpu", max_resident_bytes=0):
        net(torch.randn(2, 8))
    handle.remove()
    assert net[3].weight is weight and _hook_count(net) == 0


def test_same_device_and_the_automatic_choice():
    assert same_device("cpu", torch.device("cpu"))
    assert not same_device("cpu", "meta")
    net = _net()
    assert not use_offload(VLMGPTQConfig(), net, torch.device("cpu"))  # weights already there
    assert use_offload(VLMGPTQConfig(), net, torch.device("meta"))  # weights elsewhere
    assert not use_offload(VLMGPTQConfig(calibration_offload=False), net, torch.device("meta"))


@pytest.fixture(scope="module")
def calib_batches(tiny_qwen2vl_dir):
    processor = AutoProcessor.from_pretrained(tiny_qwen2vl_dir)
    return build_model_inputs(builtin_samples(5, seed=3), processor, max_seq_len=512)


def _quantized(path, batches, offload):
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    cfg = VLMGPTQConfig(w_groupsize=32, calibration_device="cpu", calibration_offload=offload)
    records = quantize(model, cfg, data=batches, progress=False)
    return model, records


def test_offloaded_calibration_gives_the_same_checkpoint(tiny_qwen2vl_dir, calib_batches, caplog):
    plain, plain_records = _quantized(tiny_qwen2vl_dir, calib_batches, offload=False)
    with caplog.at_level(logging.INFO, logger="hf_vlm_gptq.pipeline"):
        offloaded, records = _quantized(tiny_qwen2vl_dir, calib_batches, offload=True)
    assert "one module at a time" in caplog.text
    assert records.keys() == plain_records.keys()
    assert {r.component for r in records.values()} == {"vision", "merger", "llm"}
    for path, record in records.items():
        assert (record.loss, record.tokens) == (plain_records[path].loss, plain_records[path].tokens), path
    expected = plain.state_dict()
    for name, tensor in offloaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert _hook_count(offloaded) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_offload_matches_the_model_on_the_gpu(tiny_qwen2vl_dir, calib_batches):
    cfg = dict(w_groupsize=32, calibration_device="cuda")
    on_gpu = AutoModelForImageTextToText.from_pretrained(tiny_qwen2vl_dir, dtype=torch.float32).to("cuda")
    expected = quantize(on_gpu, VLMGPTQConfig(**cfg, calibration_offload=False), data=calib_batches, progress=False)
    on_host = AutoModelForImageTextToText.from_pretrained(tiny_qwen2vl_dir, dtype=torch.float32)
    records = quantize(on_host, VLMGPTQConfig(**cfg), data=calib_batches, progress=False)  # offload: automatic
    assert records.keys() == expected.keys()
    for path, record in records.items():
        assert record.tokens == expected[path].tokens, path
        assert record.loss == pytest.approx(expected[path].loss, rel=1e-3, abs=1e-6), path
    assert {t.device.type for t in list(on_host.parameters()) + list(on_host.buffers())} == {"cpu"}
    assert _hook_count(on_host) == 0

"""The pipeline's event stream (events.py): the order of the events of a run on the tiny Qwen2-VL, their
records against the returned ones, the listener registration, and the progress bars they drive."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from hf_vlm_gptq import VLMGPTQConfig, events, get_quantizers
from hf_vlm_gptq.api import quantize
from hf_vlm_gptq.arch import spec_for_model_type
from hf_vlm_gptq.calib import build_model_inputs, builtin_samples
from hf_vlm_gptq.progress import ProgressBars

OPTIONS = dict(w_groupsize=32, calibration_device="cpu", max_seq_len=256)


def check_order(seen: list, spec) -> None:
    """ComponentStart per component in spec order; a stem's ModuleSolved before the blocks; each block's
    inputs caught before its first block; per block BlockStart, its modules' ModuleSolved, BlockEnd."""
    order = [c.name for c in spec.components]
    starts = [e for e in seen if isinstance(e, events.ComponentStart)]
    assert [e.component for e in starts] == sorted((e.component for e in starts), key=order.index)
    assert len({e.component for e in starts}) == len(starts)
    current: events.ComponentStart | None = None
    block: events.BlockStart | None = None
    done = 0
    caught = False
    for event in seen:
        if isinstance(event, events.ComponentStart):
            assert block is None and (current is None or done == current.blocks)
            current, done, caught = event, 0, False
        elif isinstance(event, events.CaptureDone):
            assert block is None and event.component == current.component and event.calls
            caught = True
        elif isinstance(event, events.BlockStart):
            assert block is None and caught, "a block starts before its inputs were caught"
            assert (event.component, event.index, event.total) == (current.component, done, current.blocks)
            block = event
        elif isinstance(event, events.ModuleSolved):
            assert event.record.component == current.component
            if block is None:  # the stem: before the component's first block
                assert current.stem and done == 0 and event.record.kind == "conv"
            else:
                assert event.module.startswith(block.path + ".") and event.record.kind != "conv"
        elif isinstance(event, events.BlockEnd):
            assert block is not None and (event.path, event.index) == (block.path, block.index)
            assert event.seconds >= 0
            block, done = None, done + 1
    assert block is None and current is not None and done == current.blocks


def solved(seen: list) -> list[events.ModuleSolved]:
    return [e for e in seen if isinstance(e, events.ModuleSolved)]


def test_from_pretrained_emits_every_module_once_in_order(tiny_qwen2vl_dir):
    seen: list = []
    with events.listen(seen.append):
        model = AutoModelForImageTextToText.from_pretrained(
            tiny_qwen2vl_dir, dtype=torch.float32, quantization_config=VLMGPTQConfig(num_samples=4, **OPTIONS))
    events.emit(events.BlockEnd("llm", "x", 0, 1, 0.0))  # outside the `with`: nobody listens any more
    spec = spec_for_model_type("qwen2_vl")
    check_order(seen, spec)
    assert [e.component for e in seen if isinstance(e, events.ComponentStart)] == [c.name for c in spec.components]
    vision = next(e for e in seen if isinstance(e, events.ComponentStart))
    assert vision.stem and vision.blocks == len(model.model.visual.blocks)
    records = get_quantizers(model)
    modules = solved(seen)
    assert [e.record.path for e in modules] == list(records)  # exactly one event per module, in run order
    assert all(e.record is records[e.record.path] for e in modules)
    assert {e.module: e.entry for e in modules} == model.config.quantization_config.modules
    paths = {path for path, _ in model.named_modules()}
    assert all(e.module in paths for e in modules)


def test_api_quantize_sends_events_to_on_event_and_to_listeners(tiny_qwen2vl_dir):
    processor = AutoProcessor.from_pretrained(tiny_qwen2vl_dir)
    batches = build_model_inputs(builtin_samples(3, seed=1), processor, max_seq_len=256)
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2vl_dir, dtype=torch.float32)
    outer: list = []
    direct: list = []
    with events.listen(outer.append):
        records = quantize(model, VLMGPTQConfig(**OPTIONS), data=batches, select={"merger": "all", "llm": "blocks"},
                           progress=False, on_event=direct.append)
    assert outer == direct and direct
    check_order(direct, spec_for_model_type("qwen2_vl"))
    assert [e.component for e in direct if isinstance(e, events.ComponentStart)] == ["merger", "llm"]
    assert {e.record.path: e.record for e in solved(direct)} == records
    assert [e.record.path for e in solved(direct)] == list(records)


def test_progress_bars_follow_the_events():
    bars = ProgressBars()
    bars(events.ComponentStart("vision", 4, "GPTQ", blocks=2, stem=True))
    bar = bars.bar
    assert bar is not None and (bar.total, bar.desc, bar.unit, bar.leave) == (2, "vision", "block", False)
    bars(events.BlockEnd("vision", "v.0", 0, 2, 0.0))
    assert bar.n == 1 and bars.bar is bar
    bars(events.BlockEnd("vision", "v.1", 1, 2, 0.0))
    assert bar.n == 2 and bars.bar is None  # closed after the last block
    bars(events.ComponentStart("merger", 4, "GPTQ", blocks=0, stem=False))
    assert bars.bar is None  # nothing to count
    quiet = ProgressBars(enabled=False)
    quiet(events.ComponentStart("llm", 4, "GPTQ", blocks=3, stem=False))
    assert quiet.bar is None


def test_a_failing_listener_ends_the_run(tiny_qwen2vl_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2vl_dir, dtype=torch.float32)
    batches = build_model_inputs(builtin_samples(2, seed=1), AutoProcessor.from_pretrained(tiny_qwen2vl_dir),
                                 max_seq_len=256)

    def refuse(event):
        if isinstance(event, events.BlockStart):
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        quantize(model, VLMGPTQConfig(**OPTIONS), data=batches, select={"merger": "blocks"}, on_event=refuse)
    assert getattr(model, "hf_quantizer", None) is None  # nothing was booked

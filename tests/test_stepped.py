"""Blocks quantized group by group from one forward pass per call (``stepped.py``): the same checkpoint as
replaying the block once per group (with GPTAQ too), with one block forward per call instead of one per group
plus one."""

from __future__ import annotations

import pytest
import torch

CALIB = 8


def _quantize(model_dir, samples, *, replays: bool, monkeypatch, gptaq: bool = False, **options):
    from transformers import AutoModelForImageTextToText

    import hf_vlm_gptq.block_solve as block_solve
    from hf_vlm_gptq import VLMGPTQConfig
    from hf_vlm_gptq.api import quantize

    if replays:  # the path taken when the passes would not fit in memory
        monkeypatch.setattr(block_solve, "fits_in_memory", lambda *args: False)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    layer = model.model.language_model.layers[0]  # not the last: its outputs feed the next
    forwards = []
    handle = layer.register_forward_pre_hook(lambda *_: forwards.append(1))
    cfg = VLMGPTQConfig(dataset=samples, num_samples=CALIB, w_groupsize=32, calibration_device="cpu",
                        gptaq=gptaq, **options)
    with monkeypatch.context() as patch:
        patch.setenv("HF_VLM_GPTQ_ADAPTIVE_THREADS", "0")
        records = quantize(model, cfg, progress=False)
    handle.remove()
    monkeypatch.undo()
    return records, model.state_dict(), len(forwards)


@pytest.mark.parametrize(("split", "gptaq"), [(False, False), (True, False), (False, True)])
def test_one_pass_per_call_gives_the_replays_checkpoint(tiny_qwen2vl_dir, builtin_samples_small, monkeypatch,
                                                       split, gptaq):
    """GPTAQ: the float copy of each block runs its own passes, each just before the quantized block's."""
    samples = builtin_samples_small[:CALIB]
    options = {"visual_split": split, "gptaq": gptaq}
    replayed, replayed_state, replay_forwards = _quantize(tiny_qwen2vl_dir, samples, replays=True,
                                                          monkeypatch=monkeypatch, **options)
    stepped, stepped_state, stepped_forwards = _quantize(tiny_qwen2vl_dir, samples, replays=False,
                                                         monkeypatch=monkeypatch, **options)
    assert stepped.keys() == replayed.keys()
    # bit for bit where the pass goes on with exactly what the replay runs; a split layer entered before it was
    # swapped goes on as one matmul with its dequantized weight (the split module adds two): rounding apart,
    # and where that rounding flips a code of a small layer (a few dozen rows), its loss moves by up to ~1 %
    rel = 1e-5 if not split else 3e-2
    for path, rec in replayed.items():
        assert stepped[path].loss == pytest.approx(rec.loss, rel=rel, abs=1e-9), path
        assert stepped[path].tokens == rec.tokens
    total = sum(rec.loss for rec in replayed.values())
    assert sum(rec.loss for rec in stepped.values()) == pytest.approx(total, rel=1e-5 if not split else 1e-3)
    same_words = []
    for key, value in replayed_state.items():
        if not split:
            torch.testing.assert_close(stepped_state[key], value, rtol=0, atol=0, msg=key)
        elif key.endswith("qweight"):
            same_words.append((stepped_state[key] == value).flatten())
    if split:  # a flipped code moves its row's later codes, and the layers after it see other inputs
        assert float(torch.cat(same_words).float().mean()) > 0.9  # (unrelated codes: hardly any word equal)
    if gptaq:
        return  # the float copy shares the counting hook (deepcopy)
    # the first LLM block, per call: the capture pass of the model reaches it once; then one pass, against
    # one (partial) replay per sequential group (4) plus the pass that makes the next block's inputs
    assert stepped_forwards == CALIB + CALIB
    assert replay_forwards == CALIB + 5 * CALIB


def test_without_true_sequential_the_replays_serve(tiny_qwen2vl_dir, builtin_samples_small, monkeypatch):
    """Several groups solved from one set of inputs cannot share a pass that goes on with their packed
    weights: that case keeps the replay and the pass for the next block's inputs."""
    _, _, forwards = _quantize(tiny_qwen2vl_dir, builtin_samples_small[:CALIB], replays=False,
                               monkeypatch=monkeypatch, true_sequential=False)
    assert forwards == CALIB + 2 * CALIB

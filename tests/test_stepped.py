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


class _Fails(torch.nn.Module):
    """Raises on the call whose input is all ones."""

    def forward(self, x):
        if bool((x == 1).all()):
            raise RuntimeError("third call fails")
        return x


class _Guarded(torch.nn.Module):
    """A block whose forward holds a context open across its stops (like a model's own ``with`` blocks)."""

    def __init__(self, left: list[int]) -> None:
        super().__init__()
        self.first, self.second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        self.fails, self.left = _Fails(), left

    def forward(self, x):
        try:
            return self.second(self.fails(self.first(x)))
        finally:
            self.left.append(1)


def test_a_failing_pass_raises_in_the_caller_and_the_paused_ones_are_unwound():
    from hf_vlm_gptq.stepped import Lane, forward_in_steps

    left: list[int] = []
    block = _Guarded(left)
    with torch.no_grad():
        block.first.weight.copy_(torch.eye(4))
        block.first.bias.zero_()
    calls = [((torch.zeros(2, 4),), {}), ((torch.full((2, 4), 2.0),), {}), ((torch.ones(2, 4),), {}),
             ((torch.zeros(2, 4),), {})]
    solved: list[int] = []
    lane = Lane(block, calls, [[block.first], [block.second]], lambda k, args: None)
    with pytest.raises(RuntimeError, match="third call fails"):
        forward_in_steps([lane], solved.append)
    assert solved == [0]  # the first group was solved; the error came before the second
    assert len(left) == len(calls)  # every pass left its context: the failing one and the three paused
    assert not block.first._forward_pre_hooks and not block.second._forward_pre_hooks
    assert torch.is_grad_enabled()  # the caller's grad mode is back


def test_the_passes_leave_the_caller_grad_mode_and_give_each_call_its_output():
    from hf_vlm_gptq.stepped import Lane, forward_in_steps

    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    inputs = [torch.randn(3, 4) for _ in range(5)]
    expected = [block(x).detach() for x in inputs]
    fed: list[tuple[int, int]] = []
    lane = Lane(block, [((x,), {}) for x in inputs], [[block[0]], [block[2]]],
                lambda k, args: fed.append((k, int(args[0].shape[0]))))
    forward_in_steps([lane], lambda k: None)
    assert torch.is_grad_enabled()
    assert fed == [(0, 3)] * 5 + [(1, 3)] * 5  # every call fed group 0, then every call group 1
    for (args, _), want in zip(lane.calls, expected):
        assert torch.equal(args[0], want) and not args[0].requires_grad


@pytest.mark.parametrize("replays", [False, True])
def test_the_merger_takes_the_vision_blocks_outputs_without_another_pass(tiny_qwen2vl_dir, builtin_samples_small,
                                                                          monkeypatch, replays):
    """``inputs_from``: the merger is fed the last vision block's outputs from its own quantization (the
    stepped passes' outputs, or one more replay of that block) instead of a forward pass through the quantized
    vision tower; the checkpoint is bit for bit the one the extra pass gives."""
    import dataclasses

    from transformers import AutoModelForImageTextToText

    import hf_vlm_gptq.block_solve as block_solve
    import hf_vlm_gptq.pipeline as pipeline
    from hf_vlm_gptq import VLMGPTQConfig
    from hf_vlm_gptq.api import quantize
    from hf_vlm_gptq.arch import spec_for_model_type

    def run(handed: bool):
        spec = spec_for_model_type("qwen2_vl")
        if not handed:
            spec = dataclasses.replace(spec, components=tuple(dataclasses.replace(c, inputs_from=None)
                                                              for c in spec.components))
        with monkeypatch.context() as patch:
            patch.setattr(pipeline, "spec_for_model_type", lambda _type: spec)
            patch.setenv("HF_VLM_GPTQ_ADAPTIVE_THREADS", "0")
            if replays:
                patch.setattr(block_solve, "fits_in_memory", lambda *args: False)
            model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2vl_dir, dtype=torch.float32)
            first = model.model.visual.blocks[0]  # (the last one runs once more in the replays instead)
            runs = []
            handle = first.register_forward_pre_hook(lambda *_: runs.append(1))
            cfg = VLMGPTQConfig(dataset=builtin_samples_small[:CALIB], num_samples=CALIB, w_groupsize=32,
                                calibration_device="cpu")
            records = quantize(model, cfg, progress=False)
            handle.remove()
        return records, model.state_dict(), len(runs)

    handed, handed_state, handed_runs = run(True)
    caught, caught_state, caught_runs = run(False)
    assert handed.keys() == caught.keys() and any(k.startswith("model.visual.merger") for k in handed)
    for key, value in caught_state.items():
        torch.testing.assert_close(handed_state[key], value, rtol=0, atol=0, msg=key)
    media = handed["model.visual.merger.mlp.0"].samples
    assert media > 0 and caught_runs - handed_runs == media  # one pass of the vision tower less per media call

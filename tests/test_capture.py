"""capture.py on a toy model (no checkpoint): passes cut short once the watched block ran, caught calls equal
what the blocks really get, replays that stop early or produce the next block's inputs, and the dense cache."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_vlm_gptq.capture import (
    advance,
    capture_calls,
    capture_chain_calls,
    dense_cache,
    first_output,
    hidden_of,
    replay,
    replay_until,
    run_batches,
    with_hidden,
)
from hf_vlm_gptq.ops import QuantLinear, rtn_quantize

D = 16


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.q = nn.Linear(D, D)
        self.mlp = nn.Linear(D, D)

    def forward(self, hidden_states, scale, offset=0.0):
        h = hidden_states + self.q(self.norm(hidden_states)) * scale + offset
        return (h + self.mlp(h), "extra")  # a tuple, like transformers' decoder layers


class Toy(nn.Module):
    """Embedding, then blocks called as `block(x, scale=<shared tensor>, offset=<index>)`."""

    def __init__(self, n_blocks: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, D)
        self.blocks = nn.ModuleList(Block() for _ in range(n_blocks))
        self.runs = []  # indexes of the blocks that ran

    def forward(self, input_ids, use_cache=True, image=None):
        assert use_cache is False  # capture passes never build a cache
        x = self.embed(input_ids)
        scale = torch.full((D,), 0.5)  # one tensor shared by every block's call
        for i, block in enumerate(self.blocks):
            self.runs.append(i)
            x = block(x, scale=scale, offset=float(i))[0]
        return x


def _batches(n: int = 2) -> list[dict]:
    return [{"input_ids": torch.randint(0, 50, (1, 5 + i), generator=torch.Generator().manual_seed(i))}
            for i in range(n)]


def _real_inputs(model: Toy, batch: dict) -> list[torch.Tensor]:
    """The hidden states each block gets in a full pass (computed without capture.py)."""
    seen = []
    handles = [b.register_forward_pre_hook(lambda _m, args, kw: seen.append(args[0] if args else kw["hidden_states"]),
                                           with_kwargs=True) for b in model.blocks]
    with torch.no_grad():
        model(**batch, use_cache=False)
    for handle in handles:
        handle.remove()
    return seen


def test_run_batches_stops_once_the_watched_block_ran():
    model = Toy()
    run_batches(model, model.blocks[0], _batches(2))
    assert model.runs == [0, 0]  # each pass ended after block 0; blocks 1 and 2 never ran
    model.runs.clear()
    twice = Toy(n_blocks=2)
    twice.blocks[1] = twice.blocks[0]  # the same module runs twice per pass (a tower run per media kind)
    run_batches(twice, twice.blocks[0], _batches(1), calls_per_batch=lambda b: 2)
    assert twice.runs == [0, 1]
    run_batches(model, model.blocks[0], _batches(2), calls_per_batch=lambda b: 0)  # never runs: not run at all
    assert model.runs == [] and not model.blocks[0]._forward_hooks


def test_capturing_a_blocks_inputs_does_not_run_it():
    """Only the inputs of the watched block are wanted: each pass ends as its last expected call begins."""
    model = Toy()
    ran = []
    model.blocks[1].register_forward_hook(lambda *_: ran.append(1))
    calls = capture_calls(model, model.blocks[1], _batches(2), torch.device("cpu"))
    assert len(calls) == 2 and ran == [] and model.runs == [0, 1, 0, 1]  # reached, never run
    twice = Toy(n_blocks=2)
    twice.blocks[1] = twice.blocks[0]
    twice.blocks[0].register_forward_hook(lambda *_: ran.append(1))
    assert len(capture_calls(twice, twice.blocks[0], _batches(1), torch.device("cpu"),
                             calls_per_batch=lambda b: 2)) == 2
    assert ran == [1]  # its first call ran, the second was caught and not run


def test_capture_calls_are_the_real_inputs():
    model = Toy()
    batches = _batches(2)
    calls = capture_calls(model, model.blocks[1], batches, torch.device("cpu"))
    assert len(calls) == 2 and model.runs == [0, 1, 0, 1]
    for call, batch in zip(calls, batches):
        kwargs = call[1]
        assert torch.equal(hidden_of(call), _real_inputs(model, batch)[1])
        assert kwargs["offset"] == 1.0 and torch.equal(kwargs["scale"], torch.full((D,), 0.5))
    assert not model.blocks[1]._forward_pre_hooks and not model.blocks[1]._forward_hooks
    (call,) = capture_calls(model, model.blocks[1], batches[:1], torch.device("meta"))  # kept on `device`
    assert hidden_of(call).is_meta and call[1]["scale"].is_meta


def test_chain_capture_keeps_each_blocks_own_arguments_and_shared_tensors():
    model = Toy()
    batches = _batches(2)
    first, own = capture_chain_calls(model, list(model.blocks), batches, torch.device("cpu"))
    assert len(first) == 2 and [len(calls) for calls in own] == [2, 2, 2]
    for b, batch in enumerate(batches):
        assert torch.equal(hidden_of(first[b]), _real_inputs(model, batch)[0])
        assert [hidden_of(calls[b]) for calls in own] == [None, None, None]  # filled from the chain later
        assert [calls[b][1]["offset"] for calls in own] == [0.0, 1.0, 2.0]  # each block's own arguments
    # moved to another device, a tensor the blocks shared in the real pass is copied once and stays shared
    first, own = capture_chain_calls(model, list(model.blocks), batches[:1], torch.device("meta"))
    scales = [calls[0][1]["scale"] for calls in own]
    assert scales[0].is_meta and scales[0] is scales[1] is scales[2]
    assert hidden_of(first[0]).is_meta


def test_replay_and_advance_produce_the_next_blocks_inputs():
    model = Toy()
    batches = _batches(2)
    calls = capture_calls(model, model.blocks[0], batches, torch.device("cpu"))
    chained = replay(model.blocks[0], calls, keep_outputs=True)
    for b, batch in enumerate(batches):
        assert torch.equal(hidden_of(chained[b]), _real_inputs(model, batch)[1])
    assert replay(model.blocks[0], calls, keep_outputs=False) == []
    advance(model.blocks[0], calls)  # in place
    assert all(torch.equal(hidden_of(a), hidden_of(b)) for a, b in zip(calls, chained))


def test_replay_until_stops_after_the_watched_layers():
    model = Toy()
    block = model.blocks[0]
    calls = capture_calls(model, block, _batches(3), torch.device("cpu"))
    ran = {"q": 0, "mlp": 0}
    block.q.register_forward_hook(lambda *_: ran.__setitem__("q", ran["q"] + 1))
    block.mlp.register_forward_hook(lambda *_: ran.__setitem__("mlp", ran["mlp"] + 1))
    replay_until(block, calls, [block.q])
    assert ran == {"q": 3, "mlp": 0}  # the MLP after q never ran
    replay_until(block, calls, [block.q, block.mlp])
    assert ran == {"q": 6, "mlp": 3}
    replay_until(block, calls, [])
    assert ran == {"q": 6, "mlp": 3}
    assert len(block.q._forward_hooks) == 1 and len(block.mlp._forward_hooks) == 1  # only the test's own


def test_call_helpers():
    x, y = torch.zeros(2), torch.ones(2)
    positional = ((x, "mask"), {"k": 1})
    keyword = ((), {"hidden_states": x, "k": 1})
    assert hidden_of(positional) is x and hidden_of(keyword) is x
    assert with_hidden(positional, y) == ((y, "mask"), {"k": 1})
    assert with_hidden(keyword, y) == ((), {"hidden_states": y, "k": 1}) and keyword[1]["hidden_states"] is x
    assert first_output(x) is x and first_output((x, None)) is x and first_output([x]) is x

    class Output:
        last_hidden_state = x

    assert first_output(Output()) is x
    with pytest.raises(TypeError, match="cannot find the hidden states in a block output of type dict"):
        first_output({"h": x})


def test_dense_cache_keeps_the_dequantized_weight_only_inside():
    block = nn.Module()
    block.layer = QuantLinear.from_result(rtn_quantize(torch.randn(16, 32), bits=4, group_size=16), None,
                                          torch.float32)
    layer = block.layer
    assert not layer.cache_dequantized
    with dense_cache(block) as enable:
        assert not layer.cache_dequantized  # only once enabled
        enable()
        assert layer.cache_dequantized
        assert layer.dequantize_weight() is layer.dequantize_weight()  # kept, not rebuilt
    assert "cache_dequantized" not in layer.__dict__ and not layer.cache_dequantized  # back to the default
    assert layer.dequantize_weight() is not layer.dequantize_weight()  # the kept copy went


def test_the_parts_already_quantized_run_on_their_dense_weight_in_later_captures(tiny_qwen2vl_dir, builtin_samples_small,
                                                                                 monkeypatch):
    """The merger's and the LLM's inputs come from passes through the quantized vision tower: its packed modules
    keep their dequantized weight for those passes (each runs once per batch) and drop it afterwards."""
    from transformers import AutoModelForImageTextToText

    import hf_vlm_gptq.capture as capture
    from hf_vlm_gptq import VLMGPTQConfig
    from hf_vlm_gptq.api import quantize

    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2vl_dir, dtype=torch.float32)
    seen = []
    real = capture.run_batches

    def watching(m, *args, **kwargs):
        packed = [mod for mod in m.modules() if isinstance(mod, QuantLinear)]
        seen.append((len(packed), all(mod.cache_dequantized for mod in packed)))
        return real(m, *args, **kwargs)

    monkeypatch.setattr(capture, "run_batches", watching)
    cfg = VLMGPTQConfig(dataset=builtin_samples_small[:4], num_samples=4, w_groupsize=32, calibration_device="cpu")
    quantize(model, cfg, progress=False)
    later = [cached for packed, cached in seen if packed]
    assert later and all(later), seen  # every capture after the first part ran on dense caches
    assert not any(mod.cache_dequantized or ("dense", torch.float32) in mod._cache
                   for mod in model.modules() if isinstance(mod, QuantLinear))

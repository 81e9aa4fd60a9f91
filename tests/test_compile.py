"""torch.compile on a quantized model: the packed layers (and the fused CPU kernel) are custom ops with fake
implementations, so a compiled model has no graph break in them and decodes with as few recompiles as the
float model does (transformers' generate: a new prompt length, a growing KV cache), with eager's outputs."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import AutoModelForImageTextToText

import hf_vlm_gptq  # noqa: F401  (registers the quantizer)
from hf_vlm_gptq import VLMGPTQConfig
from hf_vlm_gptq.ops import QuantLinear, cpu_amx, qbase, rtn_quantize
from hf_vlm_gptq.ops import cpu_fused as CF
from hf_vlm_gptq.ops.cpu_kernel import FusedWeights
from hf_vlm_gptq.ops.packing import unpack_codes
from hf_vlm_gptq.testing import build_tiny_qwen2vl

# generate() on two prompt lengths: the float model compiles 5 graphs too (prefill, then decode with a
# dynamic cache length, and each again once the prompt length is dynamic)
MAX_GRAPHS = 6


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory):
    """A one-layer tiny Qwen2-VL with its language model packed (4-bit, group 32: the int4 kernel's shapes)."""
    root = tmp_path_factory.mktemp("compile")
    path = build_tiny_qwen2vl(root / "float", seed=0, num_llm_layers=1, vision_depth=1)
    cfg = VLMGPTQConfig(num_samples=2, w_groupsize=32, quant_visual_clip=False, quant_cross_attention=False,
                        llm_w_rtn=True, llm_w_clip=False)
    model = AutoModelForImageTextToText.from_pretrained(path, quantization_config=cfg, dtype=torch.float32)
    model.save_pretrained(root / "w4")
    return root / "w4"


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def _stand_in_kernel(calls):
    """What the fused kernel computes (dequantize exactly, bf16 matmul), for hosts without AVX512-BF16."""
    def call(fn, x2, w, bias):
        calls.append(x2.shape[0])
        codes = unpack_codes(w.qweight, w.bits, w.in_features).float()
        g = w.g_idx.long()
        weight = ((codes - w.zeros.t()[:, g].float()) * w.scales.t()[:, g].float()).to(torch.bfloat16)
        y = x2 @ weight.t()
        return y if bias is None else y + bias.to(torch.bfloat16)
    return call


@pytest.fixture
def stand_in_fused(monkeypatch):
    """The fused kernel replaced by a torch stand-in (any host), the AMX kernel set aside (as without AMX)."""
    calls: list[int] = []
    monkeypatch.setattr(CF, "_state", {"lib": object(), "ready": True})
    monkeypatch.setattr(cpu_amx, "_state", {"reason": "set aside: these tests follow the fused kernel", "ready": True})
    monkeypatch.setattr(CF, "call_bf16_kernel", _stand_in_kernel(calls))
    return calls


def _generate(model, length: int) -> torch.Tensor:
    ids = torch.randint(5, 300, (1, length), generator=torch.Generator().manual_seed(length))
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                          do_sample=False)


def _compiled_decode_matches_eager(path, dtype, stats):
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).eval()
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    with torch.no_grad():
        eager = [_generate(model, n) for n in (9, 12)]
        ids = torch.randint(5, 300, (1, 10), generator=torch.Generator().manual_seed(1))
        eager_logits = model(input_ids=ids).logits
        model.forward = torch.compile(model.forward)
        with torch._dynamo.config.patch(recompile_limit=MAX_GRAPHS, fail_on_recompile_limit_hit=True):
            compiled = [_generate(model, n) for n in (9, 12)]
            compiled_logits = model(input_ids=ids).logits
    assert not stats["graph_break"], dict(stats["graph_break"])
    assert stats["stats"]["unique_graphs"] <= MAX_GRAPHS, dict(stats["stats"])
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)
    return compiled_logits.float(), eager_logits.float()


def test_compiled_decode_float32(quantized_dir, fresh_dynamo):
    """float32: the packed layers' dequantize + matmul path, inside the op."""
    compiled, eager = _compiled_decode_matches_eager(quantized_dir, torch.float32, fresh_dynamo)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_compiled_decode_bfloat16(quantized_dir, fresh_dynamo):
    """bfloat16: torch's int4 kernel on this CPU (or the fused kernel where the CPU has it)."""
    compiled, eager = _compiled_decode_matches_eager(quantized_dir, torch.bfloat16, fresh_dynamo)
    assert ((compiled - eager).norm() / eager.norm()).item() < 2e-2  # bf16 rounding of the compiled glue


def test_compiled_decode_through_the_fused_kernel(quantized_dir, fresh_dynamo, stand_in_fused):
    compiled, eager = _compiled_decode_matches_eager(quantized_dir, torch.bfloat16, fresh_dynamo)
    assert stand_in_fused  # every packed layer went through the fused kernel's path
    assert ((compiled - eager).norm() / eager.norm()).item() < 2e-2


@pytest.mark.skipif(cpu_amx.kernel_unavailable_reason() is not None, reason="needs the AMX kernel (a CPU with AMX)")
def test_compiled_decode_through_the_amx_kernel(quantized_dir, fresh_dynamo, monkeypatch):
    """On a CPU with AMX the compiled model's packed layers run the AMX kernel's op (hf_vlm_gptq::fused_matmul_amx)."""
    rows = []
    real = cpu_amx._call
    monkeypatch.setattr(cpu_amx, "_call", lambda fn, x2, *a: rows.append(x2.shape[0]) or real(fn, x2, *a))
    compiled, eager = _compiled_decode_matches_eager(quantized_dir, torch.bfloat16, fresh_dynamo)
    assert 1 in rows  # the decode steps (one row) went through the kernel
    assert ((compiled - eager).norm() / eager.norm()).item() < 2e-2


def test_the_fused_kernel_op_is_traced_once_for_every_row_count(fresh_dynamo, stand_in_fused):
    res = rtn_quantize(torch.randn(64, 128, generator=torch.Generator().manual_seed(0)), bits=4, group_size=32)
    layer = QuantLinear.from_result(res, torch.randn(64), torch.bfloat16)
    weights = layer._prepare("fused", torch.empty(1, 128, dtype=torch.bfloat16))
    assert isinstance(weights, FusedWeights)
    fn = torch.compile(lambda x: CF.fused_matmul(x, weights, layer.bias) * 2)
    with torch._dynamo.config.patch(recompile_limit=3, fail_on_recompile_limit_hit=True):
        for rows in (3, 5, 7, 16, 33):
            x = torch.randn(rows, 128, dtype=torch.bfloat16)
            torch.testing.assert_close(fn(x), CF.fused_matmul(x, weights, layer.bias) * 2, rtol=0, atol=0)
    assert not fresh_dynamo["graph_break"]
    assert fresh_dynamo["stats"]["unique_graphs"] <= 2  # static first shape, then one dynamic graph
    assert torch.ops.hf_vlm_gptq.fused_matmul.default is not None


def test_a_copied_module_runs_its_own_weights_through_the_op(fresh_dynamo):
    """The op finds its module by handle: a deep copy (e.g. of a whole model) gets a handle of its own."""
    import copy

    res = rtn_quantize(torch.randn(32, 64, generator=torch.Generator().manual_seed(0)), bits=4, group_size=32)
    layer = QuantLinear.from_result(res, None, torch.float32)
    twin = copy.deepcopy(layer)
    assert twin._op_handle != layer._op_handle and qbase._module(twin._op_handle) is twin
    twin.scales.mul_(2)
    x = torch.randn(3, 64)
    fn = torch.compile(lambda m, x: m(x))
    torch.testing.assert_close(fn(twin, x), 2 * fn(layer, x))

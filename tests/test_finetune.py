"""Fine-tuning on top of a quantized model: gradients through the packed layers (w.r.t. their inputs; the
packed weights frozen, no dense copy kept for the backward), PEFT LoRA on QuantLinear / split layers (train,
save, reload), and `model.dequantize()` back to a plain float model."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.trainer_utils import validate_quantization_for_training

import hf_vlm_gptq  # noqa: F401  (registers the quantizer)
from hf_vlm_gptq import VLMGPTQConfig
from hf_vlm_gptq.calib import build_model_inputs, builtin_samples
from hf_vlm_gptq.modules_swap import SplitLinear
from hf_vlm_gptq.ops import QuantConv, QuantLinear, rtn_quantize
from hf_vlm_gptq.ops.qbase import PackedWeightModule

peft = pytest.importorskip("peft")
from hf_vlm_gptq.lora import QuantLinearLora, get_peft_model, load_adapter  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj", "qkv"]  # down_proj is a split layer, qkv in the vision tower


def _linear(dtype, bias=True, out_f=64, in_f=128):
    g = torch.Generator().manual_seed(3)
    res = rtn_quantize(torch.randn(out_f, in_f, generator=g), bits=4, group_size=32)
    return QuantLinear.from_result(res, torch.randn(out_f, generator=g) if bias else None, dtype)


def _weights_saved(fn, *weight_shapes):
    """Run fn(); the shapes among ``weight_shapes`` ([out, in] of the packed layers) of the float tensors that
    autograd saved for the backward (a dense copy of a packed weight kept alive)."""
    found = []

    def pack(t):
        if t.is_floating_point() and (tuple(t.shape) in weight_shapes or tuple(t.shape)[::-1] in weight_shapes):
            found.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, found


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_backward_is_grad_times_the_dequantized_weight(dtype):
    m = _linear(dtype)
    m.bias.requires_grad_(True)
    x = torch.randn(2, 5, 128, dtype=dtype, requires_grad=True)
    y, saved = _weights_saved(lambda: m(x), (64, 128))
    assert saved == []  # the backward re-dequantizes: no [out, in] float weight kept alive
    g = torch.randn_like(y)
    y.backward(g)
    w = m.dequantize_weight(dtype)
    torch.testing.assert_close(x.grad, (g @ w).to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(m.bias.grad, g.sum((0, 1)).to(dtype))
    assert all(not b.requires_grad and b.grad is None for b in m.buffers())


def test_conv_and_split_layers_pass_gradients():
    conv = nn.Conv3d(3, 32, (2, 14, 14), stride=(2, 14, 14), bias=True)
    res = rtn_quantize(conv.weight.detach().reshape(32, -1), bits=4, group_size=128)
    q = QuantConv.from_result(res, conv, torch.bfloat16)
    patches = torch.randn(6, 3 * 2 * 14 * 14, dtype=torch.bfloat16, requires_grad=True)  # Qwen2-VL's 2-D rows
    y, saved = _weights_saved(lambda: q(patches), (32, 1176))
    assert saved == []
    y.float().sum().backward()
    w = q.dequantize_weight(torch.bfloat16).reshape(32, -1)
    torch.testing.assert_close(patches.grad, torch.ones(6, 32, dtype=torch.bfloat16) @ w)
    l1 = nn.Linear(1, 64, bias=False, dtype=torch.bfloat16)
    split = SplitLinear(l1, _linear(torch.bfloat16, in_f=127))
    x = torch.randn(4, 128, dtype=torch.bfloat16, requires_grad=True)
    y, saved = _weights_saved(lambda: split(x), (64, 127))
    assert saved == []
    y.float().sum().backward()
    dense = torch.cat([l1.weight, split.L2.dequantize_weight(torch.bfloat16)], dim=1)
    torch.testing.assert_close(x.grad, torch.ones(4, 64, dtype=torch.bfloat16) @ dense, rtol=1e-2, atol=1e-2)


@pytest.fixture(scope="module")
def quantized_dir(tiny_qwen2vl_dir, tmp_path_factory):
    """Every part packed (conv stem, vision, merger, LLM; split fc2 / down_proj), RTN, saved."""
    cfg = VLMGPTQConfig(num_samples=4, w_groupsize=32, visual_w_rtn=True, llm_w_rtn=True, visual_w_clip=False,
                        llm_w_clip=False, visual_split=True, llm_split=True)
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2vl_dir, quantization_config=cfg,
                                                        dtype=torch.float32)
    out = tmp_path_factory.mktemp("finetune") / "w4"
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(tiny_qwen2vl_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def batch(quantized_dir):
    processor = AutoProcessor.from_pretrained(quantized_dir)
    sample = next(s for s in builtin_samples(8, seed=7, with_video=False) if "image" in s)
    inputs = build_model_inputs([sample], processor, max_seq_len=256)[0]
    return {**inputs, "labels": inputs["input_ids"].clone()}


def load(path, dtype):
    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)


def no_labels(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def test_the_quantizer_says_trainable(quantized_dir):
    assert load(quantized_dir, torch.float32).hf_quantizer.is_trainable


def test_lora_trains_on_the_packed_layers_saves_and_reloads(quantized_dir, batch, tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(load(quantized_dir, torch.bfloat16),
                           peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    validate_quantization_for_training(model)  # what transformers' Trainer checks: raised before
    wrapped = {name: type(m.get_base_layer()) for name, m in model.named_modules() if isinstance(m, QuantLinearLora)}
    assert set(wrapped.values()) == {QuantLinear, SplitLinear} and len(wrapped) == 2 * 3 + 2  # 2 LLM layers, 2 blocks
    packed = {name: b.clone() for name, b in model.named_buffers() if name.endswith("qweight")}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(n.count("lora_") for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=2e-2)
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        loss.backward()
        assert all(p.grad is not None for p in trainable)  # the vision adapters too: through the packed layers
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(torch.equal(b, packed[n]) for n, b in model.named_buffers() if n in packed)  # frozen
    model.eval()
    with torch.no_grad():
        trained = model(**no_labels(batch)).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = load_adapter(load(quantized_dir, torch.bfloat16), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**no_labels(batch)).logits, trained, rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="dequantize"):
        reloaded.merge_and_unload()

    # the documented way to merge: dequantize, load the adapter on the float model, merge
    base = load(quantized_dir, torch.float32)
    on_packed = load_adapter(load(quantized_dir, torch.float32), tmp_path / "adapter").eval()
    merged = load_adapter(base.dequantize(), tmp_path / "adapter").merge_and_unload().eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**no_labels(batch)).logits, on_packed(**no_labels(batch)).logits,
                                   rtol=1e-4, atol=1e-4)


def test_dequantize_gives_a_plain_float_model_with_the_same_logits(quantized_dir, batch, tmp_path):
    model = load(quantized_dir, torch.float32).eval()
    paths = {n for n, m in model.named_modules() if isinstance(m, (PackedWeightModule, SplitLinear))
             and not n.endswith(".L2")}
    split = model.get_submodule("model.language_model.layers.0.mlp.down_proj")
    assert isinstance(split, SplitLinear)
    with torch.no_grad():
        packed = model(**no_labels(batch)).logits
    dense = model.dequantize()
    assert dense is model and not dense.is_quantized and getattr(dense, "hf_quantizer", None) is None
    assert not hasattr(dense.config, "quantization_config")
    assert not any(isinstance(m, (PackedWeightModule, SplitLinear)) for m in dense.modules())
    kinds = {type(dense.get_submodule(p)) for p in paths}
    assert kinds == {nn.Linear, nn.Conv3d}
    merged = dense.get_submodule("model.language_model.layers.0.mlp.down_proj")
    assert (merged.in_features, merged.out_features) == (split.in_features, split.out_features)
    assert merged.weight.shape == (split.out_features, split.in_features)
    with torch.no_grad():
        out = dense(**no_labels(batch)).logits
    torch.testing.assert_close(out, packed, rtol=1e-5, atol=1e-4)  # dequantize + dense: the reference path
    dense.save_pretrained(tmp_path / "float")
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "float", dtype=torch.float32).eval()
    assert not any(isinstance(m, PackedWeightModule) for m in again.modules())
    with torch.no_grad():
        torch.testing.assert_close(again(**no_labels(batch)).logits, out, rtol=0, atol=0)


def test_dequantize_takes_a_dtype(quantized_dir):
    model = load(quantized_dir, torch.float32).dequantize(dtype=torch.bfloat16)
    layer = model.get_submodule("model.language_model.layers.0.self_attn.q_proj")
    assert type(layer) is nn.Linear and layer.weight.dtype == torch.bfloat16

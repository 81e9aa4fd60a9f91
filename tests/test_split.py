"""`visual_split` / `llm_split`: fc2 / down_proj become L1 (input channel 0, full precision) + L2 (the other
channels, packed; GPTQ on their Hessian), outputs summed, bias added once. Saved as `<path>.L1.weight` and
`<path>.L2.qweight`..., reloaded with identical logits, recorded under the research code's `<path>.L2` keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from hf_vlm_gptq import VLMGPTQConfig, get_quantizers
from hf_vlm_gptq.calib import build_model_inputs, builtin_samples
from hf_vlm_gptq.modules_swap import SplitLinear
from hf_vlm_gptq.ops import HessianAccumulator, QuantLinear, gptq_quantize

# (vision blocks, LLM blocks, checkpoint key prefix of the vision blocks) per architecture
LAYOUT = {
    "qwen2_vl": ("model.visual.blocks", "model.language_model.layers", "visual.blocks"),
    "video_llama_3": ("model.vision_model.encoder.layers", "model.language_model.layers",
                      "model.vision_model.encoder.layers"),
}


@pytest.fixture(scope="module", params=["qwen2_vl", "video_llama_3"])
def split_run(request, tmp_path_factory):
    arch = request.param
    path = request.getfixturevalue("tiny_qwen2vl_dir" if arch == "qwen2_vl" else "tiny_videollama3_dir")
    cfg = VLMGPTQConfig(num_samples=6, w_groupsize=32, visual_split=True, llm_split=True)
    model = AutoModelForImageTextToText.from_pretrained(path, quantization_config=cfg, dtype=torch.float32).eval()
    out = tmp_path_factory.mktemp(f"split_{arch}") / "ckpt"
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(path).save_pretrained(out)
    processor = AutoProcessor.from_pretrained(path)
    sample = next(s for s in builtin_samples(6, seed=42) if "image" in s)
    inputs = build_model_inputs([{k: v for k, v in sample.items() if k != "answer"}], processor)[0]
    return arch, path, model, out, inputs


def test_split_modules_records_and_checkpoint_keys(split_run):
    arch, path, model, out, _inputs = split_run
    vision, llm, saved_vision = LAYOUT[arch]
    float_model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    records = get_quantizers(model)
    for target in (f"{vision}.0.mlp.fc2", f"{vision}.1.mlp.fc2", f"{llm}.0.mlp.down_proj", f"{llm}.1.mlp.down_proj"):
        split, dense = model.get_submodule(target), float_model.get_submodule(target)
        assert isinstance(split, SplitLinear) and isinstance(split.L2, QuantLinear)
        assert type(split.L1) is nn.Linear and split.L1.bias is None  # the bias lives in L2 only
        assert torch.equal(split.L1.weight, dense.weight[:, :1])
        if dense.bias is not None:
            assert torch.equal(split.L2.bias, dense.bias)
        assert split.L2.in_features == dense.in_features - 1
        rec = records[f"{target}.L2"]
        assert target not in records and rec.kind == "split_linear" and rec.in_features == dense.in_features - 1
        assert model.config.quantization_config.modules[target]["kind"] == "split_linear"
    tensors = load_file(out / "model.safetensors")
    key = f"{saved_vision}.0.mlp.fc2"
    assert tensors[f"{key}.L1.weight"].shape[1] == 1 and tensors[f"{key}.L2.qweight"].dtype == torch.int32
    assert f"{key}.weight" not in tensors and f"{key}.L1.bias" not in tensors and f"{key}.L2.bias" in tensors


def test_split_checkpoint_reloads_identical_and_generates(split_run):
    _arch, _path, model, out, inputs = split_run
    reloaded = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)
    generated = reloaded.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


def test_l2_is_gptq_on_the_hessian_without_channel_0(tiny_videollama3_dir):
    """Quantize only layer 0's fc2 (its inputs stay float), then redo its L2 solve by hand with ops."""
    vision = LAYOUT["video_llama_3"][0]
    target = f"{vision}.0.mlp.fc2"
    samples = builtin_samples(6, seed=0)
    keep_float = ["model.vision_model.embeddings", f"{vision}.0.self_attn", f"{vision}.0.mlp.fc1", f"{vision}.1"]
    cfg = VLMGPTQConfig(dataset=samples, num_samples=6, w_groupsize=32, visual_w_bits=8, visual_split=True,
                        quant_visual_projector=False, quant_llm=False, modules_to_not_convert=keep_float)
    model = AutoModelForImageTextToText.from_pretrained(tiny_videollama3_dir, quantization_config=cfg,
                                                        dtype=torch.float32)
    assert list(get_quantizers(model)) == [f"{target}.L2"]
    split = model.get_submodule(target)

    float_model = AutoModelForImageTextToText.from_pretrained(tiny_videollama3_dir, dtype=torch.float32)
    dense = float_model.get_submodule(target)
    seen: list[torch.Tensor] = []
    handle = dense.register_forward_hook(lambda _m, args, _o: seen.append(args[0].detach()))
    with torch.no_grad():
        for batch in build_model_inputs(samples, AutoProcessor.from_pretrained(tiny_videollama3_dir)):
            float_model(**batch)
    handle.remove()
    hessian = HessianAccumulator(dense.in_features - 1)
    for x in seen:
        hessian.add_batch(x[..., 1:])
    expected = gptq_quantize(dense.weight.detach()[:, 1:], hessian.hessian, bits=8, group_size=32, sym=True,
                             clip=True, percdamp=cfg.percdamp, full_range=cfg.sym_full_range,
                             nsamples=hessian.nsamples)  # GPTAQ: float inputs here, so the same solve
    assert get_quantizers(model)[f"{target}.L2"].tokens == hessian.nsamples
    reference = expected.dequantize()
    assert (split.L2.weight - reference).abs().max() <= 1e-3 * reference.abs().max()

    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])
    with torch.no_grad():
        y_split, y_dense = split(x), dense(x)
        assert torch.allclose(split.L1(x[:, :1]), x[:, :1] @ dense.weight[:, :1].t())
    assert ((y_split - y_dense).norm() / y_dense.norm()).item() < 1e-2  # 8-bit L2: the layer barely moves

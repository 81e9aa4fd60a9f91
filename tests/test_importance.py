"""hessian_weighting="gradient": token importance from a backward pass of the float model's answer loss
(importance.py), checked against facts a causal language model fixes, and wired through the pipeline."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def model_and_batches(tiny_qwen2vl_dir, builtin_samples_small):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from hf_vlm_gptq.calib import build_model_inputs

    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2vl_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tiny_qwen2vl_dir)
    return model, build_model_inputs(builtin_samples_small[:6], processor, max_seq_len=256)


def _blocks(model):
    llm = dict(model.named_modules())["model.language_model.layers"]
    vision = dict(model.named_modules())["model.visual.blocks"]
    return {**{f"llm.{i}": b for i, b in enumerate(llm)}, **{f"vision.{i}": b for i, b in enumerate(vision)}}


def test_weights_follow_the_answer_loss(model_and_batches):
    """Mean 1 per block; a position whose output no label depends on (the last token of a sample: causal
    attention) gets only the uniform half (1/2) in every LLM block; the other half is ||dL/dy||^2 from
    autograd on the last block, rescaled."""
    from hf_vlm_gptq.importance import answer_labels, gradient_token_weights

    model, batches = model_and_batches
    blocks = _blocks(model)
    weights = gradient_token_weights(model, blocks, batches)
    llm_calls = weights["llm.0"]
    assert len(llm_calls) == len(batches)
    for path, calls in weights.items():
        rows = torch.cat([c for c in calls if c is not None])
        assert rows.mean().item() == pytest.approx(1.0, rel=1e-5), path
        assert (rows >= 0).all() and rows.max() > rows.min(), path
    for batch, w in zip(batches, llm_calls):
        mask = batch["attention_mask"].reshape(-1)
        last = int(mask.nonzero().max())
        assert w[last] == 0.5 and (w[: last] > 0.5).any()
        assert (w[mask == 0] == 0.5).all()  # padding predicts nothing and feeds nothing
    assert any(c is not None for c in weights["vision.0"])  # the picture reaches the answer

    # independent: autograd of the last LLM block's output on the first batch
    last_block = blocks["llm.1"]
    batch = batches[0]
    seen = {}
    handle = last_block.register_forward_hook(lambda _m, _a, out: seen.setdefault("y", out[0] if isinstance(out, tuple) else out))
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        emb = model.get_input_embeddings()
        h2 = emb.register_forward_hook(lambda _m, _a, out: out.requires_grad_(True))
        labels = answer_labels(batch, (model.config.image_token_id, model.config.video_token_id))
        loss = model(**batch, labels=labels, use_cache=False).loss
        (grad,) = torch.autograd.grad(loss, seen["y"])
        h2.remove()
    finally:
        handle.remove()
        for p in model.parameters():
            p.requires_grad_(True)
    direct = grad.pow(2).sum(-1).reshape(-1)
    ratio = (weights["llm.1"][0] - 0.5) / direct.clamp_min(1e-30)
    live = direct > direct.max() * 1e-6
    assert torch.allclose(ratio[live], ratio[live][0].expand_as(ratio[live]), rtol=1e-4)


def test_gradient_weighting_changes_the_hessians_and_is_recorded(tiny_qwen2vl_dir, builtin_samples_small):
    from transformers import AutoModelForImageTextToText

    from hf_vlm_gptq import VLMGPTQConfig
    from hf_vlm_gptq.api import quantize

    losses = {}
    for weighting in ("none", "gradient"):
        model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2vl_dir, dtype=torch.float32)
        cfg = VLMGPTQConfig(dataset=builtin_samples_small, num_samples=8, w_groupsize=32, calibration_device="cpu",
                            hessian_weighting=weighting)
        records = quantize(model, cfg, progress=False)
        losses[weighting] = {p: r.loss for p, r in records.items()}
        assert model.config.quantization_config.hessian_weighting == weighting
    assert losses["none"].keys() == losses["gradient"].keys()
    for part in ("visual.patch_embed", "visual.blocks.0.", "language_model.layers.0.", "language_model.layers.1."):
        paths = [p for p in losses["none"] if part in p]
        assert paths and any(losses["gradient"][p] != losses["none"][p] for p in paths), part


def test_gradient_weighting_refuses_offloaded_weights(tiny_qwen2vl_dir, builtin_samples_small):
    from transformers import AutoModelForImageTextToText

    from hf_vlm_gptq import VLMGPTQConfig
    from hf_vlm_gptq.api import quantize

    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2vl_dir, dtype=torch.float32)
    cfg = VLMGPTQConfig(dataset=builtin_samples_small, num_samples=4, calibration_device="cpu",
                        calibration_offload=True, hessian_weighting="gradient")
    with pytest.raises(ValueError, match=r"hessian_weighting='gradient'.*calibration device"):
        quantize(model, cfg, progress=False)
    assert not any("Quant" in type(m).__name__ for m in model.modules())  # refused before any work

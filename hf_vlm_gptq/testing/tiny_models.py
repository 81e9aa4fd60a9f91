"""Tiny, real, offline checkpoints of the supported VLM families, for tests and demos.

Each builder writes a complete directory that loads with ``AutoModelForImageTextToText.from_pretrained`` and
``AutoProcessor.from_pretrained``: transformers' native config and model classes with tiny sizes and seeded
random weights, a tokenizer trained on the spot (see ``_tokenizer.py``) and the model family's REAL
processor classes with small pixel budgets, so a 56x56..112x112 picture gives a handful of patches.
The point is to exercise the real module tree, real processors and real ``generate()`` without a hub.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._tokenizer import QWEN2VL_CHAT_TEMPLATE, VIDEOLLAMA3_CHAT_TEMPLATE, train_tiny_tokenizer

logger = logging.getLogger(__name__)

__all__ = ["build_tiny_qwen2vl", "build_tiny_videollama3"]

# Pixel budget of the tiny processors: pictures between 56x56 and 112x112; Qwen2-VL video frames up to
# 84x84 each; VideoLLaMA3's video budget is for the whole clip (its processor divides it by the frame count).
_MIN_PIXELS = 56 * 56
_MAX_PIXELS = 112 * 112
_QWEN_VIDEO_MAX_PIXELS = 84 * 84
_VL3_VIDEO_MIN_PIXELS = 28 * 28
_VL3_VIDEO_MAX_PIXELS = 16 * 56 * 56


def _split_overrides(overrides: dict[str, Any]) -> tuple[dict, dict, dict, dict]:
    """Split ``**overrides`` into (top-level config, text config, vision config, builder options)."""
    builder_keys = {"vocab_size", "min_pixels", "max_pixels", "video_max_pixels", "logit_scale"}
    text = dict(overrides.pop("text_config", None) or {})
    vision = dict(overrides.pop("vision_config", None) or {})
    builder = {key: overrides.pop(key) for key in list(overrides) if key in builder_keys}
    return overrides, text, vision, builder


@torch.no_grad()
def _init_weights(model: nn.Module, seed: int, logit_scale: float) -> None:
    """Fill every parameter from a private seeded generator (the global torch RNG is left alone).

    Linear / conv weights get std ``1/sqrt(fan_in)`` so activations stay O(1) through the blocks, biases
    and norm offsets are small but non-zero (so bias / norm handling is exercised), embeddings are unit
    normal, and the LM head is scaled by ``logit_scale`` so next-token distributions are peaked rather
    than uniform (greedy decoding then depends on the input, which makes quantization damage visible).
    """
    gen = torch.Generator().manual_seed(seed)

    def normal_(tensor: torch.Tensor, std: float, mean: float = 0.0) -> None:
        sample = torch.randn(tensor.shape, generator=gen, dtype=torch.float32) * std + mean
        tensor.copy_(sample.to(tensor.dtype))

    output_embeddings = model.get_output_embeddings()
    for _name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)):
            fan_in = module.weight[0].numel()
            std = 1.0 / math.sqrt(fan_in)
            if module is output_embeddings:
                std *= logit_scale
            normal_(module.weight, std)
            if module.bias is not None:
                normal_(module.bias, 0.02)
        elif isinstance(module, nn.Embedding):
            normal_(module.weight, 1.0)
        elif "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
            normal_(module.weight, 0.1, mean=1.0)
            if getattr(module, "bias", None) is not None:
                normal_(module.bias, 0.02)


def _heads(hidden_size: int, head_dim: int = 16) -> tuple[int, int]:
    """(attention heads, key/value heads) for 16-wide heads, with grouped-query attention when possible."""
    if hidden_size % head_dim:
        raise ValueError(f"hidden_size must be a multiple of {head_dim}, got {hidden_size}")
    heads = hidden_size // head_dim
    return heads, heads // 2 if heads % 2 == 0 else heads


def _build_model(model_cls: type, config: Any, seed: int, logit_scale: float) -> nn.Module:
    """Instantiate and seed-initialize a model without disturbing the caller's global torch RNG."""
    with torch.random.fork_rng(devices=[]):
        model = model_cls(config).eval()
    _init_weights(model, seed, logit_scale)
    return model


def _generation_config(tokenizer: Any):
    """Greedy generation config with the Qwen-style stop tokens (<|im_end|> and <|endoftext|>)."""
    from transformers import GenerationConfig

    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return GenerationConfig(
        bos_token_id=end_of_text,
        eos_token_id=[im_end, end_of_text],
        pad_token_id=end_of_text,
        do_sample=False,
    )


def _save(model: nn.Module, processor: Any, tokenizer: Any, out_dir: Path) -> Path:
    """Write weights, configs, generation config and processor files into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = _generation_config(tokenizer)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def qwen_tokenizer(opts: dict[str, Any]) -> tuple[Any, dict[str, int]]:
    """The trained tiny tokenizer and the ids of its Qwen special tokens."""
    tokenizer = train_tiny_tokenizer(opts.get("vocab_size", 640))
    return tokenizer, {tok: tokenizer.convert_tokens_to_ids(tok) for tok in tokenizer.extra_special_tokens}


def qwen_text_config(tokenizer: Any, ids: dict[str, int], *, hidden_size: int, num_llm_layers: int,
                     head_dim: int, mrope_section: list[int] | None = None, **extra: Any) -> dict[str, Any]:
    """A tiny Qwen2 / Qwen3 text config: ``head_dim``-wide heads, grouped-query attention, M-RoPE sections."""
    heads, kv_heads = _heads(hidden_size, head_dim)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 1_000_000.0}
    if mrope_section is not None:
        rope["mrope_section"] = mrope_section
    config = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_llm_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_parameters": rope,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    config.update(extra)
    return config


def qwen_token_ids(ids: dict[str, int]) -> dict[str, int]:
    """The top-level token-id fields of a Qwen VL config."""
    return {"image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
            "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"]}


def qwen_processor(processor_cls: type, image_cls: type, video_cls: type, tokenizer: Any, opts: dict[str, Any],
                   patch_size: int) -> Any:
    """A Qwen-style processor (real classes) with the tiny pixel budgets and the Qwen chat template."""
    pixels = {"min_pixels": opts.get("min_pixels", _MIN_PIXELS), "max_pixels": opts.get("max_pixels", _MAX_PIXELS)}
    geometry = {"patch_size": patch_size, "temporal_patch_size": 2, "merge_size": 2}
    image_processor = image_cls(**pixels, **geometry)
    # cap_pixels_per_frame=True is the upcoming default; setting it silences the deprecation warning.
    video_processor = video_cls(min_pixels=pixels["min_pixels"],
                                max_pixels=opts.get("video_max_pixels", _QWEN_VIDEO_MAX_PIXELS),
                                cap_pixels_per_frame=True, **geometry)
    return processor_cls(image_processor=image_processor, video_processor=video_processor, tokenizer=tokenizer,
                         chat_template=QWEN2VL_CHAT_TEMPLATE)


def save_tiny(model_cls: type, config: Any, processor: Any, tokenizer: Any, out_dir: str | Path, seed: int,
              opts: dict[str, Any]) -> Path:
    """Seed-initialize `model_cls(config)` and write it with its processor to `out_dir`."""
    model = _build_model(model_cls, config, seed, opts.get("logit_scale", 3.0))
    out = _save(model, processor, tokenizer, Path(out_dir))
    logger.info("wrote tiny %s checkpoint to %s", config.model_type, out)
    return out


def build_tiny_qwen2vl(
    out_dir: str | Path,
    *,
    seed: int = 0,
    num_llm_layers: int = 2,
    vision_depth: int = 2,
    hidden_size: int = 64,
    vision_embed_dim: int = 32,
    head_dim: int = 16,
    **overrides: Any,
) -> Path:
    """Write a tiny native ``qwen2_vl`` checkpoint (``Qwen2VLForConditionalGeneration``) to ``out_dir``.

    Patch geometry matches the real model (patch 14, temporal patch 2, spatial merge 2, so the Conv3d stem
    sees 3*2*14*14 = 1176 inputs); attention heads (language model and vision tower) are ``head_dim`` wide
    (default 16; a multiple of 16), with ``mrope_section`` in the real model's 2:3:3 proportion ([2, 3, 3]
    for 16; vLLM's CPU attention needs heads of at least 32).
    ``overrides``: ``text_config={...}`` / ``vision_config={...}`` entries update the sub-configs, ``vocab_size``
    sets the trained tokenizer size, ``min_pixels`` / ``max_pixels`` / ``video_max_pixels`` the processor
    pixel budgets, ``logit_scale``
    the LM head scale; anything else updates the top-level ``Qwen2VLConfig``. Returns ``out_dir``.
    """
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    top, text_over, vision_over, opts = _split_overrides(dict(overrides))
    if head_dim <= 0 or head_dim % 16:
        raise ValueError(f"head_dim must be a positive multiple of 16, got {head_dim}")
    tokenizer, ids = qwen_tokenizer(opts)
    mrope_section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
    text_config = qwen_text_config(tokenizer, ids, hidden_size=hidden_size, num_llm_layers=num_llm_layers,
                                   head_dim=head_dim, mrope_section=mrope_section, max_window_layers=num_llm_layers)
    text_config.update(text_over)
    vision_config = {
        "depth": vision_depth,
        "embed_dim": vision_embed_dim,
        "hidden_size": text_config["hidden_size"],
        "num_heads": max(1, vision_embed_dim // head_dim),
        "mlp_ratio": 4,
        "in_channels": 3,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
    }
    vision_config.update(vision_over)
    config = Qwen2VLConfig(text_config=text_config, vision_config=vision_config, tie_word_embeddings=False,
                           **qwen_token_ids(ids), **top)
    processor = qwen_processor(Qwen2VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor, tokenizer, opts, 14)
    return save_tiny(Qwen2VLForConditionalGeneration, config, processor, tokenizer, out_dir, seed, opts)


def build_tiny_videollama3(
    out_dir: str | Path,
    *,
    seed: int = 0,
    num_llm_layers: int = 2,
    vision_depth: int = 2,
    hidden_size: int = 64,
    vision_hidden_size: int = 32,
    vision_intermediate_size: int = 112,
    **overrides: Any,
) -> Path:
    """Write a tiny native ``video_llama_3`` checkpoint (``VideoLlama3ForConditionalGeneration``) to ``out_dir``.

    SigLIP-style vision tower (patch 14 Conv2d stem with 3*14*14 = 588 inputs, fc1/fc2 MLP) whose
    intermediate size defaults to 112: a multiple of 16 but not of 32/64/128, like the real 4304. The LLM is
    a tiny ``qwen2`` text model; images use merge size 1 and videos merge size 2, as in the real processor.
    ``overrides`` work as in :func:`build_tiny_qwen2vl`. Returns ``out_dir``.
    """
    from transformers import (
        VideoLlama3Config,
        VideoLlama3ForConditionalGeneration,
        VideoLlama3ImageProcessor,
        VideoLlama3Processor,
        VideoLlama3VideoProcessor,
    )

    top, text_over, vision_over, opts = _split_overrides(dict(overrides))
    tokenizer, ids = qwen_tokenizer(opts)
    text_config = qwen_text_config(tokenizer, ids, hidden_size=hidden_size, num_llm_layers=num_llm_layers,
                                   head_dim=16, model_type="qwen2", max_window_layers=num_llm_layers,
                                   tie_word_embeddings=False)
    text_config.update(text_over)
    vision_config = {
        "hidden_size": vision_hidden_size,
        "intermediate_size": vision_intermediate_size,
        "num_hidden_layers": vision_depth,
        "num_attention_heads": max(1, vision_hidden_size // 16),
        "num_channels": 3,
        "patch_size": 14,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
    }
    vision_config.update(vision_over)
    config = VideoLlama3Config(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        tie_word_embeddings=False,
        **top,
    )
    pixels = {"min_pixels": opts.get("min_pixels", _MIN_PIXELS), "max_pixels": opts.get("max_pixels", _MAX_PIXELS)}
    processor = VideoLlama3Processor(
        image_processor=VideoLlama3ImageProcessor(**pixels, patch_size=14, temporal_patch_size=1, merge_size=1),
        video_processor=VideoLlama3VideoProcessor(
            min_pixels=_VL3_VIDEO_MIN_PIXELS,
            max_pixels=opts.get("video_max_pixels", _VL3_VIDEO_MAX_PIXELS),
            patch_size=14,
            temporal_patch_size=1,
            merge_size=2,
        ),
        tokenizer=tokenizer,
        chat_template=VIDEOLLAMA3_CHAT_TEMPLATE,
    )
    return save_tiny(VideoLlama3ForConditionalGeneration, config, processor, tokenizer, out_dir, seed, opts)

"""A tiny, real, offline Qwen3-VL checkpoint (``Qwen3VLForConditionalGeneration``) for tests and the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .tiny_models import (
    _split_overrides,
    qwen_processor,
    qwen_text_config,
    qwen_token_ids,
    qwen_tokenizer,
    save_tiny,
)

# Qwen3-VL's patch is 16 pixels: pictures of 64x64..128x128 give 16..64 patches.
_MIN_PIXELS = 64 * 64
_MAX_PIXELS = 128 * 128
_VIDEO_MAX_PIXELS = 96 * 96


def build_tiny_qwen3_vl(
    out_dir: str | Path,
    *,
    seed: int = 0,
    num_llm_layers: int = 3,
    vision_depth: int = 3,
    hidden_size: int = 64,
    vision_hidden_size: int = 32,
    vision_intermediate_size: int = 88,
    head_dim: int = 16,
    **overrides: Any,
) -> Path:
    """Write a tiny native ``qwen3_vl`` checkpoint to ``out_dir`` and return it.

    Real geometry (patch 16, temporal patch 2, merge 2: the Conv3d stem, with bias, sees 1,536 inputs);
    vision MLP ``linear_fc1`` / ``linear_fc2`` (intermediate 88: a partial last group at group size 32, like
    the real 4,304 at 128); DeepStack features taken after vision blocks 0 and 1 through two
    ``deepstack_merger_list`` mergers and added to the hidden states after LLM layers 0 and 1; a Qwen3 LLM
    (q_norm / k_norm, interleaved M-RoPE). ``overrides`` work as in :func:`build_tiny_qwen2vl`.
    """
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    top, text_over, vision_over, opts = _split_overrides(dict(overrides))
    opts = {"min_pixels": _MIN_PIXELS, "max_pixels": _MAX_PIXELS, "video_max_pixels": _VIDEO_MAX_PIXELS, **opts}
    tokenizer, ids = qwen_tokenizer(opts)
    mrope_section = [head_dim // 4, head_dim // 8, head_dim // 8]
    text_config = qwen_text_config(tokenizer, ids, hidden_size=hidden_size, num_llm_layers=num_llm_layers,
                                   head_dim=head_dim, mrope_section=mrope_section)
    text_config["head_dim"] = head_dim
    text_config["rope_parameters"]["mrope_interleaved"] = True
    text_config.update(text_over)
    vision_config = {
        "depth": vision_depth,
        "hidden_size": vision_hidden_size,
        "intermediate_size": vision_intermediate_size,
        "num_heads": max(1, vision_hidden_size // head_dim),
        "out_hidden_size": text_config["hidden_size"],
        "patch_size": 16,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0, 1],
    }
    vision_config.update(vision_over)
    config = Qwen3VLConfig(text_config=text_config, vision_config=vision_config, tie_word_embeddings=False,
                           **qwen_token_ids(ids), **top)
    processor = qwen_processor(Qwen3VLProcessor, Qwen2VLImageProcessor, Qwen3VLVideoProcessor, tokenizer, opts, 16)
    return save_tiny(Qwen3VLForConditionalGeneration, config, processor, tokenizer, out_dir, seed, opts)

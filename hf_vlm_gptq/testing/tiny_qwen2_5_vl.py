"""A tiny, real, offline Qwen2.5-VL checkpoint (``Qwen2_5_VLForConditionalGeneration``) for tests and the demo."""

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


def build_tiny_qwen2_5_vl(
    out_dir: str | Path,
    *,
    seed: int = 0,
    num_llm_layers: int = 2,
    vision_depth: int = 3,
    hidden_size: int = 64,
    vision_hidden_size: int = 32,
    vision_intermediate_size: int = 88,
    head_dim: int = 16,
    **overrides: Any,
) -> Path:
    """Write a tiny native ``qwen2_5_vl`` checkpoint to ``out_dir`` and return it.

    Real geometry (patch 14, temporal patch 2, merge 2: the Conv3d stem sees 1,176 inputs); the vision MLP
    is gated (gate/up/down, intermediate 88: a partial last group at group size 32, like the real 3,420 at
    128); window attention over 2x2 merged patches (window_size 56) with block 1 of 3 on full attention, so
    a 112x112 picture has four windows and the blocks really take different ``cu_seqlens``.
    ``overrides`` work as in :func:`build_tiny_qwen2vl`.
    """
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    top, text_over, vision_over, opts = _split_overrides(dict(overrides))
    tokenizer, ids = qwen_tokenizer(opts)
    mrope_section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
    text_config = qwen_text_config(tokenizer, ids, hidden_size=hidden_size, num_llm_layers=num_llm_layers,
                                   head_dim=head_dim, mrope_section=mrope_section, max_window_layers=num_llm_layers)
    text_config.update(text_over)
    vision_config = {
        "depth": vision_depth,
        "hidden_size": vision_hidden_size,
        "intermediate_size": vision_intermediate_size,
        "num_heads": max(1, vision_hidden_size // head_dim),
        "out_hidden_size": text_config["hidden_size"],
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [1],
    }
    vision_config.update(vision_over)
    config = Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, tie_word_embeddings=False,
                              **qwen_token_ids(ids), **top)
    processor = qwen_processor(Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor, tokenizer, opts,
                               14)
    return save_tiny(Qwen2_5_VLForConditionalGeneration, config, processor, tokenizer, out_dir, seed, opts)

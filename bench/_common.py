"""What the bench scripts run on: Qwen2-VL sizes, seeded random models, the one input generator (calibration
batches and correlated layer inputs), and `PartTimer` (seconds per pipeline part)."""

from __future__ import annotations

import time
from typing import Any

import torch

# Qwen2-VL-7B / -72B (Qwen/Qwen2-VL-*-Instruct config.json): the 72B shares the vision tower, its merger
# projects to 8192.
_VISION = {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4, "in_channels": 3, "patch_size": 14,
           "temporal_patch_size": 2, "spatial_merge_size": 2}
_TEXT = {"vocab_size": 152064, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
         "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]}}
QWEN2VL_SIZES = {
    "7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4},
    "72b": {"hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80, "num_attention_heads": 64,
            "num_key_value_heads": 8},
}
QWEN2VL_TOKENS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
                  "vision_end_token_id": 151653, "bos_token_id": 151643, "eos_token_id": 151645}
TEXT_TOKEN_RANGE = 151643  # ids below this are ordinary text tokens
# a picture of 34 x 42 patches of 14 px: 1,428 vision patches, 357 LLM tokens after the 2x2 merge
IMAGE_HW = (476, 588)


def qwen2vl_config(size: str, llm_layers: int | None = None, vision_depth: int | None = None):
    """Qwen2VLConfig of the real 7B / 72B, optionally with fewer LLM layers / vision blocks."""
    from transformers import Qwen2VLConfig

    text = {**_TEXT, **QWEN2VL_SIZES[size]}
    if llm_layers is not None:
        text["num_hidden_layers"] = llm_layers
    text["max_window_layers"] = text["num_hidden_layers"]
    vision = {**_VISION, "hidden_size": text["hidden_size"]}
    if vision_depth is not None:
        vision["depth"] = vision_depth
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **QWEN2VL_TOKENS)


def random_qwen2vl(config, device: str | torch.device, dtype: torch.dtype, seed: int = 0):
    """A Qwen2VLForConditionalGeneration with seeded random weights, built directly on `device` (no hub)."""
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval()


def checksum(model) -> float:
    """A cheap fingerprint of a model's weights (to check that two seeded builds are the same)."""
    total = 0.0
    for i, p in enumerate(model.parameters()):
        if i % 7 == 0:
            total += float(p.detach().float().flatten()[:4096].sum())
    return total


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def patchify(image, patch: int = 14, temporal: int = 2, merge: int = 2) -> torch.Tensor:
    """Qwen2-VL's image processor for an already-sized RGB picture, in plain torch (no torchvision):
    normalized pixels cut into [patches, 3 * temporal * patch * patch] rows in the processor's order."""
    import numpy as np

    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    x = (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    c, h, w = x.shape
    gh, gw = h // patch, w // patch
    x = x[None].expand(temporal, c, h, w)
    x = x.reshape(1, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gh * gw, c * temporal * patch * patch).contiguous()


def synthetic_batches(n: int, seq_len: int = 2048, image_hw: tuple[int, int] = IMAGE_HW, seed: int = 0,
                      text_only_every: int = 0) -> list[dict[str, torch.Tensor]]:
    """Qwen2-VL inputs of `seq_len` tokens: a built-in picture (image processor) plus random text ids.

    The picture is resized to `image_hw` (multiples of 28), so every sample has the same number of vision
    patches; `text_only_every` > 0 makes every k-th sample text only.
    """
    from hf_vlm_gptq.calib import builtin_samples

    h, w = image_hw
    try:  # the real processor needs torchvision; without it, the same computation in torch
        from transformers import Qwen2VLImageProcessor

        processor = Qwen2VLImageProcessor(min_pixels=h * w, max_pixels=h * w, patch_size=14,
                                          temporal_patch_size=2, merge_size=2)
    except ImportError:
        processor = None
    pictures = [s["image"] for s in builtin_samples(max(n, 12), seed=seed, with_video=False) if "image" in s]
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(n):
        text = torch.randint(0, TEXT_TOKEN_RANGE, (seq_len,), generator=gen)
        if text_only_every and (i + 1) % text_only_every == 0:
            ids = text
            batch = {}
        else:
            picture = pictures[i % len(pictures)].resize((w, h))
            if processor is not None:
                out = processor(images=[picture], return_tensors="pt")
            else:
                out = {"pixel_values": patchify(picture), "image_grid_thw": torch.tensor([[1, h // 14, w // 14]])}
            merged = int(out["image_grid_thw"].prod()) // 4
            if merged + 18 > seq_len:
                raise ValueError(f"seq_len={seq_len} leaves no room for text after {merged} image tokens")
            vision = torch.full((merged,), QWEN2VL_TOKENS["image_token_id"])
            start = torch.tensor([QWEN2VL_TOKENS["vision_start_token_id"]])
            end = torch.tensor([QWEN2VL_TOKENS["vision_end_token_id"]])
            ids = torch.cat([text[:16], start, vision, end, text[16:seq_len - merged - 2]])
            batch = {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
        ids = ids[None]
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                        "mm_token_type_ids": (ids == QWEN2VL_TOKENS["image_token_id"]).int(), **batch})
    return batches


def correlated_inputs(n: int, tokens: int, seed: int, device: str = "cpu") -> torch.Tensor:
    """``[tokens, n]`` layer inputs with correlated columns (rank n/8 plus noise) and spread-out scales."""
    g = torch.Generator(device=device).manual_seed(seed)
    kw = {"generator": g, "device": device}
    x = torch.randn(tokens, n // 8, **kw) @ torch.randn(n // 8, n, **kw) / 10
    return (x + 0.3 * torch.randn(tokens, n, **kw)) * torch.exp(0.5 * torch.randn(n, **kw))


def correlated_hessian(n: int, tokens: int, seed: int, device: str = "cpu") -> torch.Tensor:
    """The GPTQ Hessian ``2/tokens X^T X`` of `correlated_inputs`."""
    x = correlated_inputs(n, tokens, seed, device)
    return (2.0 / tokens) * (x.T @ x)


class PartTimer:
    """Start times of our pipeline's parts, from its `ComponentStart` events (hf_vlm_gptq.events)."""

    def __init__(self) -> None:
        self.starts: list[tuple[str, float]] = []

    def __call__(self, event: Any) -> None:
        from hf_vlm_gptq.events import ComponentStart

        if isinstance(event, ComponentStart):
            self.starts.append((event.component, time.perf_counter()))

    def __enter__(self) -> PartTimer:
        from hf_vlm_gptq.events import listen

        self._listening = listen(self)
        self._listening.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._listening.__exit__(*exc)

    def seconds(self, end: float) -> dict[str, float]:
        """{part: seconds}, each part running until the next one starts (the last one until `end`)."""
        ends = [t for _, t in self.starts[1:]] + [end]
        return {name: stop - t for (name, t), stop in zip(self.starts, ends)}

"""Run the model's real processor on calibration samples: one dict of tensors (batch 1) per sample.

Calibration must see exactly what inference sees, so every sample goes through the processor's own chat
template and image / video processors (``processor.apply_chat_template(..., tokenize=True)``) rather than a
hand-made prompt. Videos are passed as already-decoded frames with explicit metadata (frame indices and
fps), which keeps processors from re-sampling frames and lets VideoLLaMA3 print its frame timestamps.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .sources import normalize_sample

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_VIDEO_FPS", "build_model_inputs", "sample_to_messages"]

# Frame rate assumed for clips that do not state one (the same fallback VideoLLaMA3's processor uses).
DEFAULT_VIDEO_FPS = 1.0
_VISION_MARKERS = ("<|vision_start|>", "<|vision_end|>")


def sample_to_messages(sample: dict) -> list[dict]:
    """Chat messages for one normalized sample: a user turn (image, video, text) and the answer if any."""
    if "messages" in sample:
        return [
            {"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
             else [dict(part) for part in m["content"]]}
            for m in sample["messages"]
        ]
    content: list[dict[str, Any]] = []
    if sample.get("image") is not None:
        content.append({"type": "image", "image": sample["image"]})
    if sample.get("video") is not None:
        content.append({"type": "video", "video": sample["video"], "video_fps": sample.get("video_fps")})
    if sample.get("text"):
        content.append({"type": "text", "text": sample["text"]})
    messages = [{"role": "user", "content": content}]
    if sample.get("answer"):
        messages.append({"role": "assistant", "content": [{"type": "text", "text": sample["answer"]}]})
    return messages


def _media_parts(messages: list[dict], kind: str) -> list[dict]:
    return [part for m in messages if not isinstance(m["content"], str) for part in m["content"]
            if part.get("type") == kind]


def _video_metadata(part: dict) -> dict:
    """Metadata of a pre-decoded clip: every frame kept, at the clip's fps (or the default)."""
    frames = part["video"]
    fps = float(part.get("video_fps") or DEFAULT_VIDEO_FPS)
    width, height = frames[0].size
    return {"total_num_frames": len(frames), "fps": fps, "frames_indices": list(range(len(frames))),
            "duration": len(frames) / fps, "width": width, "height": height}


def _placeholder_ids(processor: Any) -> set[int]:
    """Token ids that belong to a vision placeholder (pads and start/end markers): never cut these."""
    tokenizer = processor.tokenizer
    vocab = tokenizer.get_vocab()
    ids = {getattr(processor, name, None) for name in ("image_token_id", "video_token_id")}
    for name in ("image_token", "video_token"):
        token = getattr(processor, name, None)
        if isinstance(token, str) and token in vocab:
            ids.add(vocab[token])
    ids.update(vocab[token] for token in _VISION_MARKERS if token in vocab)
    return {i for i in ids if isinstance(i, int)}


def _truncate(inputs: dict[str, torch.Tensor], index: int, max_seq_len: int,
              protected: set[int]) -> dict[str, torch.Tensor] | None:
    """Cut the per-token tensors to ``max_seq_len`` unless that would cut a vision placeholder (-> None)."""
    input_ids = inputs["input_ids"]
    length = input_ids.shape[-1]
    if length <= max_seq_len:
        return inputs
    tail = input_ids[..., max_seq_len:]
    if protected and torch.isin(tail, torch.tensor(sorted(protected), dtype=tail.dtype)).any():
        logger.warning("calibration sample %d: %d tokens exceed max_seq_len=%d and cutting would split its "
                       "image/video tokens; skipped (raise max_seq_len or use smaller media)",
                       index, length, max_seq_len)
        return None
    logger.info("calibration sample %d: truncated from %d to %d tokens", index, length, max_seq_len)
    shape = input_ids.shape
    return {key: (value[..., :max_seq_len] if value.shape == shape and not key.startswith("pixel_values")
                  else value)
            for key, value in inputs.items()}


def build_model_inputs(samples: list[dict], processor: Any, *, max_seq_len: int = 2048) -> list[dict[str, torch.Tensor]]:
    """Process each sample with ``processor`` (its chat template + image/video processors) for ``model(**x)``.

    Samples may be raw (they are validated with ``normalize_sample``). Text longer than ``max_seq_len``
    tokens is cut only where no vision placeholder is cut, else the sample is skipped with a warning; a
    sample whose media the processor cannot handle (e.g. video without a video processor) is skipped too.
    A processor error is raised as ValueError naming the sample. Returns one dict of tensors per kept sample.
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    protected = _placeholder_ids(processor)
    batches: list[dict[str, torch.Tensor]] = []
    for index, raw in enumerate(samples):
        sample = normalize_sample(raw, index)
        messages = sample_to_messages(sample)
        videos = _media_parts(messages, "video")
        if videos and getattr(processor, "video_processor", None) is None:
            logger.warning("calibration sample %d has a video but the processor has no video processor; skipped",
                           index)
            continue
        if _media_parts(messages, "image") and getattr(processor, "image_processor", None) is None:
            logger.warning("calibration sample %d has an image but the processor has no image processor; "
                           "skipped", index)
            continue
        processor_kwargs: dict[str, Any] = {}
        if videos:
            processor_kwargs["do_sample_frames"] = False
            processor_kwargs["video_metadata"] = [_video_metadata(part) for part in videos]
        for part in videos:
            part.pop("video_fps", None)
        try:
            encoded = processor.apply_chat_template(
                messages,
                add_generation_prompt=messages[-1]["role"] != "assistant",
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                processor_kwargs=processor_kwargs,
            )
        except Exception as err:  # processors raise ValueError, TypeError, RuntimeError, ...
            raise ValueError(f"sample {index}: the processor failed on it: {err}") from err
        inputs = {key: value for key, value in encoded.items() if isinstance(value, torch.Tensor)}
        inputs = _truncate(inputs, index, max_seq_len, protected)
        if inputs is not None:
            batches.append(inputs)
    skipped = len(samples) - len(batches)
    logger.info("built %d calibration inputs%s", len(batches), f" ({skipped} skipped)" if skipped else "")
    return batches

"""Calibration data: the built-in synthetic set, adapters for user data, and the processor step.

Sample schema (the project-wide contract; one ``dict`` per calibration sample)::

    {
        "image":    PIL.Image | np.ndarray [H, W, C] (or [C, H, W], [H, W]) | str path      (optional)
        "video":    list[PIL.Image] | np.ndarray [T, H, W, C] | str path to a video file   (optional)
        "text":     str, the user prompt                                                    (optional)
        "answer":   str, the assistant reply appended as a second turn                      (optional)
        "messages": chat-format list, an alternative to text/image/video                    (optional)
        "video_fps": float, frame rate of "video" (used for frame timestamps)              (optional)
    }

A sample needs at least one of image / video / text / messages, and ``messages`` excludes the others.
``messages`` follows the transformers chat format: ``[{"role": "user" | "assistant" | "system",
"content": str | [{"type": "text", "text": ...}, {"type": "image", "image": ...},
{"type": "video", "video": ...}]}, ...]`` where media take the same forms as above.

Flow: :func:`load_samples` validates and loads the media (PIL images / frames, errors name the sample and
the field), then :func:`build_model_inputs` runs the model's real processor through its chat template and
returns one dict of tensors (batch 1) per sample, ready for ``model(**inputs)``.
"""

from .builtin import builtin_samples
from .processing import build_model_inputs, sample_to_messages
from .sources import decode_video, load_samples, normalize_sample

__all__ = [
    "build_model_inputs",
    "builtin_samples",
    "decode_video",
    "load_samples",
    "normalize_sample",
    "sample_to_messages",
]

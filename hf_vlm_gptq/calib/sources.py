"""Turn whatever calibration data the user gives into validated samples of the project-wide schema.

Accepted: ``None`` (the built-in set), a list (or other iterable) of sample dicts, a ``datasets.Dataset`` /
``IterableDataset`` whose rows are such dicts, or the path of a folder of images. Every image is opened and
every video decoded here, so bad input fails with a ``ValueError`` naming the sample and the field before
any model work starts. See ``hf_vlm_gptq.calib`` for the schema.
"""

from __future__ import annotations

import io
import itertools
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .builtin import builtin_samples

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_IMAGE_PROMPT",
    "DEFAULT_VIDEO_PROMPT",
    "IMAGE_EXTENSIONS",
    "MAX_VIDEO_FRAMES",
    "decode_video",
    "load_samples",
    "normalize_sample",
]

DEFAULT_IMAGE_PROMPT = "Describe the image."
DEFAULT_VIDEO_PROMPT = "Describe the video."
# Longer clips are subsampled uniformly: calibration needs variety, not every frame.
MAX_VIDEO_FRAMES = 16
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_MEDIA_KEYS = ("image", "video", "text", "messages")
_ROLES = ("system", "user", "assistant")


def _array_to_image(array: Any, sixteen_bit: bool = False) -> Image.Image:
    """HxW, HxWxC or CxHxW (C in 1, 3, 4) -> RGB PIL image.

    Values: uint8 (and other integers up to 255) as they are; 16-bit data (uint16, ``sixteen_bit``, or
    integers above 255) scaled from 0..65535 to 0..255; float in [0, 1] (scaled) or [0, 255]; bool as 0 / 255.
    NaN / inf, or integers beyond 16 bits, are errors (never silently black or white)."""
    if hasattr(array, "detach"):  # a torch tensor
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or array.size == 0:
        raise ValueError(f"expected an HxW, HxWxC or CxHxW array with C in (1, 3, 4), got shape {array.shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            kinds = " and ".join(k for k, bad in (("NaN", np.isnan(array).any()), ("inf", np.isinf(array).any()))
                                 if bad)
            raise ValueError(f"the float array holds {kinds} ({int((~finite).sum())} of {array.size} values)")
        scale = 255.0 if array.max(initial=0.0) <= 1.0 else 1.0
        array = np.clip(array * scale, 0, 255).round()
    elif array.dtype.kind in "ui":
        high = int(array.max())
        if sixteen_bit or (array.dtype.kind == "u" and array.dtype.itemsize == 2) or high > 255:
            if high > 65535:
                raise ValueError(f"integer pixel values go up to {high}: expected 0..255 (8-bit) or 0..65535 "
                                 f"(16-bit)")
            array = np.round(np.clip(array, 0, 65535).astype(np.float32) / 257.0)  # 65535 -> 255
    else:
        raise ValueError(f"unsupported array dtype {array.dtype}")
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).convert("RGB")


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of a PIL image; 16-bit and 32-bit modes (which PIL's convert clips to white) are scaled."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        return _array_to_image(np.asarray(image), sixteen_bit=image.mode in _SIXTEEN_BIT_MODES)
    return image.convert("RGB")


def _open_image(source: Any, name: str) -> Image.Image:
    """Open and decode a file / file object with PIL; every failure (a decompression bomb too) is a ValueError."""
    try:
        with Image.open(source) as opened:
            return _pil_to_rgb(opened)
    except Image.DecompressionBombError as err:
        raise ValueError(f"cannot read {name}: {err} (PIL.Image.MAX_IMAGE_PIXELS guards against decompression "
                         f"bombs; downscale the image, or raise that limit if you trust the file)") from err
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {name}: {err}") from err


def _to_image(value: Any) -> Image.Image:
    """PIL image, array, path, or a ``datasets`` image dict ({"bytes", "path"}) -> loaded RGB PIL image."""
    if isinstance(value, Image.Image):
        return _pil_to_rgb(value)
    if isinstance(value, (str, Path)):
        return _open_image(value, f"image '{value}'")
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes") is not None:
            return _open_image(io.BytesIO(value["bytes"]), "image bytes")
        return _to_image(value["path"])
    if isinstance(value, np.ndarray) or hasattr(value, "__array__"):
        return _array_to_image(value)
    raise ValueError(f"expected a PIL image, an array or a path, got {type(value).__name__}")


def decode_video(path: str | Path, max_frames: int = MAX_VIDEO_FRAMES) -> tuple[list[Image.Image], float | None]:
    """Decode a video file with PyAV into at most ``max_frames`` uniformly spaced RGB frames.

    Returns the frames and their effective frame rate (None when the file does not say). Raises ImportError
    when PyAV is missing and ValueError (with the decoder's message) when the file cannot be decoded.
    """
    try:
        import av
    except ImportError as err:
        raise ImportError("decoding video files needs PyAV: pip install av") from err
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            rate = float(stream.average_rate) if stream.average_rate else None
            frames = [frame.to_image().convert("RGB") for frame in container.decode(stream)]
    except ImportError:
        raise
    except Exception as err:  # PyAV raises many error types (FFmpegError, OSError, ...)
        raise ValueError(f"cannot decode video '{path}': {err}") from err
    if not frames:
        raise ValueError(f"cannot decode video '{path}': no frames")
    total = len(frames)
    if total > max_frames:
        keep = np.linspace(0, total - 1, max_frames).round().astype(int)
        frames = [frames[i] for i in keep]
        rate = rate * max_frames / total if rate else None
    return frames, rate


def _to_video(value: Any) -> tuple[list[Image.Image], float | None]:
    """Frames list, [T,H,W,C] / [T,C,H,W] array, or a video file path -> (RGB frames, fps or None)."""
    if isinstance(value, (str, Path)):
        if not Path(value).is_file():
            raise ValueError(f"cannot decode video '{value}': no such file")
        return decode_video(value)
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.ndim != 4:
            raise ValueError(f"expected a [T, H, W, C] array, got shape {value.shape}")
        value = list(value)
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"expected a non-empty list of frames, an array or a path, got {type(value).__name__}")
    frames = []
    for t, frame in enumerate(value):
        try:
            frames.append(_to_image(frame))
        except ValueError as err:
            raise ValueError(f"frame {t}: {err}") from err
    if len({frame.size for frame in frames}) != 1:
        raise ValueError(f"all frames must have the same size, got {sorted({f.size for f in frames})}")
    if len(frames) > MAX_VIDEO_FRAMES:
        keep = np.linspace(0, len(frames) - 1, MAX_VIDEO_FRAMES).round().astype(int)
        frames = [frames[i] for i in keep]
    return frames, None


def _normalize_messages(messages: Any, index: int) -> list[dict]:
    """Validate chat-format messages and load the media they reference."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"sample {index}: field 'messages' must be a non-empty list of chat messages")
    out = []
    for m, message in enumerate(messages):
        where = f"sample {index}: field 'messages'[{m}]"
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise ValueError(f"{where} must be a dict with a 'role' in {_ROLES}")
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": message["role"], "content": content})
            continue
        if not isinstance(content, (list, tuple)):
            raise ValueError(f"{where}: 'content' must be a string or a list of parts")
        parts = []
        for p, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            try:
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                elif kind == "image":
                    source = next((part[k] for k in ("image", "path", "url") if part.get(k) is not None), None)
                    parts.append({"type": "image", "image": _to_image(source)})
                elif kind == "video":
                    source = next((part[k] for k in ("video", "path", "url") if part.get(k) is not None), None)
                    frames, fps = _to_video(source)
                    parts.append({"type": "video", "video": frames, "video_fps": part.get("video_fps", fps)})
                else:
                    raise ValueError("expected a part of type 'text' (with 'text'), 'image' or 'video'")
            except ValueError as err:
                raise ValueError(f"{where} content part {p} ({kind}): {err}") from err
        out.append({"role": message["role"], "content": parts})
    return out


def normalize_sample(sample: Any, index: int) -> dict:
    """Validate one sample and load its media; the result follows the schema with PIL images/frames.

    Idempotent (a normalized sample comes back equal). Raises ValueError naming ``index`` and the field.
    """
    if not isinstance(sample, dict):
        raise ValueError(f"sample {index}: expected a dict, got {type(sample).__name__}")
    present = {key for key in _MEDIA_KEYS if sample.get(key) is not None}
    if not present:
        raise ValueError(f"sample {index}: needs at least one of the fields {', '.join(_MEDIA_KEYS)}; "
                         f"got keys {sorted(sample)}")
    if "messages" in present:
        if present - {"messages"}:
            raise ValueError(f"sample {index}: give either 'messages' or 'text'/'image'/'video', not both")
        return {"messages": _normalize_messages(sample["messages"], index)}
    out: dict[str, Any] = {}
    if "image" in present:
        try:
            out["image"] = _to_image(sample["image"])
        except ValueError as err:
            raise ValueError(f"sample {index}: field 'image': {err}") from err
    if "video" in present:
        try:
            out["video"], fps = _to_video(sample["video"])
        except ValueError as err:
            raise ValueError(f"sample {index}: field 'video': {err}") from err
        fps = sample.get("video_fps", fps)
        if fps is not None:
            out["video_fps"] = float(fps)
    for key in ("text", "answer"):
        value = sample.get(key)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"sample {index}: field '{key}' must be a string, got {type(value).__name__}")
    text = sample.get("text")
    if text is None:
        text = DEFAULT_VIDEO_PROMPT if "video" in out and "image" not in out else DEFAULT_IMAGE_PROMPT
    out["text"] = text
    if sample.get("answer") is not None:
        out["answer"] = sample["answer"]
    return out


def _folder_samples(folder: Path, num_samples: int) -> list[dict]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"dataset folder '{folder}' holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return [{"image": str(path), "text": DEFAULT_IMAGE_PROMPT} for path in files[:num_samples]]


def _read_rows(rows: Iterable) -> list[dict]:
    """Rows of a ``datasets`` dataset as dicts; it decodes images while iterating, so a row that cannot be
    decoded (a corrupt file, a decompression bomb) is a ValueError naming its index."""
    out: list[dict] = []
    iterator = iter(rows)
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            return out
        except Exception as err:  # PIL / datasets raise many kinds (DecompressionBombError is no OSError)
            raise ValueError(f"sample {len(out)}: cannot read this row of the dataset: "
                             f"{type(err).__name__}: {err}") from err
        out.append(dict(row))


def _is_hf_dataset(dataset: Any) -> bool:
    """True for ``datasets.Dataset`` / ``IterableDataset`` without importing ``datasets`` ourselves."""
    return type(dataset).__module__.split(".")[0] == "datasets"


def load_samples(dataset: Any, num_samples: int, seed: int = 0) -> list[dict]:
    """Validate and normalize calibration data into at most ``num_samples`` samples (never cycled).

    ``dataset``: None (built-in synthetic set, seeded by ``seed``), a list/iterable of sample dicts, a
    ``datasets.Dataset`` (columns image/video/text/answer/messages), or a path to a folder of images (sorted
    by name, each paired with :data:`DEFAULT_IMAGE_PROMPT`). Fewer samples than asked is logged, not fatal.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if dataset is None:
        return builtin_samples(num_samples, seed=seed)
    if isinstance(dataset, (str, Path)):
        folder = Path(dataset)
        if not folder.is_dir():
            what = "is a file, not a folder of images" if folder.exists() else (
                "is neither a folder of images nor a dataset this package can fetch by name: calibration runs "
                "images, clips and chat text through the model's processor, not a named text corpus "
                "(GPTQConfig's 'c4' / 'wikitext2')")
            raise ValueError(
                f"dataset={str(dataset)!r} {what}. Accepted: None (the built-in synthetic set: pictures, charts, "
                "text, short clips; no download), a list of sample dicts ({'image': PIL image / array / path, "
                "'video': frames / path, 'text': ..., 'answer': ...} or {'messages': [...]}), a datasets.Dataset "
                "with image / video / text / answer / messages columns (load a hub dataset yourself, e.g. "
                "datasets.load_dataset(...)), or the path of a folder of images.")
        raw = _folder_samples(folder, num_samples)
    elif _is_hf_dataset(dataset):
        columns = getattr(dataset, "column_names", None)
        if columns is not None and not set(columns) & set(_MEDIA_KEYS):
            raise ValueError(f"the datasets.Dataset needs one of the columns {', '.join(_MEDIA_KEYS)}; "
                             f"it has {columns}")
        if hasattr(dataset, "select") and hasattr(dataset, "__len__"):
            raw = _read_rows(dataset.select(range(min(num_samples, len(dataset)))))
        else:
            raw = _read_rows(itertools.islice(iter(dataset), num_samples))
    elif isinstance(dataset, dict):
        raise ValueError("dataset must be a list of sample dicts, not a single dict; wrap it in a list")
    elif isinstance(dataset, Iterable):
        raw = list(itertools.islice(iter(dataset), num_samples))
    else:
        raise ValueError(f"unsupported calibration dataset of type {type(dataset).__name__}: pass None, a list "
                         "of sample dicts, a datasets.Dataset or a folder of images")
    samples = [normalize_sample(sample, index) for index, sample in enumerate(raw)]
    if not samples:
        raise ValueError("the calibration dataset is empty")
    if len(samples) < num_samples:
        logger.warning("calibration data has %d samples, fewer than the %d asked for; using all of them",
                       len(samples), num_samples)
    return samples

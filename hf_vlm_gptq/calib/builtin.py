"""The built-in calibration set: varied synthetic pictures, clips and prompts, drawn on the spot.

GPTQ needs activations that look like real use, and the package must work offline, so instead of
downloading a dataset we draw pictures with PIL/numpy: outdoor scenes (sky and ground gradients, sun,
trees, houses, noise texture), geometric shapes, rendered text, bar and line charts, short clips of moving
shapes, plus some text-only turns. Each is paired with a chat-style prompt and a plausible answer that
matches what was drawn. Sample ``i`` depends only on ``(seed, i)``, so a longer set extends a shorter one.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["MAX_BUILTIN_SAMPLES", "builtin_samples"]

# The set is drawn in memory before calibration (and, in from_pretrained, before the weights load): a few ms
# and ~0.4 MB per sample. Asking for more than this is refused, not drawn for minutes or hours.
MAX_BUILTIN_SAMPLES = 1024

_COLORS = {
    "red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 200), "yellow": (230, 200, 40),
    "orange": (240, 140, 30), "purple": (130, 60, 170), "white": (245, 245, 245), "black": (20, 20, 20),
    "gray": (128, 128, 128), "brown": (120, 80, 40), "pink": (235, 130, 170), "teal": (30, 150, 150),
}
_SIDES = (128, 160, 192, 224, 256)

_SCENE_PROMPTS = ("Describe the image.", "What do you see in this picture?", "Describe the scene in one sentence.",
                  "Is it day or night in this picture?", "What is in the picture besides the sky?")
_SHAPE_PROMPTS = ("How many shapes can you see?", "List the shapes and their colors.", "Describe the image.",
                  "What is the largest shape in the picture?")
_TEXT_PROMPTS = ("What is written here?", "Read the text in the image.", "Transcribe the sign.",
                 "What does the label say?")
_CHART_PROMPTS = ("What trend does the chart show?", "Which bar is the highest?", "Summarize the chart.",
                  "Describe the data in this chart.")
_VIDEO_PROMPTS = ("What happens in the video?", "Describe the motion in this clip.",
                  "Which way does the object move?", "Describe the video.")
_PHRASES = ("OPEN 9 TO 5", "NO PARKING", "Fresh bread daily", "Exit", "Platform 3", "Sale 50% off",
            "Welcome home", "Quiet please", "Room 204", "Keep left", "Coffee & tea", "Library")
_TEXT_ONLY = (
    ("Explain in one sentence why the sky looks blue.",
     "Sunlight is scattered by air molecules, and blue light is scattered much more than red light."),
    ("Give three tips for taking a sharp photo.",
     "Hold the camera steady, focus on the subject, and use a fast shutter speed in good light."),
    ("What is the difference between a bar chart and a line chart?",
     "A bar chart compares separate categories, while a line chart shows how a value changes over time."),
    ("Write a short caption for a picture of a quiet lake at sunset.",
     "Golden light fades over a calm lake as the day comes to an end."),
    ("How many legs do three dogs and two birds have in total?",
     "Three dogs have twelve legs and two birds have four legs, so there are sixteen legs in total."),
    ("Summarize what a video of a ball rolling across a table shows.",
     "A ball starts on one side of the table and rolls steadily to the other side."),
)
# Base rotation of sample kinds; videos are swapped for pictures when with_video=False.
_ROTATION = ("scene", "shapes", "text", "bar", "video", "scene", "line", "text_only", "shapes", "video",
             "text", "scene")


def _font(size: int) -> ImageFont.ImageFont:
    """PIL's bundled default font at ``size`` (bitmap fallback when FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _a(word: str) -> str:
    """``word`` with its indefinite article."""
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _color(rng: np.random.Generator, exclude: tuple[str, ...] = ()) -> tuple[str, tuple[int, int, int]]:
    names = [name for name in _COLORS if name not in exclude]
    name = names[int(rng.integers(len(names)))]
    return name, _COLORS[name]


def _gradient(height: int, width: int, top: tuple, bottom: tuple) -> np.ndarray:
    t = np.linspace(0.0, 1.0, height)[:, None, None]
    rows = (1 - t) * np.asarray(top, np.float32) + t * np.asarray(bottom, np.float32)
    return np.broadcast_to(rows, (height, width, 3)).astype(np.float32)


def _scene(rng: np.random.Generator) -> tuple[Image.Image, str, bool]:
    """Sky/ground gradients with texture noise, optional sun, trees and a house."""
    w, h = int(rng.choice(_SIDES)) * 2, int(rng.choice(_SIDES)) * 2
    night = rng.random() < 0.25
    horizon = int(h * rng.uniform(0.45, 0.7))
    sky_top, sky_low = ((10, 15, 50), (40, 50, 100)) if night else ((60, 120, 220), (170, 210, 250))
    ground_name, ground_top = ("grass", (60, 150, 60)) if rng.random() < 0.6 else ("sand", (200, 180, 120))
    canvas = np.empty((h, w, 3), np.float32)
    canvas[:horizon] = _gradient(horizon, w, sky_top, sky_low)
    canvas[horizon:] = _gradient(h - horizon, w, ground_top, tuple(0.6 * c for c in ground_top))
    canvas[horizon:] += rng.normal(0.0, 12.0, size=(h - horizon, w, 1))
    canvas[:horizon] += rng.normal(0.0, 3.0, size=(horizon, w, 1))
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    parts = []
    r = int(min(w, h) * rng.uniform(0.05, 0.09))
    cx, cy = int(rng.uniform(0.1, 0.9) * w), int(rng.uniform(0.1, 0.3) * h)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(240, 240, 210) if night else (255, 220, 60))
    parts.append("the moon in a dark sky" if night else "the sun in a blue sky")
    n_trees = int(rng.integers(0, 4))
    for _ in range(n_trees):
        tx, th = int(rng.uniform(0.05, 0.95) * w), int(h * rng.uniform(0.12, 0.25))
        base = horizon + int(rng.uniform(0.05, 0.2) * h)
        draw.rectangle((tx - 4, base - th // 2, tx + 4, base), fill=_COLORS["brown"])
        draw.ellipse((tx - th // 3, base - th, tx + th // 3, base - th // 3), fill=(30, 110 + int(rng.integers(60)), 40))
    if n_trees:
        parts.append(f"{n_trees} tree{'s' if n_trees > 1 else ''}")
    if rng.random() < 0.7:
        wall_name, wall = _color(rng, exclude=("black", "green"))
        roof_name, roof = _color(rng, exclude=(wall_name,))
        hw, hh = int(w * rng.uniform(0.18, 0.3)), int(h * rng.uniform(0.15, 0.25))
        hx, base = int(rng.uniform(0.1, 0.6) * w), horizon + int(0.1 * h)
        draw.rectangle((hx, base - hh, hx + hw, base), fill=wall)
        draw.polygon([(hx - 6, base - hh), (hx + hw + 6, base - hh), (hx + hw // 2, base - hh - hh // 2)], fill=roof)
        draw.rectangle((hx + hw // 2 - 6, base - hh // 2, hx + hw // 2 + 6, base), fill=_COLORS["brown"])
        parts.append(f"{_a(wall_name)} house with {_a(roof_name)} roof")
    answer = f"An outdoor scene {'at night' if night else 'in daylight'} with " + ", ".join(parts) + f" above {ground_name}."
    return image, answer, night


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill: tuple) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=fill)


def _shapes(rng: np.random.Generator) -> tuple[Image.Image, str]:
    """A few colored circles, squares and triangles on a plain or noisy background."""
    w, h = int(rng.choice(_SIDES)) * 2, int(rng.choice(_SIDES)) * 2
    bg_name, bg = _color(rng)
    arr = np.full((h, w, 3), bg, np.float32) + rng.normal(0.0, rng.uniform(0, 10), size=(h, w, 1))
    image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    items = []
    for _ in range(int(rng.integers(1, 6))):
        kind = str(rng.choice(["circle", "square", "triangle"]))
        name, fill = _color(rng, exclude=(bg_name,))
        size = int(min(w, h) * rng.uniform(0.1, 0.35))
        x, y = int(rng.integers(0, w - size)), int(rng.integers(0, h - size))
        _draw_shape(draw, kind, (x, y, x + size, y + size), fill)
        items.append(_a(f"{name} {kind}"))
    count = len(items)
    answer = f"There {'is' if count == 1 else 'are'} {count} shape{'s' if count > 1 else ''} on a {bg_name} background: " + ", ".join(items) + "."
    return image, answer


def _text_image(rng: np.random.Generator) -> tuple[Image.Image, str]:
    """A sign or label: a phrase rendered with PIL's default font on a light panel."""
    phrase = str(rng.choice(_PHRASES))
    size = int(rng.integers(18, 40))
    font = _font(size)
    w, h = int(rng.choice(_SIDES)) * 2, int(rng.choice(_SIDES))
    bg = tuple(int(c) for c in rng.integers(200, 256, size=3))
    image = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((0, 0), phrase, font=font)
    x = max(2, int(rng.integers(2, max(3, w - (right - left) - 2))))
    y = max(2, int(rng.integers(2, max(3, h - (bottom - top) - 2))))
    ink_name, ink = _color(rng, exclude=("white", "yellow", "pink", "gray"))
    draw.text((x, y), phrase, fill=ink, font=font)
    return image, f'The text reads "{phrase}", written in {ink_name} letters.'


def _chart(rng: np.random.Generator, kind: str) -> tuple[Image.Image, str]:
    """A bar or line chart with axes; the answer names the trend and the extreme."""
    w, h = int(rng.choice(_SIDES)) * 2, int(rng.choice(_SIDES)) * 2
    n = int(rng.integers(4, 9))
    trend = str(rng.choice(["rising", "falling", "mixed"]))
    base = rng.uniform(2, 10, size=n)
    values = np.sort(base) if trend == "rising" else (np.sort(base)[::-1] if trend == "falling" else base)
    labels = [chr(ord("A") + i) for i in range(n)]
    image = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = _font(12)
    x0, y0, x1, y1 = 30, 15, w - 10, h - 25
    draw.line((x0, y0, x0, y1), fill=(0, 0, 0), width=2)
    draw.line((x0, y1, x1, y1), fill=(0, 0, 0), width=2)
    step = (x1 - x0) / n
    scale = (y1 - y0 - 5) / float(values.max())
    _name, color = _color(rng, exclude=("white", "yellow"))
    points = []
    for i, value in enumerate(values):
        cx = x0 + step * (i + 0.5)
        top = y1 - value * scale
        if kind == "bar":
            draw.rectangle((cx - step * 0.35, top, cx + step * 0.35, y1), fill=color)
        points.append((cx, top))
        draw.text((cx - 3, y1 + 4), labels[i], fill=(0, 0, 0), font=font)
    if kind == "line":
        draw.line(points, fill=color, width=3)
        for px, py in points:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=color)
    top_label = labels[int(np.argmax(values))]
    trend_text = {"rising": "the values rise steadily from left to right",
                  "falling": "the values fall steadily from left to right",
                  "mixed": "the values go up and down without a clear trend"}[trend]
    what = "bar chart" if kind == "bar" else "line chart"
    return image, f"The {what} has {n} points: {trend_text}; the highest value is at {top_label}."


def _video(rng: np.random.Generator) -> tuple[list[Image.Image], str]:
    """4-8 frames of one or two shapes moving over a textured background."""
    n_frames = int(rng.integers(4, 9))
    w, h = int(rng.choice(_SIDES)), int(rng.choice(_SIDES))
    background = _gradient(h, w, tuple(rng.integers(60, 200, size=3)), tuple(rng.integers(60, 200, size=3)))
    background = np.clip(background + rng.normal(0, 6, size=(h, w, 1)), 0, 255).astype(np.uint8)
    movers = []
    for _ in range(int(rng.integers(1, 3))):
        kind = str(rng.choice(["circle", "square", "triangle"]))
        name, fill = _color(rng)
        size = int(min(w, h) * rng.uniform(0.15, 0.3))
        start = rng.uniform(0, 1, size=2) * (w - size, h - size)
        end = rng.uniform(0, 1, size=2) * (w - size, h - size)
        movers.append((kind, name, fill, size, start, end))
    frames = []
    for t in range(n_frames):
        frame = Image.fromarray(background.copy())
        draw = ImageDraw.Draw(frame)
        alpha = t / max(1, n_frames - 1)
        for kind, _name, fill, size, start, end in movers:
            x, y = (1 - alpha) * start + alpha * end
            _draw_shape(draw, kind, (int(x), int(y), int(x) + size, int(y) + size), fill)
        frames.append(frame)
    descriptions = []
    for kind, name, _fill, _size, start, end in movers:
        dx, dy = end - start
        direction = ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
        descriptions.append(f"{_a(name)} {kind} moves {direction}")
    return frames, f"Over {n_frames} frames, " + " and ".join(descriptions) + " while the background stays still."


def _one_sample(seed: int, index: int, kind: str) -> dict:
    rng = np.random.default_rng([seed, index])
    if kind == "text_only":
        prompt, answer = _TEXT_ONLY[int(rng.integers(len(_TEXT_ONLY)))]
        return {"text": prompt, "answer": answer}
    if kind == "video":
        frames, answer = _video(rng)
        return {"video": frames, "text": str(rng.choice(_VIDEO_PROMPTS)), "answer": answer}
    if kind == "scene":
        image, answer, night = _scene(rng)
        prompt = str(rng.choice(_SCENE_PROMPTS))
        if prompt.startswith("Is it day"):
            answer = f"It is {'night' if night else 'day'}. " + answer
        return {"image": image, "text": prompt, "answer": answer}
    elif kind == "shapes":
        image, answer = _shapes(rng)
        prompts = _SHAPE_PROMPTS
    elif kind == "text":
        image, answer = _text_image(rng)
        prompts = _TEXT_PROMPTS
    else:
        image, answer = _chart(rng, kind)
        prompts = _CHART_PROMPTS
    return {"image": image, "text": str(rng.choice(prompts)), "answer": answer}


def builtin_samples(num_samples: int, seed: int = 0, *, with_video: bool = True) -> list[dict]:
    """Generate ``num_samples`` varied calibration samples (see ``hf_vlm_gptq.calib`` for the schema).

    Kinds rotate through scenes, shapes, rendered text, bar/line charts, video clips and text-only turns, so
    every set of 8 or more contains pictures, clips (when ``with_video``) and text-only samples. Images are
    PIL RGB pictures of 128..512 pixels a side; clips are lists of 4-8 PIL frames. Deterministic for a seed.
    At most :data:`MAX_BUILTIN_SAMPLES` samples (ValueError beyond).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"num_samples must be an int >= 0, got {num_samples!r}")
    if num_samples > MAX_BUILTIN_SAMPLES:
        raise ValueError(
            f"num_samples={num_samples} with the built-in calibration set (dataset=None): it is drawn in memory "
            f"before calibration starts, so at most {MAX_BUILTIN_SAMPLES} samples. Ask for fewer (128-512 is "
            f"usual for GPTQ) or pass your own dataset."
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    samples = []
    for index in range(num_samples):
        kind = _ROTATION[index % len(_ROTATION)]
        if kind == "video" and not with_video:
            kind = "line" if (index // len(_ROTATION)) % 2 else "shapes"
        samples.append(_one_sample(seed, index, kind))
    return samples

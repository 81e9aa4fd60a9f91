"""Synthetic question-answering tasks that need every part of a VLM: pictures, clips and text-only turns.

Every item is a calibration-style sample (``image`` / ``video`` / ``text`` / ``answer``, see
``hf_vlm_gptq.calib``) plus ``kind`` ("image", "video", "text": the question type scored) and ``task`` (the
skill). Answers are a word or two, scored by exact match.

* image (only the vision tower sees the answer): ``colour`` of a shape, ``shape`` (circle / square /
  triangle), ``count`` (1-4 shapes), ``position`` (which quadrant), ``letter`` (a large rendered letter);
* video, 4 frames (one frame does not give the answer): ``direction`` a shape moves, ``moved`` (the colour of
  the shape that moves while another stands still), ``appeared`` (the colour of the shape that appears
  halfway);
* text only (the language model alone): ``larger`` of two digits (pairs split between training and
  held-out so the held-out pairs are never trained on), ``second`` word of a list of three colours.

Item ``i`` of a split depends only on ``(split, seed, i)``; "train" and "eval" draw from different streams
(and, for ``larger``, disjoint digit pairs).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["IMAGE_SIZE", "KINDS", "TASKS", "VIDEO_FRAMES", "VIDEO_SIZE", "task_samples"]

IMAGE_SIZE = 56  # pictures: 4x4 patches of 14, a 2x2 grid of 28-pixel cells (one Qwen2-VL merged token each)
VIDEO_SIZE = 56  # clip frames: the same size
VIDEO_FRAMES = 4

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (235, 215, 40),
           "white": (240, 240, 240), "purple": (160, 60, 200)}
SHAPES = ("circle", "square", "triangle")
LETTERS = ("A", "E", "H", "K", "O", "T")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
DIRECTIONS = ("left", "right", "up", "down")

TASKS: dict[str, tuple[str, ...]] = {
    "image": ("colour", "shape", "count", "position", "letter"),
    "video": ("direction", "moved", "appeared"),
    "text": ("larger", "second"),
}
KINDS = tuple(TASKS)

_QUESTIONS = {
    "colour": "What color is the shape?",
    "shape": "What shape is it?",
    "count": "How many shapes are there?",
    "position": "Where is the shape?",
    "letter": "What letter is written?",
    "direction": "Which way does the shape move?",
    "moved": "What color is the shape that moves?",
    "appeared": "What color is the shape that appears?",
}
_SPLIT_STREAM = {"train": 1, "eval": 2}


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # no FreeType: the small bitmap font
        return ImageFont.load_default()


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A dark, slightly noisy background [size, size, 3] (uint8) with gray landmark bars along the top and
    left edges: the vision tower has no absolute position embedding, so the bars are what tells a patch
    where in the picture it is."""
    base = rng.integers(10, 50)
    noise = rng.normal(0.0, 4.0, size=(size, size, 1))
    canvas = np.clip(base + noise, 0, 255)
    canvas[:2, :] = 140
    canvas[:, :2] = 140
    return canvas.astype(np.uint8).repeat(3, axis=2)


def _draw(draw: ImageDraw.ImageDraw, kind: str, x: float, y: float, size: float, fill: tuple) -> None:
    x0, y0, x1, y1 = int(x), int(y), int(x + size), int(y + size)
    if kind == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif kind == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=fill)


def _pick(rng: np.random.Generator, options, exclude=()) -> str:
    left = [o for o in options if o not in exclude]
    return left[int(rng.integers(len(left)))]


def _cells(rng: np.random.Generator, n: int, grid: int) -> list[tuple[int, int]]:
    """``n`` distinct cells (column, row) of a ``grid`` x ``grid`` layout."""
    return [(int(c) % grid, int(c) // grid) for c in rng.permutation(grid * grid)[:n]]


def _image_item(rng: np.random.Generator, task: str) -> tuple[Image.Image, str]:
    """Objects sit in the cells of a 2x2 grid of 28-pixel cells (one Qwen merged token each, 2x2 patches), so
    the answer is carried by a few vision tokens."""
    s, cell = IMAGE_SIZE, IMAGE_SIZE // 2
    image = Image.fromarray(_background(rng, s))
    draw = ImageDraw.Draw(image)

    def put(col: int, row: int, kind: str, colour: str) -> None:
        size = 20 + rng.uniform(-1, 1)
        x = col * cell + (cell - size) / 2 + rng.uniform(-1, 1)
        y = row * cell + (cell - size) / 2 + rng.uniform(-1, 1)
        _draw(draw, kind, x, y, size, COLOURS[colour])

    if task in ("colour", "shape", "position"):
        colour, shape = _pick(rng, COLOURS), _pick(rng, SHAPES)
        ((col, row),) = _cells(rng, 1, 2)
        put(col, row, shape, colour)
        answer = {"colour": colour, "shape": shape, "position": QUADRANTS[2 * row + col]}[task]
        return image, answer
    if task == "count":
        n = int(rng.integers(1, 5))
        for col, row in _cells(rng, n, 2):
            put(col, row, _pick(rng, SHAPES), _pick(rng, COLOURS))
        return image, str(n)
    if task == "letter":
        letter = _pick(rng, LETTERS)
        font = _font(26)
        ((col, row),) = _cells(rng, 1, 2)
        left, top, right, bottom = draw.textbbox((0, 0), letter, font=font)
        x = col * cell + (cell - (right - left)) / 2 - left + rng.uniform(-1, 1)
        y = row * cell + (cell - (bottom - top)) / 2 - top + rng.uniform(-1, 1)
        draw.text((x, y), letter, fill=COLOURS["white"], font=font)
        return image, letter
    raise ValueError(f"unknown image task {task!r}")


def _video_item(rng: np.random.Generator, task: str) -> tuple[list[Image.Image], str]:
    s, n = VIDEO_SIZE, VIDEO_FRAMES
    background = _background(rng, s)
    # movers: (shape, colour, size, start xy, step xy, first frame shown)
    movers = []
    if task == "direction":
        d = int(rng.integers(4))
        size = rng.uniform(14, 18)
        step = 10.0
        span = step * (n - 1)
        lo, hi = 2.0, s - size - 2
        start = rng.uniform(lo, hi, size=2)
        axis, sign = (0, -1) if d == 0 else (0, 1) if d == 1 else (1, -1) if d == 2 else (1, 1)
        start[axis] = rng.uniform(lo + span, hi) if sign < 0 else rng.uniform(lo, hi - span)
        delta = np.zeros(2)
        delta[axis] = sign * step
        movers.append((_pick(rng, SHAPES), COLOURS[_pick(rng, COLOURS)], size, start, delta, 0))
        answer = DIRECTIONS[d]
    elif task in ("moved", "appeared"):
        first = _pick(rng, COLOURS)
        second = _pick(rng, COLOURS, exclude=(first,))
        size = rng.uniform(13, 16)
        # the two shapes live in opposite halves (left / right or top / bottom) so they never overlap
        vertical = bool(rng.integers(2))
        flip = bool(rng.integers(2))
        half = s / 2
        spots = []
        for k in range(2):
            side = k ^ int(flip)
            along = rng.uniform(2, s - size - 2)
            across = side * half + rng.uniform(2, half - size - 2)
            spots.append(np.array([along, across]) if vertical else np.array([across, along]))
        if task == "moved":
            free = 0 if vertical else 1  # the axis along the halves: the moving shape stays in its own half
            delta = np.zeros(2)
            delta[free] = 7.0 if spots[0][free] < (s - size) / 2 else -7.0
            movers.append((_pick(rng, SHAPES), COLOURS[first], size, spots[0], delta, 0))
            movers.append((_pick(rng, SHAPES), COLOURS[second], size, spots[1], np.zeros(2), 0))
            answer = first
        else:
            movers.append((_pick(rng, SHAPES), COLOURS[first], size, spots[0], np.zeros(2), 0))
            movers.append((_pick(rng, SHAPES), COLOURS[second], size, spots[1], np.zeros(2), n // 2))
            answer = second
    else:
        raise ValueError(f"unknown video task {task!r}")
    frames = []
    for t in range(n):
        frame = Image.fromarray(background.copy())
        draw = ImageDraw.Draw(frame)
        for shape, fill, size, start, delta, shown in movers:
            if t >= shown:
                x, y = start + t * delta
                _draw(draw, shape, x, y, size, fill)
        frames.append(frame)
    return frames, answer


def _larger_pairs(split: str) -> list[tuple[int, int]]:
    """Ordered pairs of distinct digits; every fifth pair (a fixed pattern) is held out for "eval"."""
    pairs = [(a, b) for a in range(10) for b in range(10) if a != b]
    held = [p for p in pairs if (3 * p[0] + 7 * p[1]) % 5 == 0]
    return held if split == "eval" else [p for p in pairs if p not in held]


def _text_item(rng: np.random.Generator, task: str, split: str) -> tuple[str, str]:
    if task == "larger":
        pairs = _larger_pairs(split)
        a, b = pairs[int(rng.integers(len(pairs)))]
        return f"Which is larger, {a} or {b}?", str(max(a, b))
    if task == "second":
        words = [str(w) for w in rng.choice(list(COLOURS), size=3, replace=False)]
        return f"Say the second word: {' '.join(words)}", words[1]
    raise ValueError(f"unknown text task {task!r}")


def task_samples(n: int, split: str = "train", seed: int = 0, kinds: tuple[str, ...] = KINDS,
                 start: int = 0) -> list[dict]:
    """Items ``start .. start + n - 1`` of ``split`` ("train" or "eval"), rotating through every task of ``kinds``.

    Each item: ``kind``, ``task``, ``answer`` and the media / prompt (``image`` PIL picture, ``video`` list of
    PIL frames with ``video_fps``, ``text`` the question). Deterministic for ``(n, split, seed)``; a longer
    list extends a shorter one.
    """
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be >= 0, got n={n}, start={start}")
    if split not in _SPLIT_STREAM:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    unknown = set(kinds) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown kinds {sorted(unknown)}; kinds are {list(TASKS)}")
    rotation = [(kind, task) for kind in kinds for task in TASKS[kind]]
    items = []
    for i in range(start, start + n):
        kind, task = rotation[i % len(rotation)]
        rng = np.random.default_rng([seed, _SPLIT_STREAM[split], i])
        item: dict = {"kind": kind, "task": task}
        if kind == "image":
            item["image"], item["answer"] = _image_item(rng, task)
            item["text"] = _QUESTIONS[task]
        elif kind == "video":
            item["video"], item["answer"] = _video_item(rng, task)
            item["video_fps"] = 1.0
            item["text"] = _QUESTIONS[task]
        else:
            item["text"], item["answer"] = _text_item(rng, task, split)
        items.append(item)
    return items

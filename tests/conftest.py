"""Shared fixtures: tiny offline checkpoints (built once per session) and a small built-in sample set.

Imports of the package happen inside the fixtures so that collecting unrelated tests never depends on them.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def tiny_qwen2vl_dir(tmp_path_factory):
    """A tiny native qwen2_vl checkpoint dir (model, tokenizer, real Qwen2-VL processors), seed 0."""
    from hf_vlm_gptq.testing import build_tiny_qwen2vl

    return build_tiny_qwen2vl(tmp_path_factory.mktemp("tiny_qwen2vl"), seed=0)


@pytest.fixture(scope="session")
def tiny_videollama3_dir(tmp_path_factory):
    """A tiny native video_llama_3 checkpoint dir (model, tokenizer, real VideoLLaMA3 processors), seed 0."""
    from hf_vlm_gptq.testing import build_tiny_videollama3

    return build_tiny_videollama3(tmp_path_factory.mktemp("tiny_videollama3"), seed=0)


@pytest.fixture(scope="session")
def builtin_samples_small():
    """Twelve built-in calibration samples (seed 0): pictures of every kind, two clips, one text-only turn.

    Shared by the session: treat as read-only.
    """
    from hf_vlm_gptq.calib import builtin_samples

    return builtin_samples(12, seed=0)


def _write_video(path, frames, fps: int = 4):
    """Encode RGB uint8 frames [H, W, 3] into a video file with PyAV (skips the test when PyAV is missing)."""
    av = pytest.importorskip("av")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="session")
def video_file(tmp_path_factory):
    """A 6-frame 64x48 mp4 clip (a square moving right at 4 fps) written with PyAV."""
    import numpy as np

    frames = []
    for t in range(6):
        frame = np.full((48, 64, 3), 40, np.uint8)
        frame[10:26, 4 + 6 * t: 20 + 6 * t] = (230, 200, 40)
        frames.append(frame)
    return _write_video(tmp_path_factory.mktemp("video") / "clip.mp4", frames)


# The suite's kernel choices come from the fixed table (deterministic on every host); tests of the measured
# CPU dispatch set HF_VLM_GPTQ_DISPATCH themselves. `HF_VLM_GPTQ_DISPATCH=measure pytest ...` runs it measured.
os.environ.setdefault("HF_VLM_GPTQ_DISPATCH", "table")
# The adaptive CPU thread policy (threads.py) switches between 1 and 2 threads as the host's load changes,
# and torch's reductions round differently at different thread counts: tests that compare two runs exactly
# (records, state dicts, block inputs) need one thread count, so the suite runs with the policy off;
# tests/test_threads.py switches it on for its own tests.
os.environ.setdefault("HF_VLM_GPTQ_ADAPTIVE_THREADS", "0")

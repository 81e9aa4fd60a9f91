"""Shared fixtures: tiny offline checkpoints (built once per session) and a small built-in sample set.

Imports of the package happen inside the fixtures so that collecting unrelated tests never depends on them.
"""

from __future__ import annotations

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

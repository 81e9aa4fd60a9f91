"""Fixtures of the fault tests: one tiny packed Qwen2-VL checkpoint saved through the public API (built once
per session; tests copy it before breaking anything)."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def packed_qwen2vl_dir(tiny_qwen2vl_dir, tmp_path_factory):
    """A packed checkpoint of the tiny Qwen2-VL (RTN, 4-bit, g32, split vision fc2) with its processor.

    Read-only: copy it (`packed_copy`) before editing.
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from hf_vlm_gptq import VLMGPTQConfig

    cfg = VLMGPTQConfig(num_samples=2, w_groupsize=32, visual_w_rtn=True, llm_w_rtn=True, visual_split=True)
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2vl_dir, quantization_config=cfg,
                                                        dtype=torch.float32)
    out = tmp_path_factory.mktemp("packed") / "tiny-qwen2vl-w4"
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(tiny_qwen2vl_dir).save_pretrained(out)
    return out


@pytest.fixture
def packed_copy(packed_qwen2vl_dir, tmp_path):
    """A private copy of the packed checkpoint, free to break."""
    return shutil.copytree(packed_qwen2vl_dir, tmp_path / "ckpt")

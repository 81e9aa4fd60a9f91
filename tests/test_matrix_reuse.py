"""The pipeline's blocks reuse the Hessians and solve matrices of the block before (ops/scratch.py), and the
checkpoint comes out bit for bit as from fresh matrices."""

from __future__ import annotations

import logging
import re

import pytest
import torch


@pytest.fixture(scope="module")
def wide_qwen2vl_dir(tmp_path_factory):
    """LLM layers 512 wide (their Hessians are 1 MiB: the smallest the pool keeps), two of them."""
    from hf_vlm_gptq.testing import build_tiny_qwen2vl

    return build_tiny_qwen2vl(tmp_path_factory.mktemp("wide_qwen2vl"), seed=0, hidden_size=512, head_dim=64,
                              text_config={"intermediate_size": 1024})


def _quantized_llm(path, samples, gptaq: bool) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForImageTextToText

    from hf_vlm_gptq import VLMGPTQConfig
    from hf_vlm_gptq.api import quantize

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    config = VLMGPTQConfig(dataset=samples, num_samples=6, w_groupsize=128, calibration_device="cpu",
                           quant_visual_clip=False, quant_cross_attention=False, gptaq=gptaq)
    quantize(model, config, progress=False)
    return {k: v.clone() for k, v in model.state_dict().items() if "language_model" in k}


@pytest.mark.parametrize("gptaq", [False, True])
def test_reused_matrices_give_the_checkpoint_of_fresh_ones(wide_qwen2vl_dir, builtin_samples_small, gptaq,
                                                           monkeypatch, caplog):
    from hf_vlm_gptq.ops.scratch import MatrixPool

    monkeypatch.setenv("HF_VLM_GPTQ_ADAPTIVE_THREADS", "0")  # bitwise-repeatable runs: one thread policy
    with caplog.at_level(logging.DEBUG, logger="hf_vlm_gptq"):
        reused = _quantized_llm(wide_qwen2vl_dir, builtin_samples_small, gptaq)
    counts = [re.search(r"llm: (\d+) of (\d+) work matrices reused", r.getMessage()) for r in caplog.records]
    (taken,) = [m for m in counts if m]
    assert int(taken.group(1)) > 0  # the second block ran on the first one's matrices
    monkeypatch.setattr(MatrixPool, "give", lambda self, *tensors: None)  # every matrix fresh
    fresh = _quantized_llm(wide_qwen2vl_dir, builtin_samples_small, gptaq)
    assert fresh.keys() == reused.keys() and any("qweight" in k for k in fresh)
    for key in fresh:
        assert torch.equal(fresh[key], reused[key]), key

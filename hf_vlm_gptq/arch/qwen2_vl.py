"""Qwen2-VL (transformers' native `Qwen2VLForConditionalGeneration`, model_type `qwen2_vl`)."""

from ._qwen import (
    QWEN_SAVED_PREFIXES,
    qwen_llm_component,
    qwen_merger_component,
    qwen_vision_component,
    qwen_vllm,
)
from .spec import ArchSpec

ARCH = ArchSpec(
    name="qwen2_vl",
    display_name="Qwen2-VL",
    model_types=("qwen2_vl",),
    tiny_builder="hf_vlm_gptq.testing.tiny_models:build_tiny_qwen2vl",
    saved_prefixes=QWEN_SAVED_PREFIXES,
    components=(
        qwen_vision_component((("attn.qkv",), ("attn.proj",), ("mlp.fc1",), ("mlp.fc2",)), "mlp.fc2"),
        qwen_merger_component((("mlp.0",), ("mlp.2",))),
        qwen_llm_component(("model.language_model.layers", "model.layers")),
    ),
    vllm=qwen_vllm("Qwen2VLForConditionalGeneration"),
)

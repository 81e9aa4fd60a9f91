"""Qwen2.5-VL (transformers' native `Qwen2_5_VLForConditionalGeneration`, model_type `qwen2_5_vl`).

The vision tower runs window attention except in the blocks of `fullatt_block_indexes`, which take the
image-wide `cu_seqlens`: each block keeps its own caught arguments. Its MLP is gated (gate/up share one
input and one Hessian); vLLM fuses them as `gate_up_proj` in the vision tower too.
"""

from ._qwen import (
    QWEN_SAVED_PREFIXES,
    qwen_llm_component,
    qwen_merger_component,
    qwen_vision_component,
    qwen_vllm,
)
from .spec import ArchSpec

ARCH = ArchSpec(
    name="qwen2_5_vl",
    display_name="Qwen2.5-VL",
    model_types=("qwen2_5_vl",),
    tiny_builder="hf_vlm_gptq.testing.tiny_qwen2_5_vl:build_tiny_qwen2_5_vl",
    saved_prefixes=QWEN_SAVED_PREFIXES,
    components=(
        qwen_vision_component((("attn.qkv",), ("attn.proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
                              "mlp.down_proj", per_block_kwargs=True),
        qwen_merger_component((("mlp.0",), ("mlp.2",))),
        qwen_llm_component(("model.language_model.layers", "model.layers")),
    ),
    # vllm/model_executor/models/qwen2_5_vl.py (0.32 / 0.33): packed_modules_mapping fuses gate/up by leaf name
    # everywhere, so the vision MLP is visual.blocks.N.mlp.gate_up_proj there.
    vllm=qwen_vllm("Qwen2_5_VLForConditionalGeneration",
                   vision_fused=(("visual.", "gate_up_proj", ("gate_proj", "up_proj")),)),
)

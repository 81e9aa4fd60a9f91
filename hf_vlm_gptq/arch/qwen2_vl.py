"""Qwen2-VL (transformers' native `Qwen2VLForConditionalGeneration`, model_type `qwen2_vl`)."""

from ._qwen import QWEN_SAVED_PREFIXES, qwen_llm_component, qwen_vllm
from .spec import ArchSpec, ComponentSpec

ARCH = ArchSpec(
    name="qwen2_vl",
    display_name="Qwen2-VL",
    model_types=("qwen2_vl",),
    tiny_builder="hf_vlm_gptq.testing.tiny_models:build_tiny_qwen2vl",
    saved_prefixes=QWEN_SAVED_PREFIXES,
    components=(
        ComponentSpec(
            name="vision",
            flag="quant_visual_clip",
            part="visual",
            stem=("model.visual.patch_embed.proj", "visual.patch_embed.proj"),
            blocks=("model.visual.blocks", "visual.blocks"),
            sequential=(("attn.qkv",), ("attn.proj",), ("mlp.fc1",), ("mlp.fc2",)),
            split_target="mlp.fc2",
            calls_per_media=True,
        ),
        ComponentSpec(
            name="merger",
            flag="quant_cross_attention",
            part="visual",
            blocks=("model.visual.merger", "visual.merger"),
            single=True,
            calls_per_media=True,
            sequential=(("mlp.0",), ("mlp.2",)),
        ),
        qwen_llm_component(("model.language_model.layers", "model.layers")),
    ),
    vllm=qwen_vllm("Qwen2VLForConditionalGeneration"),
)

"""Qwen2-VL (transformers' native `Qwen2VLForConditionalGeneration`, model_type `qwen2_vl`)."""

from .qwen2_llm import qwen2_llm_component
from .spec import ArchSpec, ComponentSpec

QWEN2_VL = ArchSpec(
    name="qwen2_vl",
    model_types=("qwen2_vl",),
    # transformers 5.x saves Qwen2-VL as model.layers.N.* / visual.* and maps the keys back on load.
    saved_prefixes=(("model.language_model.", "model."), ("model.visual.", "visual.")),
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
        qwen2_llm_component(("model.language_model.layers", "model.layers")),
    ),
)

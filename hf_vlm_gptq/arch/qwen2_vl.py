"""Qwen2-VL (transformers' native `Qwen2VLForConditionalGeneration`, model_type `qwen2_vl`)."""

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
        ComponentSpec(
            name="llm",
            flag="quant_llm",
            part="llm",
            blocks=("model.language_model.layers", "model.layers"),
            sequential=(
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                ("self_attn.o_proj",),
                ("mlp.up_proj", "mlp.gate_proj"),
                ("mlp.down_proj",),
            ),
            split_target="mlp.down_proj",
        ),
    ),
)

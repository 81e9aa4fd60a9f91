"""Pieces shared by the Qwen-based definitions: the Qwen2 / Qwen3 decoder layer and vLLM's Qwen naming."""

from .spec import ComponentSpec, VllmLayout


def qwen_vision_component(sequential: tuple[tuple[str, ...], ...], split_target: str, **kwargs) -> ComponentSpec:
    """The `quant_visual_clip` component of a Qwen VL vision tower: the Conv3d stem, then `visual.blocks`."""
    return ComponentSpec(
        name="vision",
        flag="quant_visual_clip",
        part="visual",
        stem=("model.visual.patch_embed.proj", "visual.patch_embed.proj"),
        blocks=("model.visual.blocks", "visual.blocks"),
        sequential=sequential,
        split_target=split_target,
        calls_per_media=True,
        **kwargs,
    )


def qwen_merger_component(sequential: tuple[tuple[str, ...], ...], name: str = "merger", module: str = "merger",
                          **kwargs) -> ComponentSpec:
    """A `quant_cross_attention` bridge under `visual.` (one module, or a list with `single=False`); the one
    merger is called on the last vision block's outputs, so it takes them from the vision component."""
    kwargs.setdefault("single", True)
    if kwargs["single"]:
        kwargs.setdefault("inputs_from", "vision")
    return ComponentSpec(
        name=name,
        flag="quant_cross_attention",
        part="visual",
        blocks=(f"model.visual.{module}", f"visual.{module}"),
        calls_per_media=True,
        sequential=sequential,
        **kwargs,
    )


def qwen_llm_component(blocks: tuple[str, ...], **kwargs) -> ComponentSpec:
    """The `quant_llm` component for a Qwen2 / Qwen3 decoder stack found at one of `blocks` (Qwen3's
    q_norm / k_norm sit between the projections and the attention and need nothing here)."""
    return ComponentSpec(
        name="llm",
        flag="quant_llm",
        part="llm",
        blocks=blocks,
        sequential=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.o_proj",),
            ("mlp.up_proj", "mlp.gate_proj"),
            ("mlp.down_proj",),
        ),
        split_target="mlp.down_proj",
        **kwargs,
    )


# transformers 5.x saves the Qwen VL models as model.layers.N.* / visual.* and maps the keys back on load.
QWEN_SAVED_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))

# vLLM's Qwen2VL / Qwen2_5_VL ForConditionalGeneration.hf_to_vllm_mapper (orig_to_new_prefix), in its order
# (vllm/model_executor/models/qwen2_vl.py, qwen2_5_vl.py; the same in 0.32 and 0.33).
QWEN_VLLM_PREFIXES = (("model.language_model.", "language_model.model."), ("model.visual.", "visual."),
                      ("lm_head.", "language_model.lm_head."), ("model.", "language_model.model."))

# Qwen2ForCausalLM / Qwen3ForCausalLM packed_modules_mapping, applied to the language model.
QWEN_LLM_FUSED = (("language_model.", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
                  ("language_model.", "gate_up_proj", ("gate_proj", "up_proj")))


def qwen_vllm(model_class: str, *, prefixes: tuple[tuple[str, str], ...] = QWEN_VLLM_PREFIXES,
              vision_fused: tuple = (), dense: tuple[str, ...] = ()) -> VllmLayout:
    """vLLM's layout of a Qwen VL model: the LLM's fused q/k/v and gate/up, plus `vision_fused`. The patch
    embedding is a dense Conv3dLayer in vLLM (written dense by the export for every conv)."""
    return VllmLayout(model_class=model_class, prefixes=prefixes, fused=QWEN_LLM_FUSED + vision_fused, dense=dense)

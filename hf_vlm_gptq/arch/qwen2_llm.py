"""The Qwen2 language model shared by Qwen2-VL and VideoLLaMA3: one decoder layer's linears in solve order."""

from .spec import ComponentSpec


def qwen2_llm_component(blocks: tuple[str, ...]) -> ComponentSpec:
    """The `quant_llm` component for a Qwen2 decoder stack found at one of `blocks`."""
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
    )

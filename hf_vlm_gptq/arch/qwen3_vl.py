"""Qwen3-VL (transformers' native `Qwen3VLForConditionalGeneration`, model_type `qwen3_vl`).

DeepStack: after the vision blocks of `deepstack_visual_indexes`, the hidden states also go through one
`deepstack_merger_list` merger each, and those features are added to the hidden states after the first
LLM layers. So the DeepStack mergers are independent modules (each caught from a real forward pass), and
the inputs of LLM layers 1..len(deepstack_visual_indexes) are caught again from a real forward pass of the
partly quantized model (the chain would miss the added features).
"""

from ._qwen import qwen_llm_component, qwen_merger_component, qwen_vision_component, qwen_vllm
from .spec import ArchSpec

_MERGER_LINEARS = (("linear_fc1",), ("linear_fc2",))


def _after_deepstack(config) -> range:
    """LLM layers whose input has DeepStack features added (layer i's output gets feature i)."""
    return range(1, len(config.vision_config.deepstack_visual_indexes) + 1)


ARCH = ArchSpec(
    name="qwen3_vl",
    display_name="Qwen3-VL",
    model_types=("qwen3_vl",),
    tiny_builder="hf_vlm_gptq.testing.tiny_qwen3_vl:build_tiny_qwen3_vl",
    # saved as model.language_model.* / model.visual.* (no legacy layout)
    components=(
        qwen_vision_component((("attn.qkv",), ("attn.proj",), ("mlp.linear_fc1",), ("mlp.linear_fc2",)),
                              "mlp.linear_fc2"),
        qwen_merger_component(_MERGER_LINEARS),
        qwen_merger_component(_MERGER_LINEARS, name="deepstack", module="deepstack_merger_list", single=False,
                              chained=False),
        qwen_llm_component(("model.language_model.layers", "model.layers"), fresh_inputs=_after_deepstack),
    ),
    # vllm/model_executor/models/qwen3_vl.py (0.32 / 0.33): no legacy "model." rule; its packed_modules_mapping
    # names gate_proj / up_proj, which the vision MLP (linear_fc1 / linear_fc2) does not have.
    vllm=qwen_vllm("Qwen3VLForConditionalGeneration",
                   prefixes=(("model.visual.", "visual."), ("lm_head.", "language_model.lm_head."),
                             ("model.language_model.", "language_model.model."))),
)

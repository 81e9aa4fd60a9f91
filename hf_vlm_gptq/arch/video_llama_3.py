"""VideoLLaMA3 (transformers' native `VideoLlama3ForConditionalGeneration`, model_type `video_llama_3`).

Remote-code checkpoints name the parts `vision_encoder` / `mm_projector`; those paths are listed second.
"""

from ._qwen import qwen_llm_component
from .spec import ArchSpec, ComponentSpec

ARCH = ArchSpec(
    name="video_llama_3",
    display_name="VideoLLaMA3",
    tiny_builder="hf_vlm_gptq.testing.tiny_models:build_tiny_videollama3",
    vllm_missing="vLLM (checked 0.32) has no model class for it",
    model_types=("video_llama_3",),
    components=(
        ComponentSpec(
            name="vision",
            flag="quant_visual_clip",
            part="visual",
            stem=("model.vision_model.embeddings.patch_embedding",
                  "model.vision_encoder.embeddings.patch_embedding"),
            blocks=("model.vision_model.encoder.layers", "model.vision_encoder.encoder.layers"),
            sequential=(
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                ("self_attn.out_proj",),
                ("mlp.fc1",),
                ("mlp.fc2",),
            ),
            split_target="mlp.fc2",
            calls_per_media=True,
        ),
        ComponentSpec(
            name="projector",
            flag="quant_visual_projector",
            part="visual",
            blocks=("model.projector", "model.mm_projector"),
            single=True,
            calls_per_media=True,
            sequential=(("readout.0",), ("readout.2",)),
        ),
        qwen_llm_component(("model.language_model.layers", "model.model.layers")),
    ),
)

"""Architecture registry: model_type -> ArchSpec. Adding a model family is adding a small data file."""

from __future__ import annotations

from .qwen2_vl import QWEN2_VL
from .spec import ArchSpec, ComponentSpec, find_module
from .video_llama_3 import VIDEO_LLAMA_3

ARCHITECTURES: tuple[ArchSpec, ...] = (QWEN2_VL, VIDEO_LLAMA_3)


def supported_model_types() -> list[str]:
    return sorted(t for spec in ARCHITECTURES for t in spec.model_types)


def spec_for_model_type(model_type: str) -> ArchSpec:
    """The ArchSpec for `model_type`, or a ValueError listing the supported ones."""
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    raise ValueError(
        f"hf_vlm_gptq has no handler for model_type {model_type!r}; supported: "
        f"{', '.join(supported_model_types())}."
    )


__all__ = ["ARCHITECTURES", "ArchSpec", "ComponentSpec", "find_module", "spec_for_model_type",
           "supported_model_types"]

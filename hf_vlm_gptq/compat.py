"""The research code's function-level API, as thin wrappers over the same pipeline.

For people coming from `fake_quant.gptq.qwen2vl_gptq_plus` / `videollama3_gptq_plus`: the same names and
arguments `(model, dataset, dev, dataset_name, args)`, with `args` an argparse-style namespace carrying the
research code's flag names. They return the dict of per-module records keyed by module path (the
research code's "quantizers" dict). Unlike the research code, the modules are really packed (not
simulated), and `model.save_pretrained` then writes a loadable low-bit checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any

from .api import quantize
from .arch import spec_for_model_type
from .config import VLMGPTQConfig
from .config_fields import RESEARCH_NAMES
from .report import QuantRecord

logger = logging.getLogger(__name__)

# Options the research code did not have, set to its algorithm: its entry points reproduce its results
# (really packed) unless the namespace or the call names them. This release's defaults for the same options
# (GPTAQ, the 16-level grid, won on task accuracy: README "Quality") apply to from_pretrained / api.quantize.
RESEARCH_ALGORITHM = {"gptaq": False, "sym_full_range": False, "group_order": False, "hessian_weighting": "none"}
# the research code's flag names (config_fields.RESEARCH_NAMES: nsamples, seqlen, ...), our names of them, and
# the newer options above (a namespace may set them)
_ACCEPTED = {**{field: field for field in RESEARCH_NAMES.values()}, **RESEARCH_NAMES,
             **{field: field for field in RESEARCH_ALGORITHM}}


def config_from_args(args: Any, dev: Any = None, **overrides: Any) -> VLMGPTQConfig:
    """A VLMGPTQConfig from an argparse-style namespace (unknown attributes are ignored), with the research
    code's algorithm for the options it did not have (`RESEARCH_ALGORITHM`)."""
    values: dict[str, Any] = dict(RESEARCH_ALGORITHM)
    for name, value in vars(args).items() if args is not None else ():
        if name in _ACCEPTED:
            values[_ACCEPTED[name]] = value
        elif name == "w_asym":
            values["sym"] = not value
    if dev is not None:
        values["calibration_device"] = str(dev)
    values.update(overrides)
    return VLMGPTQConfig(**values)


# model_type -> the research code's whole-model entry point for that family (it had these two only)
_WHOLE_MODEL_ENTRY = {"qwen2_vl": "qwen2vl_rtn_gptq_fwrd_plus", "video_llama_3": "videollama3_rtn_gptq_fwrd_plus"}


def _display(model_type: str | None) -> str:
    try:
        return spec_for_model_type(str(model_type)).display_name
    except ValueError:
        return str(model_type)


def _check_family(name: str, family: str, model) -> None:
    """The research code had one module per model family; calling the wrong one fails here, by name."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type == family:
        return
    other = _WHOLE_MODEL_ENTRY.get(model_type)
    hint = (f"use the {_display(model_type)} functions ({other} and its per-part siblings)" if other
            else "use hf_vlm_gptq.api.quantize, which reads the architecture from the model")
    raise ValueError(f"{name}() is for {_display(family)} models (model_type {family!r}) but got a model "
                     f"of model_type {model_type!r}; {hint}.")


def _run(model, dataset, dev, dataset_name, args, select: dict[str, str], **overrides) -> dict[str, QuantRecord]:
    config = config_from_args(args, dev, **overrides)
    logger.info("calibrating on %s", dataset_name or "the given samples")
    return quantize(model, config, data=dataset, select=select)


def _make(family: str, select: dict[str, str], doc: str, **overrides: Any):
    def entry(model, dataset=None, dev=None, dataset_name=None, args=None) -> dict[str, QuantRecord]:
        _check_family(entry.__name__, family, model)
        return _run(model, dataset, dev, dataset_name, args, select, **overrides)

    entry.__doc__ = doc
    return entry


# --- Qwen2-VL -------------------------------------------------------------------------------------
qwen2vl_rtn_gptq_fwrd_plus = _make(
    "qwen2_vl", {"vision": "all", "merger": "all", "llm": "all"},
    "Quantize every part of a Qwen2-VL the flags enable (vision, merger, LLM); GPTQ or RTN per *_w_rtn.")
gptq_qwen2vl_fwrd_visual_clip_conv1 = _make(
    "qwen2_vl", {"vision": "stem"}, "GPTQ of Qwen2-VL's Conv3d patch embedding.",
    visual_w_rtn=False, quant_visual_clip=True)
gptq_qwen2vl_fwrd_visual_clip_resblocks = _make(
    "qwen2_vl", {"vision": "blocks"}, "GPTQ of Qwen2-VL's vision blocks.",
    visual_w_rtn=False, quant_visual_clip=True)
qwen2vl_visual_clip_rtn = _make(
    "qwen2_vl", {"vision": "all"}, "RTN of Qwen2-VL's patch embedding and vision blocks.", visual_w_rtn=True,
    quant_visual_clip=True)
gptq_qwen2vl_fwrd_visual_clip_cross_attention = _make(
    "qwen2_vl", {"merger": "all"}, "GPTQ of Qwen2-VL's visual.merger.",
    visual_w_rtn=False, quant_cross_attention=True)
qwen2vl_visual_cross_attention_rtn = _make(
    "qwen2_vl", {"merger": "all"}, "RTN of Qwen2-VL's visual.merger.",
    visual_w_rtn=True, quant_cross_attention=True)
gptq_qwen2vl_fwrd_llm = _make(
    "qwen2_vl", {"llm": "all"}, "GPTQ of Qwen2-VL's language model.", llm_w_rtn=False, quant_llm=True)
qwen2vl_llm_rtn = _make(
    "qwen2_vl", {"llm": "all"}, "RTN of Qwen2-VL's language model.", llm_w_rtn=True, quant_llm=True)

# --- VideoLLaMA3 ----------------------------------------------------------------------------------
videollama3_rtn_gptq_fwrd_plus = _make(
    "video_llama_3", {"vision": "all", "projector": "all", "llm": "all"},
    "Quantize every part of a VideoLLaMA3 the flags enable (encoder, projector, LLM); GPTQ or RTN per *_w_rtn.")
gptq_videollama3_fwrd_visual_encoder_patch_embedding = _make(
    "video_llama_3", {"vision": "stem"}, "GPTQ of VideoLLaMA3's Conv2d patch embedding.", visual_w_rtn=False,
    quant_visual_clip=True)
gptq_videollama3_fwrd_visual_encoder_layers = _make(
    "video_llama_3", {"vision": "blocks"}, "GPTQ of VideoLLaMA3's vision encoder layers.", visual_w_rtn=False,
    quant_visual_clip=True)
videollama3_visual_encoder_rtn = _make(
    "video_llama_3", {"vision": "all"}, "RTN of VideoLLaMA3's patch embedding and encoder layers.",
    visual_w_rtn=True,
    quant_visual_clip=True)
gptq_videollama3_fwrd_visual_projector = _make(
    "video_llama_3", {"projector": "all"}, "GPTQ of VideoLLaMA3's projector.",
    visual_w_rtn=False, quant_visual_projector=True)
videollama3_visual_projector_rtn = _make(
    "video_llama_3", {"projector": "all"}, "RTN of VideoLLaMA3's projector.",
    visual_w_rtn=True, quant_visual_projector=True)
gptq_videollama3_fwrd_llm = _make(
    "video_llama_3", {"llm": "all"}, "GPTQ of VideoLLaMA3's language model.", llm_w_rtn=False, quant_llm=True)
videollama3_llm_rtn = _make(
    "video_llama_3", {"llm": "all"}, "RTN of VideoLLaMA3's language model.", llm_w_rtn=True, quant_llm=True)

_ENTRY_POINTS = [name for name in dir() if "fwrd" in name or name.endswith("_rtn")]
for _name in _ENTRY_POINTS:
    globals()[_name].__name__ = globals()[_name].__qualname__ = _name

__all__ = [*_ENTRY_POINTS, "RESEARCH_ALGORITHM", "config_from_args"]

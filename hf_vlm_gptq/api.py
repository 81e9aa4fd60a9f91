"""Quantize a model that is already loaded (outside `from_pretrained`), with the same pipeline.

`from_pretrained(..., quantization_config=cfg)` is the main path; this one serves notebooks that already
hold a model, and the research code's function-level entry points in `compat.py`. The model is left
exactly as `from_pretrained` would leave it: packed modules in place, `config.quantization_config` set,
and an `hf_quantizer` attached, so `save_pretrained` writes a loadable checkpoint.
"""

from __future__ import annotations

from typing import Any

from .config import VLMGPTQConfig
from .events import Listener
from .quantizer import VLMGPTQHfQuantizer
from .report import QuantRecord
from .runner import calibration_batches, is_model_inputs, quantize_and_record

__all__ = ["calibration_batches", "is_model_inputs", "quantize"]


def quantize(model, config: VLMGPTQConfig, *, data: Any = None, processor: Any = None,
             select: dict[str, str] | None = None, progress: bool = True,
             on_event: Listener | None = None) -> dict[str, QuantRecord]:
    """Quantize a loaded `model` in place; returns the per-module records keyed by module path.

    Calling it again on the same model (e.g. one component at a time) adds to the earlier records.
    `on_event(event)` is called with each event of the run (see `hf_vlm_gptq.events`).
    """
    quantizer = getattr(model, "hf_quantizer", None)
    attached = isinstance(quantizer, VLMGPTQHfQuantizer)
    if not attached:
        quantizer = VLMGPTQHfQuantizer(config, pre_quantized=False)
    records = quantize_and_record(model, config, quantizer, data=data, processor=processor, select=select,
                                  progress=progress, on_event=on_event)
    if not attached:
        model.hf_quantizer = quantizer
    target = quantizer.quantization_config
    model.config.quantization_config = target
    model.is_quantized = True
    model.quantization_method = target.quant_method
    return records

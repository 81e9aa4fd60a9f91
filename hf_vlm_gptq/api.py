"""Quantize a model that is already loaded (outside `from_pretrained`), with the same pipeline.

`from_pretrained(..., quantization_config=cfg)` is the main path; this one serves notebooks that already
hold a model, and the research code's function-level entry points in `compat.py`. The model is left
exactly as `from_pretrained` would leave it: packed modules in place, `config.quantization_config` set,
and an `hf_quantizer` attached, so `save_pretrained` writes a loadable checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any

from . import card
from .calib import build_model_inputs, load_samples
from .config import VLMGPTQConfig
from .pipeline import quantize_model
from .quantizer import VLMGPTQHfQuantizer
from .report import QuantRecord, records_to_table

logger = logging.getLogger(__name__)


def is_model_inputs(data: Any) -> bool:
    """True for a list of already-processed batches (dicts holding `input_ids`)."""
    return isinstance(data, list) and bool(data) and all(isinstance(d, dict) and "input_ids" in d for d in data)


def calibration_batches(model, config: VLMGPTQConfig, data: Any = None, processor: Any = None) -> list[dict]:
    """Processed calibration batches from `data` (samples, processed batches, or None for the config's)."""
    if is_model_inputs(data):
        return data
    samples = load_samples(config.dataset if data is None else data, config.num_samples, seed=config.seed)
    processor = processor or config.processor
    if processor is None:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(model.name_or_path)
    return build_model_inputs(samples, processor, max_seq_len=config.max_seq_len)


def quantize(model, config: VLMGPTQConfig, *, data: Any = None, processor: Any = None,
             select: dict[str, str] | None = None, progress: bool = True) -> dict[str, QuantRecord]:
    """Quantize a loaded `model` in place; returns the per-module records keyed by module path.

    Calling it again on the same model (e.g. one component at a time) adds to the earlier records.
    """
    batches = calibration_batches(model, config, data, processor)
    records, entries = quantize_model(model, config, batches, progress=progress, select=select)
    quantizer = getattr(model, "hf_quantizer", None)
    if not isinstance(quantizer, VLMGPTQHfQuantizer):
        quantizer = VLMGPTQHfQuantizer(config, pre_quantized=False)
        model.hf_quantizer = quantizer
    base = quantizer.quantization_config  # a copy with the manifest: `config` itself stays as it was
    stats = {path: rec.stats() for path, rec in records.items()}
    target = quantizer.quantization_config = base.with_manifest(base.manifest.with_results(entries, stats))
    quantizer.records.update(records)
    model.config.quantization_config = target
    model.is_quantized = True
    model.quantization_method = target.quant_method
    logger.info("quantization report\n%s", records_to_table(records))
    if not hasattr(model, "_hf_vlm_gptq_card"):  # save_pretrained / push_to_hub: README.md + error plot
        card.attach(model, card.base_model_of(model), card.describe_dataset(
            config.dataset if data is None else data, config.num_samples, config.seed))
    return records

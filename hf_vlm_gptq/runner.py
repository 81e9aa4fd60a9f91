"""The one quantization entry point behind `from_pretrained` (quantizer.py) and `api.quantize`.

`quantize_and_record` builds the calibration batches (loading the processor when needed), runs the layerwise
pipeline, and books the results: `modules` entries and stats into the quantizer's config, records into the
quantizer, the report logged, the model card attached.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from torch import nn

from . import card
from .calib import build_model_inputs, load_samples
from .config import VLMGPTQConfig
from .events import Listener
from .manifest import CheckpointManifest
from .pipeline import quantize_model
from .report import QuantRecord, records_to_table

if TYPE_CHECKING:
    from .quantizer import VLMGPTQHfQuantizer

logger = logging.getLogger(__name__)


def is_model_inputs(data: Any) -> bool:
    """True for a list of already-processed batches (dicts holding `input_ids`)."""
    return isinstance(data, list) and bool(data) and all(isinstance(d, dict) and "input_ids" in d for d in data)


def load_processor(model: nn.Module, config: VLMGPTQConfig, processor: Any = None) -> Any:
    """`processor`, else the config's, else `AutoProcessor` of the model's source."""
    processor = processor or config.processor
    if processor is None:
        from transformers import AutoProcessor

        source = getattr(model, "name_or_path", None) or model.config._name_or_path
        processor = AutoProcessor.from_pretrained(source)
    return processor


def calibration_batches(model: nn.Module, config: VLMGPTQConfig, data: Any = None, processor: Any = None,
                        samples: list[dict] | None = None) -> list[dict]:
    """Processed calibration batches from `data` (samples, processed batches, or None for the config's),
    or from `samples` already read. Raises ValueError when no sample survives processing."""
    if is_model_inputs(data):
        return data
    if samples is None:
        samples = load_samples(config.dataset if data is None else data, config.num_samples, seed=config.seed)
    batches = build_model_inputs(samples, load_processor(model, config, processor), max_seq_len=config.max_seq_len)
    if not batches:
        raise ValueError("no calibration sample survived processing; pass more or shorter samples "
                         "(see VLMGPTQConfig.dataset and max_seq_len).")
    return batches


def quantize_and_record(model: nn.Module, config: VLMGPTQConfig, quantizer: VLMGPTQHfQuantizer, *,
                        data: Any = None, samples: list[dict] | None = None, processor: Any = None,
                        select: dict[str, str] | None = None, progress: bool = True,
                        on_event: Listener | None = None, fresh: bool = False) -> dict[str, QuantRecord]:
    """Quantize `model` in place with `config` on `data` / `samples` (see `calibration_batches`); returns
    this run's records.

    The results go to `quantizer`: a copy of its config with the manifest (`modules`, `stats`), also set as
    the model's `quantization_config`, and its `records`. `fresh`: they replace
    earlier ones (a `from_pretrained` run); else they are added (`api.quantize`, possibly part by part).
    Events go to `on_event` and `events.listen` listeners (see events.py).
    """
    batches = calibration_batches(model, config, data, processor, samples)
    records, entries = quantize_model(model, config, batches, progress=progress, select=select, on_event=on_event)
    base = quantizer.quantization_config
    stats = {path: rec.stats() for path, rec in records.items()}
    manifest = CheckpointManifest(entries, stats) if fresh else base.manifest.with_results(entries, stats)
    # the model gets a copy with the manifest: the user's config object stays as it was
    quantizer.quantization_config = model.config.quantization_config = base.with_manifest(manifest)
    if fresh:
        quantizer.records = {}
    quantizer.records.update(records)
    logger.info("quantization report\n%s", records_to_table(records))
    if not hasattr(model, "_hf_vlm_gptq_card"):  # save_pretrained / push_to_hub: README.md + error plot
        card.attach(model, card.base_model_of(model), card.describe_dataset(
            config.dataset if data is None else data, config.num_samples, config.seed))
    return records

"""hf_vlm_gptq: GPTQ / RTN quantization of whole vision-language models as a transformers quantizer.

`import hf_vlm_gptq` registers the quant_method "vlm_gptq" with transformers, so that
`from_pretrained(..., quantization_config=VLMGPTQConfig(...))` quantizes a model and
`from_pretrained(saved_dir)` loads one back. Importing twice is harmless.
"""

from __future__ import annotations

from . import log  # first: installs the default handler (warnings reach the user; see log.py)
from .config import FORMAT_VERSION, QUANT_METHOD, VLMGPTQConfig
from .log import get_verbosity, set_verbosity
from .quantizer import VLMGPTQHfQuantizer
from .report import QuantRecord, records_to_json, records_to_table

__version__ = "0.1.0"


def _register() -> None:
    """Register config and quantizer with transformers once (a second import finds them there)."""
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not VLMGPTQConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(VLMGPTQConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not VLMGPTQHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(VLMGPTQHfQuantizer)


_register()


def get_quantizers(model) -> dict[str, QuantRecord]:
    """The per-module record of a model quantized in this process: module path -> QuantRecord.

    The research code's returned "quantizers" dict, keyed like the model's own module names
    (`model.visual.blocks.0.attn.qkv`; split layers as `....mlp.fc2.L2`).
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if not isinstance(quantizer, VLMGPTQHfQuantizer):
        raise ValueError("this model was not quantized or loaded with hf_vlm_gptq (no VLMGPTQHfQuantizer on it)")
    return dict(quantizer.records)


def quantization_report(model, as_json: bool = False) -> str:
    """The per-layer report of a model quantized in this process, as a table (or JSON)."""
    records = get_quantizers(model)
    return records_to_json(records) if as_json else records_to_table(records)


__all__ = [
    "FORMAT_VERSION",
    "QUANT_METHOD",
    "QuantRecord",
    "VLMGPTQConfig",
    "VLMGPTQHfQuantizer",
    "__version__",
    "get_quantizers",
    "get_verbosity",
    "log",
    "quantization_report",
    "set_verbosity",
]

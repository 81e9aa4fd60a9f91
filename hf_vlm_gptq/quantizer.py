"""`VLMGPTQHfQuantizer`: the transformers lifecycle glue. No math and no model knowledge here.

Fresh model (`quantization_config=VLMGPTQConfig(...)`):
  before weights load: check the architecture and read the calibration samples (bad input fails fast);
  after weights load: run the processor on the samples, run the layerwise pipeline, record the result.
Pre-quantized checkpoint (`quant_method: "vlm_gptq"` in config.json):
  before weights load: check the module records and the safetensors headers, swap the listed modules for
  empty packed twins on the meta device;
  after weights load: verify every tensor the records imply was really read.
Saving adds the guard tensor (modules_swap.GUARD_TEXT) that makes plain transformers refuse the checkpoint.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers.quantizers.base import HfQuantizer

from . import card
from .arch import spec_for_model_type
from .calib import load_samples
from .checks import check_part_flags
from .config import VLMGPTQConfig
from .modules_swap import (
    check_checkpoint_files,
    guard_module,
    guard_tensor,
    replace_with_quant_modules,
    verify_loaded,
)
from .records import ModuleRecord, parse_records
from .report import QuantRecord, records_from_config
from .runner import quantize_and_record


class VLMGPTQHfQuantizer(HfQuantizer):
    """Quantizes a whole VLM with GPTQ / RTN during `from_pretrained`, or loads one that was."""

    requires_calibration = False
    quantization_config: VLMGPTQConfig

    def __init__(self, quantization_config: VLMGPTQConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.samples: list[dict] | None = None
        self.records: dict[str, QuantRecord] = {}
        self.dtype: torch.dtype | None = None
        self.module_records: dict[str, ModuleRecord] = {}

    def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype | None:
        self.dtype = dtype
        return dtype

    def _process_model_before_weight_loading(self, model, **kwargs: Any):
        config = self.quantization_config
        if self.pre_quantized:
            if config.manifest.is_empty:
                raise ValueError(
                    "this checkpoint's quantization_config (quant_method 'vlm_gptq') lists no quantized modules; "
                    "it was not written by hf_vlm_gptq's save_pretrained."
                )
            self.module_records = parse_records(config.manifest.modules)
            dtype = self.dtype if isinstance(self.dtype, torch.dtype) else torch.float16
            replace_with_quant_modules(model, self.module_records, dtype)
            spec = spec_for_model_type(model.config.model_type)
            check_checkpoint_files(self.module_records, kwargs.get("checkpoint_files"), spec.checkpoint_names)
            guard = guard_module(self.module_records)
            if guard is not None:  # the guard key is an extra for the packed module: not worth a warning
                model._keys_to_ignore_on_load_unexpected = {
                    *(model._keys_to_ignore_on_load_unexpected or ()), rf"{re.escape(guard)}\.weight$"}
            return model
        # Unsupported architectures and flags that leave nothing to do fail before loading weights.
        check_part_flags(spec_for_model_type(model.config.model_type), config)
        self.samples = load_samples(config.dataset, config.num_samples, seed=config.seed)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        config = self.quantization_config
        if self.pre_quantized:
            verify_loaded(model, self.module_records)
            records = records_from_config(self.module_records, config.manifest.stats, config.sym,
                                          config.act_order)
            rank = {name: i for i, (name, _) in enumerate(model.named_modules())}  # config.json sorts keys
            self.records = dict(sorted(records.items(), key=lambda kv: rank.get(kv[0], len(rank))))
            card.attach(model, card.base_model_of(model), None)  # save_pretrained / push_to_hub: README + plot
            return model
        quantize_and_record(model, config, self, samples=self.samples, fresh=True)
        self.samples = None
        return model

    def get_state_dict_and_metadata(self, model):
        """The model's state dict plus the guard tensor under the guard module's `weight` key."""
        state_dict = model.state_dict()
        guard = guard_module(parse_records(self.quantization_config.manifest.modules))
        if guard is not None:
            state_dict[f"{guard}.weight"] = guard_tensor()
        return state_dict, {}

    def is_serializable(self, safe_serialization: bool = True) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        """True: adapters (PEFT LoRA, see ``hf_vlm_gptq.lora``) train on top of the frozen packed layers, whose
        backward gives the input's gradient (``ops/qbase.py``, op ``hf_vlm_gptq::packed_linear``)."""
        return True

    def _dequantize(self, model, dtype=None):
        """Back to a float model (``model.dequantize()``): every packed module becomes the plain
        ``nn.Linear`` / ``nn.Conv2d`` / ``nn.Conv3d`` holding its dequantized weight in ``dtype`` (a split
        layer one ``nn.Linear`` again); transformers then drops the quantization config. The float model
        computes what the packed one does on its reference path (dequantize + dense op)."""
        from .modules_swap import SplitLinear, set_submodule
        from .ops import QuantConv, QuantLinear

        dtype = dtype if isinstance(dtype, torch.dtype) else None
        splits = [f"{path}." for path, m in model.named_modules() if isinstance(m, SplitLinear)]
        for path, module in list(model.named_modules()):
            if any(path.startswith(prefix) for prefix in splits):
                continue  # a split layer's L1 / L2: replaced with it
            if isinstance(module, SplitLinear):
                dense = module.L2.to_linear(dtype)
                with torch.no_grad():
                    dense.in_features = module.in_features
                    dense.weight = torch.nn.Parameter(torch.cat([module.L1.weight.to(dense.weight.dtype),
                                                                 dense.weight], dim=1))
                set_submodule(model, path, dense)
            elif isinstance(module, QuantLinear):
                set_submodule(model, path, module.to_linear(dtype))
            elif isinstance(module, QuantConv):
                set_submodule(model, path, module.to_conv(dtype))
        self.records = {}
        if "_hf_vlm_gptq_card" in model.__dict__:  # the quantized model's card hooks (card.attach) go too
            for name in ("_hf_vlm_gptq_card", "save_pretrained", "push_to_hub"):
                model.__dict__.pop(name, None)
        return model

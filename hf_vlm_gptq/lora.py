"""QLoRA-style fine-tuning: PEFT LoRA adapters on the packed layers (``pip install peft``).

PEFT supports a quantized layer type through a LoRA layer class of its own that calls the frozen base layer and
adds the low-rank update (``peft.tuners.lora.gptq.GPTQLoraLinear`` for GPTQModel's ``QuantLinear``, likewise for
bitsandbytes, AWQ, HQQ, ...), and lets a third-party type in through ``LoraConfig._register_custom_module``
(its "custom models" guide). This module does that for ``QuantLinear`` and the ``.L2`` split layers:

    from peft import LoraConfig
    from hf_vlm_gptq.lora import get_peft_model, load_adapter

    model = get_peft_model(quantized_model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    ... train (only the adapters have gradients; the packed weights stay frozen) ...
    model.save_pretrained("adapter")                        # PEFT's own files
    model = load_adapter(fresh_quantized_model, "adapter")  # PeftModel.from_pretrained with our layers

(or ``register_lora_layers(config)`` on a ``LoraConfig``, then peft's own ``get_peft_model`` /
``PeftModel.from_pretrained(model, path, config=config)``: PEFT does not save the registration.)

The gradient through a packed layer (w.r.t. its input) is ``grad @ dequantize(W)``, computed in the backward
pass of the ``hf_vlm_gptq::packed_linear`` op (``ops/qbase.py``), so the adapters of earlier layers get their
gradients and no dense weight is kept between forward and backward. Merging an adapter into a packed weight
is not possible: dequantize first (``model.dequantize()`` on the quantized model, then ``load_adapter`` and
``merge_and_unload()``: PEFT's own LoRA layers serve the resulting ``nn.Linear`` modules).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

try:
    from peft import LoraConfig, PeftModel
    from peft import get_peft_model as _peft_get_peft_model
    from peft.tuners.lora.layer import LoraLayer
except ImportError as err:  # pragma: no cover - exercised only without peft
    raise ImportError("hf_vlm_gptq.lora needs PEFT: pip install peft") from err

from .modules_swap import SplitLinear
from .ops import QuantLinear

__all__ = ["QuantLinearLora", "get_peft_model", "load_adapter", "register_lora_layers"]


class QuantLinearLora(nn.Module, LoraLayer):
    """LoRA on a packed layer (``QuantLinear`` or ``SplitLinear``): ``y = base(x) + B(A(dropout(x))) * scaling``.

    Built like PEFT's ``GPTQLoraLinear``: the base layer runs as it is (its own kernels, frozen weights), the
    adapters in their own dtype; DoRA and merging are not supported on packed weights."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs: Any) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        if config.use_dora:
            raise ValueError(f"{type(self).__name__} does not support DoRA on packed weights; set use_dora=False")
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any):
        return None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A.keys():
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            h = self._cast_input_dtype(x, lora_a.weight.dtype)
            result = result + lora_b(lora_a(self.lora_dropout[name](h))) * self.scaling[name]
        return result.to(dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "a LoRA update cannot be merged into a packed weight: call model.dequantize() on the quantized model "
            "first, load the adapter on it (hf_vlm_gptq.lora.load_adapter), then merge_and_unload()")

    def unmerge(self) -> None:
        raise NotImplementedError("packed layers never hold a merged adapter")

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register_lora_layers(config: LoraConfig) -> LoraConfig:
    """Register :class:`QuantLinearLora` for ``QuantLinear`` and ``SplitLinear`` on a ``LoraConfig`` (PEFT's
    custom-module hook; not saved with the adapter, so register again on the config used to load one)."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"expected a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module({QuantLinear: QuantLinearLora, SplitLinear: QuantLinearLora})
    return config


def get_peft_model(model: nn.Module, config: LoraConfig, **kwargs: Any):
    """``peft.get_peft_model`` with the packed layers registered on ``config``."""
    return _peft_get_peft_model(model, register_lora_layers(config), **kwargs)


def load_adapter(model: nn.Module, adapter: str, *, is_trainable: bool = False, config: LoraConfig | None = None,
                 **kwargs: Any):
    """``PeftModel.from_pretrained(model, adapter, ...)`` on a quantized model, with the packed layers registered
    on the adapter's ``LoraConfig`` (read from ``adapter`` unless given)."""
    if config is None:
        config = LoraConfig.from_pretrained(adapter)
    return PeftModel.from_pretrained(model, adapter, is_trainable=is_trainable, config=register_lora_layers(config),
                                     **kwargs)

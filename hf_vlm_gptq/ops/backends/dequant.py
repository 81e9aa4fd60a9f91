"""Dequantize + dense matmul: the reference computation, and the backend that serves every layer and input."""

from __future__ import annotations

from typing import Any

import torch

from .. import dense
from .base import Backend, Layer


class DequantBackend(Backend):
    """``F.linear(x2, dequantize(W) in x2's dtype, bias)`` (float32 on CPU: on the measured engine, ``dense.py``); the module's dense cache (``cache_dequantized``)
    keeps the weight between calls, else it is dequantized on every call."""

    name = "dequant"
    variants = ("cached", "uncached")
    caches = False  # nothing to prepare: the module's dense cache is the layout

    def unavailable_reason(self, layer: Layer, dtype: torch.dtype, device: torch.device) -> str | None:
        return None

    def prepare(self, module: Any, x2: torch.Tensor) -> None:
        return None

    def matmul(self, module: Any, x2: torch.Tensor, weights: None, bias: torch.Tensor | None) -> torch.Tensor:
        return dense.linear(x2, module.dequantize_weight(x2.dtype), bias)

    def variant(self, module: Any, weights: None) -> str:
        return "cached" if module.cache_dequantized else "uncached"

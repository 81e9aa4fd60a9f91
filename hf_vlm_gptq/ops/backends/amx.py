"""The AMX low-bit CPU kernel (``ops/cpu_amx.py``: AMX tiles, compiled on first use) as a backend."""

from __future__ import annotations

from typing import Any

import torch

from .. import cpu_amx as AMX
from ..cpu_kernel import FusedWeights, fused_weights_of
from .base import Backend, Layer


class AmxBackend(Backend):
    """Reads ``qweight`` / fp16 ``scales`` / ``g_idx`` as stored (the same :class:`~..cpu_kernel.FusedWeights`
    as the AVX512 kernel); bfloat16 inputs, 2/4/8 bits, act-order, on CPUs with AMX-BF16."""

    name = "amx"
    variants = ("amx",)

    def unavailable_reason(self, layer: Layer, dtype: torch.dtype, device: torch.device) -> str | None:
        """Why the AMX kernel cannot serve this layer / input (None when it can); the kernel itself is looked
        for (built, loaded, self-checked) once per process, when a layer first qualifies."""
        if device.type != "cpu":
            return f"device {device.type} (the AMX kernel is CPU code)"
        if layer.bits not in AMX.AMX_BITS:
            return f"bits={layer.bits} (the AMX kernel takes {AMX.AMX_BITS})"
        if dtype != torch.bfloat16:
            return f"input dtype {dtype} (the AMX kernel is bfloat16 only)"
        if layer.out_features % 16:
            return f"out_features={layer.out_features} not a multiple of 16"
        if layer.in_features % 2:
            return f"in_features={layer.in_features} is odd"
        return AMX.kernel_unavailable_reason()

    def prepare(self, module: Any, x2: torch.Tensor) -> FusedWeights | str:
        return fused_weights_of(module, "AMX kernel")

    def matmul(self, module: Any, x2: torch.Tensor, weights: FusedWeights,
               bias: torch.Tensor | None) -> torch.Tensor:
        return AMX.amx_matmul(x2, weights, bias)

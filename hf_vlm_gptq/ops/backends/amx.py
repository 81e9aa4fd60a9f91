"""The AMX low-bit CPU kernel (``ops/cpu_amx.py``: AMX tiles, compiled on first use) as a backend."""

from __future__ import annotations

from typing import Any

import torch

from .. import cpu_amx as AMX
from ..cpu_kernel import GroupSorted, fused_weights_of, sorted_by_group
from .base import Backend, Layer
from .fused import bf16_kernel_reason


class AmxBackend(Backend):
    """Reads ``qweight`` / fp16 ``scales`` / ``g_idx`` as stored (the same :class:`~..cpu_kernel.FusedWeights`
    as the AVX512 kernel), act-order layers through a group-sorted copy of ``qweight``
    (:func:`~..cpu_kernel.sorted_by_group`); bfloat16 inputs, 2/4/8 bits, on CPUs with AMX-BF16."""

    name = "amx"
    variants = ("amx",)

    def unavailable_reason(self, layer: Layer, dtype: torch.dtype, device: torch.device) -> str | None:
        """Why the AMX kernel cannot serve this layer / input (None when it can); the kernel itself is looked
        for (built, loaded, self-checked) once per process, when a layer first qualifies."""
        return bf16_kernel_reason(layer, dtype, device, "AMX kernel", AMX.AMX_BITS, AMX.kernel_unavailable_reason)

    def prepare(self, module: Any, x2: torch.Tensor) -> GroupSorted | str:
        weights = fused_weights_of(module, "AMX kernel")
        return weights if isinstance(weights, str) else sorted_by_group(weights, module.group_size)

    def matmul(self, module: Any, x2: torch.Tensor, weights: GroupSorted,
               bias: torch.Tensor | None) -> torch.Tensor:
        return AMX.amx_matmul(x2, weights.fused, bias, weights.input_order)  # x's columns gathered in the kernel

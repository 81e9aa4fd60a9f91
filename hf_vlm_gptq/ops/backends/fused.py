"""The fused low-bit CPU kernel (``ops/cpu_fused.py``: AVX512-BF16, compiled on first use) as a backend."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import cpu_fused as CF
from ..cpu_kernel import FusedWeights, fused_weights_of
from .base import Backend, Layer


def bf16_kernel_reason(layer: Layer, dtype: torch.dtype, device: torch.device, what: str, bits: tuple[int, ...],
                       kernel_reason: Callable[[], str | None]) -> str | None:
    """Why a bf16 CPU kernel of the ``cpu_fused`` signature (this one, the AMX kernel) cannot serve a layer /
    input: the layer's and input's requirements first, then ``kernel_reason()`` (the kernel looked for)."""
    if device.type != "cpu":
        return f"device {device.type} (the {what} is CPU code)"
    if layer.bits not in bits:
        return f"bits={layer.bits} (the {what} takes {bits})"
    if dtype != torch.bfloat16:
        return f"input dtype {dtype} (the {what} is bfloat16 only)"
    if layer.out_features % 16:
        return f"out_features={layer.out_features} not a multiple of 16"
    if layer.in_features % 2:
        return f"in_features={layer.in_features} is odd"
    return kernel_reason()


class FusedBackend(Backend):
    """Reads ``qweight`` / fp16 ``scales`` / ``g_idx`` as stored (its layout adds only uint8 zero points).
    Its 1-4 row paths (4 bits, groups of consecutive columns) make it the better alternative at small
    batches: the ``fused_small_batch`` column of ``MAX_BATCH``."""

    name = "fused"
    variants = ("fused", "fused_small_batch")

    def unavailable_reason(self, layer: Layer, dtype: torch.dtype, device: torch.device) -> str | None:
        """Why the fused kernel cannot serve this layer / input (None when it can); the kernel itself is
        looked for (built, loaded, self-checked) once per process, when a layer first qualifies."""
        return bf16_kernel_reason(layer, dtype, device, "fused kernel", CF.FUSED_BITS, CF.kernel_unavailable_reason)

    def prepare(self, module: Any, x2: torch.Tensor) -> FusedWeights | str:
        return fused_weights_of(module, "fused kernel")

    def matmul(self, module: Any, x2: torch.Tensor, weights: FusedWeights,
               bias: torch.Tensor | None) -> torch.Tensor:
        return CF.fused_matmul(x2, weights, bias)

    def variant(self, module: Any, weights: FusedWeights) -> str:
        return "fused_small_batch" if weights.small_batch_path else "fused"

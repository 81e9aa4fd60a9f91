"""The AVX2 + FMA low-bit CPU kernel (``ops/cpu_avx2.py``, compiled on first use) as a backend."""

from __future__ import annotations

from typing import Any

import torch

from .. import cpu_avx2 as A
from ..cpu_kernel import FusedWeights, fused_weights_of
from .base import Backend, Layer


class Avx2Backend(Backend):
    """Reads ``qweight`` / fp16 ``scales`` / ``g_idx`` as stored (its layout adds only uint8 zero points, the
    same :class:`~..cpu_kernel.FusedWeights` as the AVX512 kernel); bfloat16 and float32 inputs, act-order."""

    name = "avx2"
    variants = ("avx2",)

    def unavailable_reason(self, layer: Layer, dtype: torch.dtype, device: torch.device) -> str | None:
        """Why the AVX2 kernel cannot serve this layer / input (None when it can); the kernel itself is
        looked for (built, loaded, self-checked) once per process, when a layer first qualifies."""
        if device.type != "cpu":
            return f"device {device.type} (the AVX2 kernel is CPU code)"
        if layer.bits not in A.AVX2_BITS:
            return f"bits={layer.bits} (the AVX2 kernel takes {A.AVX2_BITS})"
        if dtype not in A.DTYPES:
            return f"input dtype {dtype} (the AVX2 kernel takes {A.DTYPES})"
        if layer.out_features % 8:
            return f"out_features={layer.out_features} not a multiple of 8"
        return A.kernel_unavailable_reason()

    def prepare(self, module: Any, x2: torch.Tensor) -> FusedWeights | str:
        return fused_weights_of(module, "AVX2 kernel")

    def matmul(self, module: Any, x2: torch.Tensor, weights: FusedWeights,
               bias: torch.Tensor | None) -> torch.Tensor:
        return A.avx2_matmul(x2, weights, bias)

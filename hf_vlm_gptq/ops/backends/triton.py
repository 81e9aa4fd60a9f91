"""The fused Triton matmul (``ops/triton_matmul.py``) as a backend: CUDA, or CPU under ``TRITON_INTERPRET=1``.

``triton_matmul`` (which imports triton) is imported on first use only: on CUDA inputs or ``kernel="triton"``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..selfcheck import matmul_probes, self_check
from .base import Backend, Layer

logger = logging.getLogger(__name__)

_HALF = (torch.float16, torch.bfloat16)


def _kernels():
    from .. import triton_matmul

    return triton_matmul


class TritonBackend(Backend):
    """Reads the checkpoint buffers as they are (no weight copy); self-checked once per module and dtype
    on every launch shape (split-K, tiled, wide tiles)."""

    name = "triton"
    variants = ("triton",)

    def unavailable_reason(self, layer: Layer, dtype: torch.dtype, device: torch.device) -> str | None:
        """Why the fused kernel cannot serve this layer / input (None when it can)."""
        TM = _kernels()
        if TM.IMPORT_ERROR is not None:
            return TM.IMPORT_ERROR
        if layer.bits not in TM.TRITON_BITS:
            return f"bits={layer.bits} (fused kernel takes {TM.TRITON_BITS}; 3-bit values straddle int32 words)"
        if dtype not in _HALF:
            return f"input dtype {dtype} (fused kernel takes float16 / bfloat16)"
        if device.type == "cuda":
            if dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) < (8, 0):
                return "bfloat16 tl.dot needs compute capability >= 8.0"
            return None
        if device.type == "cpu" and TM.interpreted():
            return None
        return f"device {device.type} (Triton runs on CUDA, or on CPU with TRITON_INTERPRET=1)"

    def prepare(self, module: Any, x2: torch.Tensor) -> Any:
        TM = _kernels()
        w = TM.packed_weights(module.qweight, module.qzeros, module.scales, module.g_idx, bits=module.bits,
                              group_size=module.group_size, in_features=module.in_features,
                              out_features=module.out_features)
        rows = (4, TM.SPLIT_K_MAX_ROWS + 8, 80)  # every launch shape (split-K, tiled, wide tiles)
        probes = matmul_probes(lambda x: TM.triton_matmul(x, w), module._dequantize(x2.dtype), rows)
        return self_check("Triton kernel", probes, "using the other paths", logger) or w

    def matmul(self, module: Any, x2: torch.Tensor, weights: Any, bias: torch.Tensor | None) -> torch.Tensor:
        y = _kernels().triton_matmul(x2, weights)
        return y if bias is None else y.add_(bias)

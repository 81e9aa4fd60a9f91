"""The FMA low-bit CPU kernel (``ops/cpu_avx2.py``, compiled on first use: its AVX2 or AVX-512 build) as a
backend."""

from __future__ import annotations

from typing import Any

import torch

from .. import cpu_avx2 as A
from ..cpu_kernel import GroupSorted, fused_weights_of, sorted_by_group
from .base import Backend, Layer


class Avx2Backend(Backend):
    """Reads ``qweight`` / fp16 ``scales`` / ``g_idx`` as stored (its layout adds only uint8 zero points, the
    same :class:`~..cpu_kernel.FusedWeights` as the AVX512 kernel), act-order layers through a group-sorted copy
    of ``qweight`` (:func:`~..cpu_kernel.sorted_by_group`, so its small-batch path serves them too); bfloat16
    and float32 inputs.
    Its ``MAX_BATCH`` column is the build that serves: ``avx2`` or ``avx512``."""

    name = "avx2"
    variants = ("avx2", "avx512")

    def unavailable_reason(self, layer: Layer, dtype: torch.dtype, device: torch.device) -> str | None:
        """Why the FMA kernel cannot serve this layer / input (None when it can); the kernel itself is
        looked for (built, loaded, self-checked) once per process, when a layer first qualifies."""
        if device.type != "cpu":
            return f"device {device.type} (the FMA kernel is CPU code)"
        if layer.bits not in A.AVX2_BITS:
            return f"bits={layer.bits} (the FMA kernel takes {A.AVX2_BITS})"
        if dtype not in A.DTYPES:
            return f"input dtype {dtype} (the FMA kernel takes {A.DTYPES})"
        if layer.out_features % 8:
            return f"out_features={layer.out_features} not a multiple of 8"
        return A.kernel_unavailable_reason()

    def prepare(self, module: Any, x2: torch.Tensor) -> GroupSorted | str:
        weights = fused_weights_of(module, "FMA kernel")
        return weights if isinstance(weights, str) else sorted_by_group(weights, module.group_size)

    def variant(self, module: Any, weights: GroupSorted) -> str:
        return "avx512" if A.build_in_use() == A.KERNEL_AVX512.entry_name else "avx2"

    def matmul(self, module: Any, x2: torch.Tensor, weights: GroupSorted,
               bias: torch.Tensor | None) -> torch.Tensor:
        return A.avx2_matmul(x2, weights.fused, bias, weights.input_order)  # x's columns gathered in the kernel

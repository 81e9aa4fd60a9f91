"""The AMX low-bit CPU kernel (``ops/cpu_amx.py``: AMX tiles, compiled on first use) as a backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import cpu_amx as AMX
from ..cpu_kernel import FusedWeights, build_fused, fused_weights_of
from ..packing import pack_rows, unpack_codes
from .base import Backend, Layer
from .fused import bf16_kernel_reason


@dataclass
class AmxWeights:
    """The kernel's data for one layer; for act-order layers (groups scattered over the input columns) a copy
    whose input columns are sorted by group (the groups then consecutive, so the kernel's regular paths
    serve), with ``input_order`` the columns of x in that order (int32; the kernel gathers them while it copies
    x into tiles; None: the checkpoint's own layout)."""

    fused: FusedWeights
    input_order: torch.Tensor | None = None


def sorted_by_group(w: FusedWeights, group_size: int) -> AmxWeights:
    """``w`` with its input columns sorted by group (stable: within a group, the checkpoint's order): the
    codes repacked in that order, the same scales and zero points. Exact: the same products, summed in
    another order. Layers whose groups are already consecutive come back as they are."""
    if w.regular_group > 0:
        return AmxWeights(w)
    order = torch.argsort(w.g_idx, stable=True)
    codes = unpack_codes(w.qweight, w.bits, w.in_features)[:, order]  # [out, in]
    qweight = pack_rows(codes.t(), w.bits)
    fused = build_fused(qweight, w.scales, w.zeros, w.g_idx[order], group_size, w.bits)
    return AmxWeights(fused, order.to(torch.int32).contiguous())


class AmxBackend(Backend):
    """Reads ``qweight`` / fp16 ``scales`` / ``g_idx`` as stored (the same :class:`~..cpu_kernel.FusedWeights`
    as the AVX512 kernel), act-order layers through a group-sorted copy of ``qweight``
    (:func:`sorted_by_group`); bfloat16 inputs, 2/4/8 bits, on CPUs with AMX-BF16."""

    name = "amx"
    variants = ("amx",)

    def unavailable_reason(self, layer: Layer, dtype: torch.dtype, device: torch.device) -> str | None:
        """Why the AMX kernel cannot serve this layer / input (None when it can); the kernel itself is looked
        for (built, loaded, self-checked) once per process, when a layer first qualifies."""
        return bf16_kernel_reason(layer, dtype, device, "AMX kernel", AMX.AMX_BITS, AMX.kernel_unavailable_reason)

    def prepare(self, module: Any, x2: torch.Tensor) -> AmxWeights | str:
        weights = fused_weights_of(module, "AMX kernel")
        return weights if isinstance(weights, str) else sorted_by_group(weights, module.group_size)

    def matmul(self, module: Any, x2: torch.Tensor, weights: AmxWeights,
               bias: torch.Tensor | None) -> torch.Tensor:
        return AMX.amx_matmul(x2, weights.fused, bias, weights.input_order)  # x's columns gathered in the kernel

"""torch's int4 kernels (``torch.ops.aten._weight_int4pack_mm[_for_cpu]``, CPU and CUDA) on packed weights.

The kernels compute, per group, ``w = (q - 8) * s + z_f`` from a ``scales_and_zeros[n_groups, out, 2]``
table (checked by experiment and in the tests). Our grid ``w = s * (q - zero)`` maps to it exactly with
``z_f = s * (8 - zero)``; act-order layers are served by permuting the input once per call so that groups
are contiguous.

Served: 4 bits, ``x`` in bfloat16 (CPU fp16 / fp32 kernels are scalar code, far slower than a dense
matmul), group size 32/64/128/256 dividing ``in_features``, ``out_features`` a multiple of 16 (CPU) / 8
(CUDA), groups of exactly ``group_size`` columns after a fixed permutation. The kernels are matrix-vector
style (their cost grows linearly with the rows), so they win at small batches only (``backends.MAX_BATCH``).
The CUDA layout cannot be tested on CPU hosts: it is self-checked once per module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..packing import contiguous_groups, unpack_codes, unpack_zeros
from ..selfcheck import matmul_probes, self_check
from .base import Backend, Layer

logger = logging.getLogger(__name__)

INT4_GROUP_SIZES = (32, 64, 128, 256)


@dataclass
class Int4Weights:
    """A layer in one of torch's int4 kernel formats (built once, reused every call)."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    perm: torch.Tensor | None  # input permutation making groups contiguous (act-order), or None
    group_size: int
    out_features: int
    device_type: str


def group_permutation(g_idx: torch.Tensor, group_size: int) -> tuple[torch.Tensor | None, bool]:
    """(perm, ok): the stable sort of ``g_idx`` (None when already sorted) and whether every group then
    spans exactly ``group_size`` consecutive columns."""
    counts = torch.bincount(g_idx.long())
    ok = bool((counts == group_size).all()) and counts.numel() * group_size == g_idx.numel()
    if contiguous_groups(g_idx, group_size):
        return None, ok
    return torch.argsort(g_idx.long(), stable=True), ok


def build_int4(
    codes: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    perm: torch.Tensor | None,
    group_size: int,
    device: torch.device,
) -> Int4Weights:
    """Convert codes ``[out, in]``, zeros / scales ``[G, out]`` (groups in g_idx order) to kernel format."""
    codes = codes.to(device)
    if perm is not None:
        codes = codes.index_select(1, perm.to(device))
    codes = codes.to(torch.int32).contiguous()  # [out, in], groups contiguous along in
    s = scales.to(device=device, dtype=torch.float32)
    z = s * (8 - zeros.to(device=device, dtype=torch.float32))
    table = torch.stack([s, z], dim=-1).to(torch.bfloat16).contiguous()  # [G, out, 2]
    if device.type == "cpu":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    else:  # CUDA takes uint8 [out, in/2], the even column in the high nibble
        k = codes.shape[1]
        inner = next(t for t in (8, 4, 2) if k % (16 * t) == 0)
        pairs = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(pairs, inner)
    return Int4Weights(
        packed=packed,
        scales_and_zeros=table,
        perm=None if perm is None else perm.to(device),
        group_size=group_size,
        out_features=codes.shape[0],
        device_type=device.type,
    )


def int4_matmul(x2: torch.Tensor, w: Int4Weights) -> torch.Tensor:
    """``x2[M, in] @ W^T`` through the int4 kernel (x2 bfloat16 on w's device)."""
    if w.perm is not None:
        x2 = x2.index_select(1, w.perm)
    x2 = x2.contiguous()
    if w.device_type == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, w.packed, w.group_size, w.scales_and_zeros)
    return torch.ops.aten._weight_int4pack_mm(x2, w.packed, w.group_size, w.scales_and_zeros)


class Int4Backend(Backend):
    name = "int4"
    variants = ("int4",)

    def unavailable_reason(self, layer: Layer, dtype: torch.dtype, device: torch.device) -> str | None:
        """Why the int4 kernel cannot serve this layer / input (None when it can, g_idx aside)."""
        bits, group_size = layer.bits, layer.group_size
        if bits != 4:
            return f"bits={bits} (kernel is 4-bit only)"
        if group_size not in INT4_GROUP_SIZES:
            return f"group_size={group_size} (kernel takes {INT4_GROUP_SIZES})"
        if layer.in_features % group_size:
            return f"in_features={layer.in_features} not divisible by group_size={group_size}"
        if dtype != torch.bfloat16:
            return f"input dtype {dtype} (fast kernels are bfloat16 only)"
        if device.type == "cpu":
            if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
                return "this torch has no _weight_int4pack_mm_for_cpu"
            if layer.out_features % 16:
                return f"out_features={layer.out_features} not a multiple of 16"
            return None
        if device.type == "cuda":
            if torch.cuda.get_device_capability(device) < (8, 0):
                return "CUDA int4 kernel needs compute capability >= 8.0"
            if layer.out_features % 8:
                return f"out_features={layer.out_features} not a multiple of 8"
            return None
        return f"device {device.type}"

    def prepare(self, module: Any, x2: torch.Tensor) -> Int4Weights | str:
        perm, ok = group_permutation(module.g_idx, module.group_size)
        if not ok:
            return "g_idx groups are not equal-sized blocks of group_size columns"
        codes = unpack_codes(module.qweight, module.bits, module.in_features)
        zeros = unpack_zeros(module.qzeros, module.bits, module.out_features)
        w = build_int4(codes, zeros, module.scales, perm, module.group_size, x2.device)
        if x2.device.type != "cpu":  # the CUDA layout is not testable on CPU hosts: verify once per module
            probes = matmul_probes(lambda x: int4_matmul(x, w), module._dequantize(x2.dtype), (4,))
            problem = self_check("int4 kernel", probes, "using the other paths", logger)
            if problem is not None:
                return problem
        return w

    def matmul(self, module: Any, x2: torch.Tensor, weights: Int4Weights, bias: torch.Tensor | None) -> torch.Tensor:
        y = int4_matmul(x2, weights)
        return y if bias is None else y.add_(bias)

"""Matmul paths for packed GPTQ weights: torch's int4 kernels (CPU / CUDA) and dequantize + dense (the
fused CPU kernel lives in ``cpu_fused.py``; ``qbase.PackedWeightModule._matmul`` chooses).

Policy on CPU, bf16 input, 4 bits: the fused kernel at every batch when the groups are consecutive columns,
otherwise (act-order) torch's int4 kernel up to ``CPU_INT4_MAX_BATCH["fused"]`` rows and the fused kernel
above; without the fused kernel, the int4 kernel up to the cached / uncached limit below, then dequantize +
dense. Other bits / dtypes: dequantize + dense.

The reference everywhere is "dequantize to ``x.dtype``, then the dense op": :func:`dequantize_packed`
computes ``scale * (code - zero)`` in float32 (``code - zero`` is exact, so one rounding) and casts once.

int4 kernels (``torch.ops.aten._weight_int4pack_mm[_for_cpu]``) compute, per group,
``w = (q - 8) * s + z_f`` from a ``scales_and_zeros[n_groups, out, 2]`` table (checked by experiment and in
the tests). Our grid ``w = s * (q - zero)`` maps to it exactly with ``z_f = s * (8 - zero)``.

When the kernels are used (see :func:`int4_unavailable_reason`): 4 bits, ``x`` in bfloat16 (CPU fp16 / fp32
kernels are scalar code, 10-100x slower than a dense matmul), group size 32/64/128/256 dividing
``in_features``, ``out_features`` a multiple of 16 (CPU) / 8 (CUDA), contiguous equal-sized groups after a
fixed act-order permutation, and a batch of at most :data:`CPU_INT4_MAX_BATCH` / :data:`CUDA_INT4_MAX_BATCH`
rows: the kernels are matrix-vector style and their cost grows linearly with the rows.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import torch

from .packing import unpack_rows

logger = logging.getLogger(__name__)

INT4_GROUP_SIZES = (32, 64, 128, 256)

# Largest batch (rows of x) sent to the int4 kernel; above it, dequantize + dense matmul wins.
# CPU, measured with bench/ops.py on this project's 2-core AMD EPYC host (torch 2.14, bf16 activations,
# 4096x4096, g128; ms per call, weights streamed from memory / hot in cache where they differ):
#   rows                          1            12     16           256
#   int4 kernel                   0.24 / 0.22  1.18   1.56 / 1.51  24.1 / 23.8   (~0.094 ms per row)
#   dense bf16 (= cached dequant) 1.48 / 0.96  1.19   1.68 / 1.29  9.76 / 9.55
#   dequantize + matmul           10.8-18.4    -      10.9-18.5    19.1-26.6     (dequantizing: 10-18 ms)
# so the kernel wins up to ~12 rows against a cached dense weight, and up to ~190-330 rows (the dequant
# time varies between runs) against dequantizing on every call (the default, see qmodules.py); at 256
# rows the two are within 15% of each other either way.
# Against the fused kernel (same host, bench/ops.py): its GEMM path at 1 / 4 / 8 rows takes 0.44 / 0.49 / 0.64
# ms vs the int4 kernel's 0.21 / 0.39 / 0.77, its small-batch path 0.11 ms at 1 row (act-order layers
# cannot use that path).
CPU_INT4_MAX_BATCH = {"cached": 10, "uncached": 192, "fused": 4, "fused_small_batch": 0}
# CUDA: estimated from the H200 figures in the project's anchor notes (18944x3584: int4 32 us vs bf16 54 us at
# M=1, 91 vs 57 us at M=16, 1207 vs 67 us at M=256) -- ~4 us per row; dequantizing in eager costs a few
# hundred us. Not re-measured (no GPU on the development host).
CUDA_INT4_MAX_BATCH = {"cached": 4, "uncached": 32}
_LITTLE_ENDIAN = sys.byteorder == "little"
_DEQUANT_CHUNK_ROWS = 128  # rows per fp32 work buffer in dequantize_packed (keeps it cache-resident)


def unpack_codes_t(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Codes transposed, ``[in, out]`` (uint8), straight from ``qweight``."""
    return unpack_rows(qweight, bits, in_features)


def unpack_codes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Codes ``[out, in]`` (uint8, contiguous). For 2/4/8 bits this reads ``qweight`` as bytes (each byte
    holds whole values, low bits first) instead of shifting int32 words: ~5x faster."""
    if bits == 3 or not _LITTLE_ENDIAN:
        return unpack_rows(qweight, bits, in_features).t().contiguous()
    words, out_f = qweight.shape
    per_byte = 8 // bits
    b = (
        qweight.contiguous()
        .view(torch.uint8)
        .view(words, out_f, 4)
        .permute(1, 0, 2)
        .reshape(out_f, words * 4)
    )
    if per_byte == 1:
        return b[:, :in_features].contiguous()
    codes = torch.empty(out_f, words * 4, per_byte, dtype=torch.uint8, device=qweight.device)
    mask = 2**bits - 1
    for j in range(per_byte):
        torch.bitwise_and(b >> (bits * j) if j else b, mask, out=codes[..., j])
    return codes.view(out_f, -1)[:, :in_features]


def unpack_zeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Zero points ``[n_groups, out]`` (int32) from v1 ``qzeros`` (stored ``zero - 1``)."""
    stored = unpack_rows(qzeros.t().contiguous(), bits, out_features).t()
    return (stored.to(torch.int32) + 1) & (2**bits - 1)


def contiguous_groups(g_idx: torch.Tensor, group_size: int) -> bool:
    """True when ``g_idx == col // group_size`` (no act-order permutation)."""
    if group_size == -1:
        return bool((g_idx == 0).all())
    cols = torch.arange(g_idx.numel(), device=g_idx.device, dtype=torch.int64)
    return bool((g_idx.long() == cols // group_size).all())


def dequantize_packed(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    *,
    bits: int,
    in_features: int,
    out_features: int,
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The weight ``[out, in]`` (contiguous) in ``dtype``: ``scale * (code - zero)`` computed in float32
    (``code - zero`` is exact, so a single rounding) and cast once, chunk by chunk of rows."""
    codes = unpack_codes(qweight, bits, in_features)
    zeros = unpack_zeros(qzeros, bits, out_features).t().float()  # [out, G]
    s = scales.t().float()
    out = torch.empty(out_features, in_features, dtype=dtype, device=qweight.device)
    g = in_features if group_size == -1 else group_size
    full = in_features // g
    regular = contiguous_groups(g_idx, group_size)
    idx = None if regular else g_idx.long()
    buf = torch.empty(min(_DEQUANT_CHUNK_ROWS, out_features), in_features, device=qweight.device)
    for r1 in range(0, out_features, _DEQUANT_CHUNK_ROWS):
        r2 = min(r1 + _DEQUANT_CHUNK_ROWS, out_features)
        b, c, o = buf[: r2 - r1], codes[r1:r2], out[r1:r2]
        if regular:
            nb = full * g
            torch.sub(c[:, :nb].view(-1, full, g), zeros[r1:r2, :full, None], out=b[:, :nb].view(-1, full, g))
            b[:, :nb].view(-1, full, g).mul_(s[r1:r2, :full, None])
            if nb < in_features:
                torch.sub(c[:, nb:], zeros[r1:r2, full:], out=b[:, nb:]).mul_(s[r1:r2, full:])
        else:
            torch.sub(c, zeros[r1:r2][:, idx], out=b).mul_(s[r1:r2][:, idx])
        o.copy_(b)
    return out


@dataclass
class Int4Weights:
    """A layer in one of torch's int4 kernel formats (built once, reused every call)."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    perm: torch.Tensor | None  # input permutation making groups contiguous (act-order), or None
    group_size: int
    out_features: int
    device_type: str


def int4_unavailable_reason(
    bits: int, group_size: int, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device
) -> str | None:
    """Why the int4 kernel cannot serve this layer / input (None when it can, g_idx aside)."""
    if bits != 4:
        return f"bits={bits} (kernel is 4-bit only)"
    if group_size not in INT4_GROUP_SIZES:
        return f"group_size={group_size} (kernel takes {INT4_GROUP_SIZES})"
    if in_features % group_size:
        return f"in_features={in_features} not divisible by group_size={group_size}"
    if dtype != torch.bfloat16:
        return f"input dtype {dtype} (fast kernels are bfloat16 only)"
    if device.type == "cpu":
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return "this torch has no _weight_int4pack_mm_for_cpu"
        if out_features % 16:
            return f"out_features={out_features} not a multiple of 16"
        return None
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 0):
            return "CUDA int4 kernel needs compute capability >= 8.0"
        if out_features % 8:
            return f"out_features={out_features} not a multiple of 8"
        return None
    return f"device {device.type}"


def int4_max_batch(device_type: str, alternative: str) -> int:
    """Largest batch sent to the int4 kernel, given what else serves the layer: ``"cached"`` (a dense weight
    is kept), ``"uncached"`` (dequantize on every call), or on CPU the fused kernel of ``cpu_fused.py``,
    ``"fused"`` (act-order layers: its GEMM path only) or ``"fused_small_batch"`` (its matrix-vector path
    too, which beats the int4 kernel at every batch)."""
    if device_type == "cuda":
        return CUDA_INT4_MAX_BATCH["cached" if alternative == "cached" else "uncached"]
    return CPU_INT4_MAX_BATCH[alternative]


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

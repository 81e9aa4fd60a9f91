"""GPTQ checkpoint layout ("gptq" format, v1 zeros) <-> codes / scales / zeros / g_idx, and the readers of
that layout the kernels and exports share (:func:`unpack_codes`, :func:`unpack_zeros`,
:func:`contiguous_groups`, :func:`dequantize_packed`: the reference weight).

Tensors written by :func:`pack_gptq` (``n_groups = scales.shape[1]``):

* ``qweight`` int32 ``[in_pad * bits / 32, out]``: codes packed along the input dim;
* ``qzeros``  int32 ``[n_groups, out_pad * bits / 32]``: ``(zero - 1) mod 2**bits`` packed along the output
  dim (v1 convention: readers add 1 back);
* ``scales``  float16 ``[n_groups, out]``;
* ``g_idx``   int32 ``[in]``: group of each input column.

Bit order: values form one little-endian bit stream per packed column, value ``j`` at bits
``[j*bits, (j+1)*bits)``, word ``k`` holding stream bits ``[32k, 32k+32)``. For 2/4/8 bits that is
"low bits first within each int32"; for 3 bits, 32 values fill 3 words and values 10 and 21 straddle word
boundaries (the GPTQ reference packing).

Padding: ``in_pad`` / ``out_pad`` round ``in`` / ``out`` up to a multiple of ``32 / bits`` (bits 2, 4, 8)
or of 32 (bits 3). Padded qweight entries hold code 0 and padded qzeros entries hold stored value 0
(i.e. zero point 1); :func:`unpack_gptq` drops them.

v1 caveat: an asymmetric zero point of 0 is stored as ``2**bits - 1``; :func:`unpack_gptq` restores 0 by
wrapping modulo ``2**bits`` (readers that add 1 without wrapping see ``2**bits``).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Iterator

import torch

from . import cpu_dequant
from .grid import check_bits
from .selfcheck import self_check

logger = logging.getLogger(__name__)

_MASK32 = 0xFFFFFFFF
_LITTLE_ENDIAN = sys.byteorder == "little"
_DEQUANT_CHUNK_ROWS = 128  # rows per fp32 work buffer in dequantize_packed (keeps it cache-resident)

PACKED_BUFFERS = ("qweight", "qzeros", "scales", "g_idx")
"""The packed tensors of one quantized weight, in checkpoint order (the one list the package uses)."""


def pack_unit(bits: int) -> tuple[int, int]:
    """(values, words) of one packing unit: 32/bits values per word, or 32 values in 3 words for 3 bits."""
    check_bits(bits)
    return (32, 3) if bits == 3 else (32 // bits, 1)


def padded_size(n: int, bits: int) -> int:
    """``n`` rounded up to a whole packing unit."""
    vals, _ = pack_unit(bits)
    return -(-n // vals) * vals


def packed_rows(n: int, bits: int) -> int:
    """Number of int32 words holding ``n`` values (after padding)."""
    return padded_size(n, bits) * bits // 32


def _slots(bits: int) -> list[tuple[int, int, int]]:
    """(word, shift, spill) for each value of a unit; spill > 0 means the top bits go to the next word."""
    vals, _ = pack_unit(bits)
    out = []
    for j in range(vals):
        word, shift = divmod(j * bits, 32)
        out.append((word, shift, max(0, shift + bits - 32)))
    return out


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``values[n, m]`` (ints in ``[0, 2**bits)``) along dim 0 into int32 ``[packed_rows(n), m]``."""
    vals, words = pack_unit(bits)
    n, m = values.shape
    if words == 1:  # 2/4/8 bits: int32 shifts and ORs (the top value's bits wrap into the sign bit, as stored)
        v = torch.zeros(padded_size(n, bits), m, dtype=torch.int32, device=values.device)
        v[:n] = values
        v = v.view(-1, vals, m)
        packed = v[:, 0].clone()
        for j in range(1, vals):
            packed |= v[:, j] << (j * bits)
        return packed
    v = torch.zeros(padded_size(n, bits), m, dtype=torch.int64, device=values.device)
    v[:n] = values.to(torch.int64)
    v = v.view(-1, vals, m)
    acc = torch.zeros(v.shape[0], words, m, dtype=torch.int64, device=values.device)
    for j, (word, shift, spill) in enumerate(_slots(bits)):
        acc[:, word] |= (v[:, j] << shift) & _MASK32
        if spill:
            acc[:, word + 1] |= v[:, j] >> (bits - spill)
    acc = acc.view(-1, m)
    acc = torch.where(acc >= 2**31, acc - 2**32, acc)  # two's complement wrap into int32
    return acc.to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 ``[words, m]`` -> uint8 values ``[n, m]``."""
    vals, words = pack_unit(bits)
    mask = 2**bits - 1
    if words == 1:  # fast path: plain shifts of int32 (arithmetic shift is harmless after masking)
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device).view(1, -1, 1)
        out = (packed.unsqueeze(1) >> shifts) & mask
        return out.reshape(-1, packed.shape[1])[:n].to(torch.uint8)
    p = (packed.to(torch.int64) & _MASK32).view(-1, words, packed.shape[1])
    out = torch.empty(p.shape[0], vals, packed.shape[1], dtype=torch.int64, device=packed.device)
    for j, (word, shift, spill) in enumerate(_slots(bits)):
        v = p[:, word] >> shift
        if spill:
            v = v | (p[:, word + 1] << (bits - spill))
        out[:, j] = v & mask
    return out.reshape(-1, packed.shape[1])[:n].to(torch.uint8)


def _check_int_range(t: torch.Tensor, name: str, hi: int) -> None:
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > hi):
        raise ValueError(f"{name} values must lie in [0, {hi}], got range [{int(t.min())}, {int(t.max())}]")


def pack_gptq(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int
) -> dict[str, torch.Tensor]:
    """Pack ``codes[out, in]``, ``scales[out, G]``, ``zeros[out, G]``, ``g_idx[in]`` into the GPTQ tensors."""
    check_bits(bits)
    maxq = 2**bits - 1
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [out, in], got shape {tuple(codes.shape)}")
    out_f, in_f = codes.shape
    if scales.dim() != 2 or scales.shape[0] != out_f or scales.shape[1] < 1:
        raise ValueError(f"scales must be [out={out_f}, n_groups], got shape {tuple(scales.shape)}")
    n_groups = scales.shape[1]
    if tuple(zeros.shape) != tuple(scales.shape):
        raise ValueError(
            f"zeros must have the shape of scales {tuple(scales.shape)}, got {tuple(zeros.shape)}"
        )
    if tuple(g_idx.shape) != (in_f,):
        raise ValueError(f"g_idx must be [in={in_f}], got shape {tuple(g_idx.shape)}")
    _check_int_range(codes, "codes", maxq)
    _check_int_range(zeros, "zeros", maxq)
    _check_int_range(g_idx, "g_idx", n_groups - 1)
    if not scales.is_floating_point() or not torch.isfinite(scales).all():
        raise ValueError("scales must be a finite floating tensor")
    scales16 = scales.t().to(torch.float16).contiguous()
    if not torch.isfinite(scales16).all():
        raise ValueError(f"scales overflow float16 (max |scale| = {scales.abs().max().item():.4g})")
    if bool(((scales16 == 0) & (scales.t() != 0)).any()):
        logger.warning("some scales underflow to 0 in float16; those groups dequantize to 0")
    stored_zeros = (zeros.to(torch.int64) - 1) & maxq  # v1: zero - 1, wrapped to the code range
    return {
        "qweight": pack_rows(codes.t(), bits),
        "qzeros": pack_rows(stored_zeros, bits).t().contiguous(),  # packed along out
        "scales": scales16,
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def unpack_gptq(
    tensors: dict[str, torch.Tensor], in_features: int, out_features: int, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_gptq`: ``(codes uint8 [out, in], scales fp32 [out, G], zeros int32 [out, G],
    g_idx int32 [in])``."""
    check_bits(bits)
    for name in PACKED_BUFFERS:
        if name not in tensors:
            raise ValueError(f"tensors is missing {name!r}")
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {name}={v!r}")
    qweight, qzeros, scales, g_idx = (tensors[k] for k in PACKED_BUFFERS)
    if qweight.dtype != torch.int32 or tuple(qweight.shape) != (packed_rows(in_features, bits), out_features):
        raise ValueError(
            f"qweight must be int32 [{packed_rows(in_features, bits)}, {out_features}], "
            f"got {qweight.dtype} {tuple(qweight.shape)}"
        )
    if scales.dim() != 2 or scales.shape[1] != out_features or scales.shape[0] < 1:
        raise ValueError(f"scales must be [n_groups, {out_features}], got shape {tuple(scales.shape)}")
    n_groups = scales.shape[0]
    zshape = (n_groups, packed_rows(out_features, bits))
    if qzeros.dtype != torch.int32 or tuple(qzeros.shape) != zshape:
        raise ValueError(f"qzeros must be int32 {list(zshape)}, got {qzeros.dtype} {tuple(qzeros.shape)}")
    if tuple(g_idx.shape) != (in_features,):
        raise ValueError(f"g_idx must be [{in_features}], got shape {tuple(g_idx.shape)}")
    _check_int_range(g_idx, "g_idx", n_groups - 1)
    codes = unpack_codes(qweight, bits, in_features)
    zeros = unpack_zeros(qzeros, bits, out_features).t().contiguous()
    return codes, scales.t().float().contiguous(), zeros, g_idx.to(torch.int32)


def unpack_codes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Codes ``[out, in]`` (uint8, contiguous) from ``qweight``. For 2/4/8 bits this reads ``qweight`` as
    bytes (each byte holds whole values, low bits first) instead of shifting int32 words."""
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
    codes = codes.view(out_f, -1)
    return codes if codes.shape[1] == in_features else codes[:, :in_features].contiguous()


def unpack_zeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Zero points ``[n_groups, out]`` (int32) from v1 ``qzeros`` (stored ``zero - 1``, wrapped)."""
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
    (``code - zero`` is exact, so a single rounding) and cast once. This is the reference every matmul path
    of the packed modules must match. On the CPU the C kernel of ``cpu_dequant.py`` computes it where it
    serves the layer and passed its self-check (bit for bit the torch path's result), else the torch path."""
    args = (qweight, qzeros, scales, g_idx, bits, in_features, out_features, dtype)
    if cpu_dequant.serves(*args):
        fn = cpu_dequant.checked_kernel(_dequant_kernel_check)
        if fn is not None:
            return cpu_dequant.call(fn, *args)
    return _dequantize_torch(*args, group_size)


def _dequantize_torch(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                      bits: int, in_features: int, out_features: int, dtype: torch.dtype,
                      group_size: int) -> torch.Tensor:
    """:func:`dequantize_packed` in torch, chunk by chunk of rows (any device, any bit width)."""
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


# (bits, in, out, group_size, act_order): the kernel's 8 x 8 blocks, partial groups, input widths and output
# widths not multiples of 8, one row, and a layer large enough for several threads
_DEQUANT_PROBES = (
    (4, 160, 24, 64, False),
    (4, 100, 13, 32, True),
    (2, 75, 40, 32, False),
    (2, 128, 16, 64, True),
    (8, 96, 20, -1, False),
    (8, 44, 1, 16, True),
    (4, 520, 520, 128, True),
)
_BITS_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _dequant_probes(fn) -> Iterator[Callable[[], str | None]]:
    gen = torch.Generator().manual_seed(4321)
    for bits, in_f, out_f, group_size, act_order in _DEQUANT_PROBES:
        n_groups = 1 if group_size == -1 else -(-in_f // group_size)
        codes = torch.randint(0, 2**bits, (out_f, in_f), generator=gen, dtype=torch.int32)
        zeros = torch.randint(0, 2**bits, (out_f, n_groups), generator=gen, dtype=torch.int32)
        # signs and magnitudes over float16's range: subnormal and overflowing float16 / bfloat16 outputs
        exps = torch.randint(-24, 13, (out_f, n_groups), generator=gen).float()
        scales = (torch.randn(out_f, n_groups, generator=gen) * exps.exp2()).clamp(-6e4, 6e4)
        scales = torch.where(scales.abs() < 2**-23, 2**-23, scales)  # none underflows float16
        g_idx = torch.arange(in_f, dtype=torch.int32) // (in_f if group_size == -1 else group_size)
        if act_order:
            g_idx = g_idx[torch.randperm(in_f, generator=gen)].contiguous()
        packed = pack_gptq(codes, scales, zeros, g_idx, bits)
        args = (packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits, in_f, out_f)
        for dtype, view in _BITS_VIEW.items():
            yield functools.partial(_dequant_probe, fn, args, dtype, view, group_size)


def _dequant_probe(fn, args: tuple, dtype: torch.dtype, view: torch.dtype, group_size: int) -> str | None:
    got = cpu_dequant.call(fn, *args, dtype).view(view)
    ref = _dequantize_torch(*args, dtype, group_size).view(view)
    if torch.equal(got, ref):
        return None
    bits, in_f, out_f = args[4:]
    return f"{int((got != ref).sum())} values differ, {bits}-bit {out_f}x{in_f} group {group_size}, {dtype}"


def _dequant_kernel_check(fn) -> str | None:
    """The dequantization kernel against the torch path on probe layers, bit for bit (once per process)."""
    return self_check("CPU dequantization kernel", _dequant_probes(fn), "not used in this process", logger)

"""The quantization grid: per-row scale / zero point, codes, and the way back.

Conventions (docs/ARCHITECTURE.md, "Conventions"): codes are unsigned integers in ``[0, 2**bits - 1]`` and
``w ≈ scale * (code - zero)``.

* symmetric: ``zero = 2**(bits-1)``, ``scale = absmax / (2**(bits-1) - 1)``; code 0 (the value
  ``-2**(bits-1) * scale``) is then only reached by clipping, so a 4-bit row has 15 levels in use;
* symmetric, full range (``full_range=True``; the AutoGPTQ / IST-DASLab grid): ``zero = 2**(bits-1)``,
  ``scale = 2 * absmax / (2**bits - 1)`` (4 bits: ``2 * absmax / 15``), so all ``2**bits`` codes are used
  and the largest positive value is clipped by half a step;
* asymmetric: the range is widened to include 0, ``scale = (max - min) / (2**bits - 1)``,
  ``zero = round(-min / scale)``.

An all-zero row would give ``scale == 0``; it gets the range [-1, 1] instead (GPTQ reference behaviour), so
``scale`` is never 0 and such a row dequantizes to exact zeros.

MSE clip search (``clip=True``): the range is shrunk by ``p = 1.00, 0.99, ..., 0.21`` and each row keeps the
scale that minimises ``sum |dequant(quant(x)) - x| ** 2.4``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from . import cpu_clip
from .selfcheck import self_check

logger = logging.getLogger(__name__)

SUPPORTED_BITS = (2, 3, 4, 8)
CLIP_NORM = 2.4
CLIP_STEPS = 80  # shrink factors 1.00 down to 0.21 in steps of 0.01
CLIP_GRID = 100
# rows x cols elements the clip search takes at once, and rows x cols x shrink factors per pass (temporaries
# that stay in the CPU's caches)
_CLIP_CHUNK_ELEMS = 1 << 23
_CLIP_PASS_ELEMS = 1 << 16


def check_bits(bits: object) -> int:
    """Validate ``bits`` (2, 3, 4 or 8) and return it."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got bits={bits!r}")
    return bits


def check_group_size(group_size: object) -> int:
    """Validate ``group_size`` (-1 for per-channel, or a positive int) and return it."""
    if (
        isinstance(group_size, bool)
        or not isinstance(group_size, int)
        or (group_size != -1 and group_size <= 0)
    ):
        raise ValueError(f"group_size must be -1 or a positive int, got group_size={group_size!r}")
    return group_size


def num_groups(in_features: int, group_size: int) -> int:
    """Number of groups along the input dim (the last one may be partial)."""
    return 1 if group_size == -1 else -(-in_features // group_size)


def _per_row(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-row vector against ``like``: [rows] -> [rows, 1] when ``like`` is 2-D."""
    return t.unsqueeze(-1) if t.dim() < like.dim() else t


def _quant_dequant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def check_full_range(full_range: object) -> bool:
    if not isinstance(full_range, bool):
        raise ValueError(f"full_range must be a bool, got full_range={full_range!r}")
    return full_range


def _range_params(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool, full_range: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for the (already widened, non-degenerate) range [xmin, xmax]."""
    maxq = 2**bits - 1
    if sym:
        absmax = torch.maximum(-xmin, xmax)
        scale = 2 * absmax / maxq if full_range else absmax / (2 ** (bits - 1) - 1)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        scale = (xmax - xmin) / maxq
        zero = torch.round(-xmin / scale)
    return scale, zero


def find_params(
    w: torch.Tensor, bits: int, sym: bool, clip: bool = False, full_range: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row grid parameters of ``w[rows, cols]``: ``(scale[rows], zero[rows])`` in ``w``'s float dtype.

    ``zero`` holds integral values (kept as float for the arithmetic); ``scale`` is never 0. ``full_range``
    picks the symmetric grid that uses all ``2**bits`` codes (ignored when ``sym`` is False).
    """
    check_bits(bits)
    check_full_range(full_range)
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [rows, cols], got shape {tuple(w.shape)}")
    x = w if w.is_floating_point() else w.float()
    zeros = torch.zeros((), dtype=x.dtype, device=x.device)
    xmin = torch.minimum(x.amin(dim=1), zeros)
    xmax = torch.maximum(x.amax(dim=1), zeros)
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, -1.0, xmin)
    xmax = torch.where(dead, 1.0, xmax)
    scale, zero = _range_params(xmin, xmax, bits, sym, full_range)
    if not clip:
        return scale, zero
    return _clip_search(x, xmin, xmax, bits, sym, full_range)


def clip_candidates(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool,
                    full_range: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros ``[CLIP_STEPS, rows]`` of the shrunk ranges ``p * [xmin, xmax]``, p = 1.00, 0.99, ..."""
    shrink = torch.tensor([1 - i / CLIP_GRID for i in range(CLIP_STEPS)], dtype=xmin.dtype, device=xmin.device)
    return _range_params(shrink[:, None] * xmin, shrink[:, None] * xmax, bits, sym, full_range)


def clip_errors(x: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, maxq: int) -> torch.Tensor:
    """``[steps, rows]``: each candidate's ``sum |dequant(quant(x)) - x| ** 2.4`` over a row, computed as
    ``s ** 2.4 * sum |q - x / s| ** 2.4`` (``q`` the clamped, rounded ``x / s`` minus the zero point: no
    dequantized copy) with ``|.| ** 2.4`` as ``exp(2.4 log |.|)`` (``pow`` with a fractional exponent is
    several times slower), several candidates per pass."""
    low, high = -zeros.unsqueeze(-1), (maxq - zeros).unsqueeze(-1)  # code bounds after subtracting zero
    errors = torch.empty_like(scales)
    rows = x.shape[0]
    rows_per_chunk = max(1, _CLIP_CHUNK_ELEMS // max(1, x.shape[1]))
    for r0 in range(0, rows, rows_per_chunk):
        chunk = slice(r0, min(r0 + rows_per_chunk, rows))
        xc = x[chunk]
        steps = max(1, _CLIP_PASS_ELEMS // max(1, xc.numel()))  # candidates per pass
        for k0 in range(0, scales.shape[0], steps):
            k = slice(k0, k0 + steps)
            ratio = torch.div(xc, scales[k, chunk, None])
            err = torch.clamp(torch.round(ratio), low[k, chunk], high[k, chunk]).sub_(ratio).abs_()
            errors[k, chunk] = err.log_().mul_(CLIP_NORM).exp_().sum(-1).mul_(scales[k, chunk].pow(CLIP_NORM))
    return errors


def _clip_search(x: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool,
                 full_range: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The MSE clip search of :func:`find_params` (module docstring): each row keeps the first candidate of
    least error, as a one-at-a-time loop over ``p = 1.00, 0.99, ...`` with a strict ``<`` does. Float32 rows
    on a CPU with AVX2 go through ``cpu_clip.py`` when its kernel passed its self-check."""
    maxq = 2**bits - 1
    scales, zeros = clip_candidates(xmin, xmax, bits, sym, full_range)
    fn = cpu_clip.checked_kernel(_clip_kernel_check) if x.dtype == torch.float32 and x.device.type == "cpu" else None
    if fn is not None and x.shape[0]:
        best = cpu_clip.call(fn, x, scales, zeros, maxq, CLIP_NORM)
    else:
        best = clip_errors(x, scales, zeros, maxq).argmin(0)  # the first of equal errors
    picked = torch.arange(x.shape[0], device=x.device)
    return scales[best, picked], zeros[best, picked]


def _clip_probes(fn) -> Iterator[Callable[[], str | None]]:
    gen = torch.Generator().manual_seed(7)
    for bits, sym, rows, cols in ((4, True, 37, 128), (3, False, 20, 61), (2, True, 9, 7), (8, False, 5, 300)):
        def probe(bits=bits, sym=sym, rows=rows, cols=cols) -> str | None:
            x = torch.randn(rows, cols, generator=gen) * torch.rand(rows, 1, generator=gen).add_(0.01)
            x[0, 0] = 30.0  # an outlier, so clipping wins somewhere
            x[1, : cols // 2] = 0.0  # exact zeros: |q - x / s| = 0
            xmin = torch.minimum(x.amin(dim=1), torch.zeros(()))
            xmax = torch.maximum(x.amax(dim=1), torch.zeros(()))
            scales, zeros = clip_candidates(xmin, xmax, bits, sym, False)
            errors = clip_errors(x, scales, zeros, 2**bits - 1)
            picked = cpu_clip.call(fn, x, scales, zeros, 2**bits - 1, CLIP_NORM)
            got = errors.gather(0, picked.unsqueeze(0)).squeeze(0)
            least = errors.min(0).values
            if not bool((got <= least * (1 + 1e-5) + 1e-30).all()):
                return f"picked a candidate {float((got / least).max()):.6g}x the least error ({bits} bits, sym={sym})"
            return None
        yield probe


def _clip_kernel_check(fn) -> str | None:
    """The clip-search kernel against :func:`clip_errors` on probe rows (once per process)."""
    return self_check("CPU clip-search kernel", _clip_probes(fn), "not used in this process", logger)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``clamp(round(w / scale) + zero, 0, 2**bits - 1)`` as uint8.

    ``scale`` / ``zero`` of shape [rows] apply per row of a 2-D ``w``; otherwise they broadcast as given.
    """
    check_bits(bits)
    scale, zero = _per_row(scale, w), _per_row(zero, w)
    q = torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)
    return q.to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``scale * (codes - zero)`` in ``scale``'s dtype (per-row broadcast as in :func:`quantize_codes`)."""
    scale, zero = _per_row(scale, codes), _per_row(zero, codes)
    return scale * (codes.to(scale.dtype) - zero.to(scale.dtype))


@dataclass(frozen=True)
class QuantGrid:
    """A ``bits`` / ``sym`` grid; thin object form of the free functions above."""

    bits: int
    sym: bool = True
    full_range: bool = False

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_full_range(self.full_range)

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def find_params(self, w: torch.Tensor, clip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return find_params(w, self.bits, self.sym, clip, self.full_range)

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return quantize_codes(w, scale, zero, self.bits)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return dequantize(codes, scale, zero)

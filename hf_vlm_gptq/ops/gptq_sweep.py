"""GPTQ's column sweep (``gptq.py``'s algorithm, module docstring there): the torch loop over the columns of
each block, with each group's columns handed to the CPU kernel (``cpu_gptq.py``) once it passed its check
against that loop here."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator

import torch

from . import cpu_gptq
from .gptq_matrices import gptaq_correction, upper_inverse_cholesky
from .grid import find_params, num_groups
from .selfcheck import self_check

logger = logging.getLogger(__name__)

_SUB_BLOCK = 16  # columns per rank-1-updated sub-block inside a block
KERNEL_AGREEMENT = 0.99  # share of equal codes on the CPU kernel's small probe layers (a flip moves the later columns)


def _cut_points(start: int, stop: int, step: int, group_size: int) -> list[int]:
    """Sub-block boundaries in [start, stop]: multiples of ``step`` from start, plus every group start."""
    points = set(range(start, stop, step)) | {stop}
    if group_size > 0:
        points |= set(range(-(-start // group_size) * group_size, stop, group_size))
    return sorted(points)


def _gptq_columns(
    w: torch.Tensor, u: torch.Tensor, bits: int, group_size: int, sym: bool, clip: bool, block_size: int,
    full_range: bool = False, p: torch.Tensor | None = None, kernel: Callable | None = None,
    energy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GPTQ sweep over ``w[out, n]`` (columns in processing order; not modified).

    ``p``: GPTAQ's asymmetry matrix (:func:`gptaq_correction`, processing order) or None. ``kernel``: the
    CPU column kernel (``cpu_gptq.py``) that runs each group's columns in one call, or None for the torch loop.
    ``energy`` (float ``[out]``, optional): each row's sum of squared scaled errors ``E_j = (w_j - q_j) /
    u_jj`` is added to it (without GPTAQ, ``(W - Q) (h + damp I) (W - Q)^T`` per row: ``W - Q = E U``).
    Returns ``codes uint8 [out, n]``, ``scales [out, G]``, ``zeros [out, G]`` (float, w's dtype) and the
    dequantized weight transposed, ``q_t [n, out]``.
    """
    out_f, n = w.shape
    maxq = 2**bits - 1
    if kernel is not None:  # it reads rows of u and p
        u, p = u.contiguous(), None if p is None else p.contiguous()
    # private transposed copy (row j = column j). Row j is dead once column j is quantized, so it is
    # overwritten with the dequantized column: at the end wt holds Q^T.
    wt = torch.empty(n, out_f, dtype=w.dtype, device=w.device).copy_(w.t())
    codes_t = torch.empty(n, out_f, dtype=torch.uint8, device=wt.device)
    n_groups = num_groups(n, group_size)
    scales = torch.empty(n_groups, out_f, dtype=wt.dtype, device=wt.device)
    zeros = torch.empty_like(scales)
    if group_size == -1:
        scale, zero = find_params(wt.t(), bits, sym, clip, full_range)
        scales[0], zeros[0] = scale, zero
    block = block_size if group_size == -1 else group_size * max(1, block_size // group_size)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1, u1 = wt[i1:i2], u[i1:i2, i1:i2]
        err1 = torch.empty_like(w1)
        pre1 = torch.empty_like(w1) if p is not None else None  # GPTAQ: the columns before rounding
        p1 = p[i1:i2, i1:i2] if p is not None else None
        # the kernel updates a whole range as it goes: cut at group starts only
        cuts = _cut_points(i1, i2, i2 - i1 if kernel is not None else _SUB_BLOCK, group_size)
        for s1, s2 in itertools.pairwise(cuts):
            if group_size > 0 and s1 % group_size == 0:
                gi = s1 // group_size
                scale, zero = find_params(wt[s1 : min(s1 + group_size, n)].t(), bits, sym, clip, full_range)
                scales[gi], zeros[gi] = scale, zero
            a, b = s1 - i1, s2 - i1
            if kernel is not None:
                cpu_gptq.call(kernel, w1[a:b], u1[a:b, a:b], scale, zero, maxq, codes_t[i1 + a : i1 + b], err1[a:b],
                              None if pre1 is None else pre1[a:b], None if p1 is None else p1[a:b, a:b])
            else:
                _columns_torch(w1, u1, a, b, scale, zero, maxq, codes_t[i1:i2], err1, pre1, p1)
            if b < i2 - i1:
                w1[b:].addmm_(u1[a:b, b:].t(), err1[a:b], alpha=-1)
                if pre1 is not None:
                    w1[b:].addmm_(p1[a:b, b:].t(), pre1[a:b])
        if energy is not None:
            energy += err1.square().sum(0)  # a block's column sums in w's dtype, their running total in energy's
        if i2 < n:
            wt[i2:].addmm_(u[i1:i2, i2:].t(), err1, alpha=-1)
            if pre1 is not None:
                wt[i2:].addmm_(p[i1:i2, i2:].t(), pre1)
    return codes_t.t().contiguous(), scales.t().contiguous(), zeros.t().contiguous(), wt


def _columns_torch(w1: torch.Tensor, u1: torch.Tensor, a: int, b: int, scale: torch.Tensor, zero: torch.Tensor,
                   maxq: int, codes1: torch.Tensor, err1: torch.Tensor, pre1: torch.Tensor | None,
                   p1: torch.Tensor | None) -> None:
    """The columns ``a..b-1`` of one block (rows of ``w1``, in place), one at a time, with the rank-1 updates
    inside the range; what the CPU kernel does in one call."""
    for j in range(a, b):
        col = w1[j]
        code = torch.clamp(torch.round(col / scale) + zero, 0, maxq)
        codes1[j] = code
        q = (code - zero).mul_(scale)
        torch.sub(col, q, out=err1[j]).div_(u1[j, j])
        if pre1 is not None:
            pre1[j].copy_(col)
        col.copy_(q)
        if j + 1 < b:
            w1[j + 1 : b].addr_(u1[j, j + 1 : b], err1[j], alpha=-1)
            if pre1 is not None:
                w1[j + 1 : b].addr_(p1[j, j + 1 : b], pre1[j])


def _cpu_kernel(w: torch.Tensor) -> Callable | None:
    """The CPU column kernel for float32 CPU weights once it passed its check in this process, else None."""
    if w.device.type != "cpu" or w.dtype != torch.float32:
        return None
    return cpu_gptq.checked_kernel(_cpu_kernel_check)


def _cpu_kernel_probes(fn) -> Iterator[Callable[[], str | None]]:
    gen = torch.Generator().manual_seed(11)
    for bits, group, sym, gptaq, out, n in ((4, 32, True, False, 45, 70), (3, 16, False, True, 300, 64),
                                             (8, -1, True, False, 9, 40)):
        def probe(bits=bits, group=group, sym=sym, gptaq=gptaq, out=out, n=n) -> str | None:
            w = torch.randn(out, n, generator=gen)
            x = torch.randn(4 * n, n, generator=gen)
            h = x.t() @ x / x.shape[0]
            u = upper_inverse_cholesky(h, 0.01 * float(h.diagonal().mean()))
            p = gptaq_correction(0.1 * torch.randn(n, n, generator=gen) @ h, u) if gptaq else None
            ref = _gptq_columns(w, u, bits, group, sym, True, 32, p=p)
            got = _gptq_columns(w, u, bits, group, sym, True, 32, p=p, kernel=fn)
            agreement = float((ref[0] == got[0]).float().mean())
            if agreement < KERNEL_AGREEMENT or not bool(torch.allclose(got[3], ref[3], rtol=1e-3, atol=1e-3)):
                return (f"its sweep disagrees with the torch loop ({bits} bits, group {group}, GPTAQ {gptaq}): "
                        f"{agreement:.4f} of codes equal")
            return None
        yield probe


def _cpu_kernel_check(fn) -> str | None:
    """The CPU column kernel against the torch loop on probe layers (once per process)."""
    return self_check("CPU GPTQ column kernel", _cpu_kernel_probes(fn), "using the torch loop", logger)

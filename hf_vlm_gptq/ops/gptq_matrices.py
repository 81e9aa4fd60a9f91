"""The matrices GPTQ's column sweep (``gptq.py``) is built from: the group-aware column order, the upper
inverse Cholesky factor ``U`` of the damped Hessian, and GPTAQ's correction ``P`` (see ``gptq.py``'s module
docstring for the algorithm they serve)."""

from __future__ import annotations

import torch

from . import dense
from .result import all_finite

__all__ = ["GPTAQ_ALPHA", "cholesky_lower", "gptaq_correction", "group_aware_order", "lower_inverse", "upper_inverse_cholesky"]

GPTAQ_ALPHA = 0.25  # the published default scale of the asymmetry term


def group_aware_order(diag: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-aware column order for ``diag`` = ``diag(H)`` [n]: ``(perm [n], group_perm [G])``.

    ``perm[pos]`` is the column solved at position ``pos``; the groups (``col // group_size``) stay
    contiguous, taken in ``group_perm`` order: full groups by decreasing largest ``diag``, a partial last
    group last; inside a group columns go by decreasing ``diag``. Sorts are stable (ties keep column
    order). One group (``group_size`` -1 or >= n): ``perm`` is act-order's ``argsort(diag, descending)``.
    """
    n = diag.shape[0]
    if group_size == -1 or group_size >= n:
        return torch.argsort(diag, descending=True, stable=True), torch.zeros(1, dtype=torch.long, device=diag.device)
    full = n // group_size
    blocks = diag[: full * group_size].view(full, group_size)
    group_perm = torch.argsort(blocks.amax(1), descending=True, stable=True)
    within = torch.argsort(blocks, dim=1, descending=True, stable=True)
    starts = torch.arange(full, device=diag.device).unsqueeze(1) * group_size
    perm = (within + starts)[group_perm].reshape(-1)
    if full * group_size < n:
        tail = diag[full * group_size :]
        perm = torch.cat([perm, full * group_size + torch.argsort(tail, descending=True, stable=True)])
        group_perm = torch.cat([group_perm, torch.tensor([full], device=diag.device)])
    return perm, group_perm


def gptaq_correction(cross: torch.Tensor, u: torch.Tensor, alpha: float = GPTAQ_ALPHA) -> torch.Tensor:
    """GPTAQ's ``P = alpha * triu(cross @ U^T, 1) @ U`` (strictly upper triangular; see the module docstring)."""
    return dense.mm(torch.triu(dense.linear(cross, u), diagonal=1), u).mul_(alpha)


_LEAF = 256  # below this LAPACK's factorisation / a triangular solve against the identity; above, halves


def cholesky_lower(a: torch.Tensor) -> torch.Tensor | None:
    """The lower Cholesky factor ``L`` (``L L^T = a``) of a symmetric ``a`` (its lower triangle is read), or
    None when a pivot is not positive. Where float32 CPU products run on oneDNN (``dense.py``) a large ``a``
    goes by halves, ``a = [[A, .], [B, C]]``: ``L11 = chol(A)``, ``L21 = B L11^-T`` (a triangular solve),
    ``L22 = chol(C - L21 L21^T)``, so most of the arithmetic is one product per level; elsewhere LAPACK's."""
    n = a.shape[0]
    if n <= _LEAF or not dense.takes(a):
        lower, info = torch.linalg.cholesky_ex(a)
        return None if int(info) != 0 else lower
    k = n // 2
    l11 = cholesky_lower(a[:k, :k].contiguous())
    if l11 is None:
        return None
    l21 = torch.linalg.solve_triangular(l11, a[k:, :k].t(), upper=False).t().contiguous()
    l22 = cholesky_lower(a[k:, k:] - dense.linear(l21, l21))
    if l22 is None:
        return None
    lower = torch.zeros_like(a)
    lower[:k, :k], lower[k:, :k], lower[k:, k:] = l11, l21, l22
    return lower


def lower_inverse(lower: torch.Tensor) -> torch.Tensor:
    """``L^-1`` of a lower-triangular ``L`` (a new matrix). On CPU by halves: with ``L = [[A, 0], [B, C]]``,
    ``L^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]``, so all but the small diagonal leaves are matrix products
    (a third of the arithmetic of a triangular solve against the full identity, in faster kernels; float32 on
    the measured engine, ``dense.py``); elsewhere, and for small matrices, that solve."""
    n = lower.shape[0]
    if lower.device.type != "cpu" or n <= _LEAF:
        inv = torch.eye(n, dtype=lower.dtype, device=lower.device)
        return torch.linalg.solve_triangular(lower, inv, upper=False, out=inv)
    k = n // 2
    inv = torch.zeros(n, n, dtype=lower.dtype, device=lower.device)  # row-major, whatever LAPACK gave
    inv[:k, :k] = lower_inverse(lower[:k, :k])
    inv[k:, k:] = lower_inverse(lower[k:, k:])
    inv[k:, :k] = dense.mm(inv[k:, k:], dense.mm(lower[k:, :k], inv[:k, :k])).neg_()
    return inv


def upper_inverse_cholesky(h: torch.Tensor, damp: float = 0.0) -> torch.Tensor | None:
    """Upper-triangular ``U`` with ``U^T U = (h + damp I)^-1``, or None when that matrix is not
    (numerically) positive definite. ``h`` is not modified; peak extra memory is ~3 matrices."""
    flipped = h.flip(0, 1)  # a copy; J (h + damp I) J has the same diagonal, reversed
    flipped.diagonal().add_(damp)
    lower = cholesky_lower(flipped)
    del flipped
    if lower is None:
        return None
    # numerically singular (e.g. percdamp=0 on a rank-deficient H): the inverse would be rounding noise.
    # A damped Hessian has pivots^2 >= damp * mean(diag), far above this unless max/mean diag > damp / eps.
    tol = torch.finfo(h.dtype).eps * (float(h.diagonal().abs().max()) + damp)
    if float(lower.diagonal().min()) ** 2 <= tol:
        return None
    inv = lower_inverse(lower)
    del lower
    u = inv.flip(0, 1)
    return u if all_finite(u) else None

"""The matrices GPTQ's column sweep (``gptq.py``) is built from: the group-aware column order, the upper
inverse Cholesky factor ``U`` of the damped Hessian, and GPTAQ's correction ``P`` (see ``gptq.py``'s module
docstring for the algorithm they serve)."""

from __future__ import annotations

import torch

from . import dense
from .result import all_finite

__all__ = ["GPTAQ_ALPHA", "flipped", "gptaq_correction", "group_aware_order", "symmetric_copy", "upper_factor_",
           "upper_inverse_", "upper_inverse_cholesky"]

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


_STRIP = 256  # rows per strip of gptaq_correction on CPU


def gptaq_correction(cross: torch.Tensor, u: torch.Tensor, alpha: float = GPTAQ_ALPHA,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """GPTAQ's ``P = alpha * triu(cross @ U^T, 1) @ U`` (strictly upper triangular; see the module docstring),
    written into ``out`` (``u``'s shape and dtype, contiguous) when given.

    On CPU a strip of rows ``I = [i, i + s)`` at a time, with the zeros of the triangles skipped: ``U`` is
    upper triangular, so the strip's ``triu(cross @ U^T, 1)`` is ``cross[I] @ U[i:]^T`` (columns ``i`` on)
    and ``P[I] = T[I, i:] @ U[i:]``; the operands are row slices of contiguous matrices (no copies), and the
    arithmetic is half of the two full products."""
    n = u.shape[0]
    if u.device.type != "cpu" or n <= 2 * _STRIP:
        p = dense.mm(torch.triu(dense.linear(cross, u), diagonal=1), u).mul_(alpha)
        return p if out is None else out.copy_(p)
    u, cross = u.contiguous(), cross.contiguous()
    p = torch.empty_like(u) if out is None else out
    for i in range(0, n, _STRIP):
        t = dense.linear(cross[i : i + _STRIP], u[i:]).triu_(1)  # [s, n - i]: global column > row
        p[i : i + _STRIP] = dense.mm(t, u[i:]).mul_(alpha)
    return p


_LEAF = 256  # below this LAPACK's factorisation / a triangular solve against the identity; above, halves


def flipped(x: torch.Tensor) -> torch.Tensor:
    """``x.flip(0, 1)`` (new storage): for a matrix contiguous in either order (LAPACK's factors are
    column-major) the reversed flat storage, a single fast pass (torch's two-axis flip is several times slower
    on CPU)."""
    if x.is_contiguous():
        return x.reshape(-1).flip(0).view(x.shape)
    if x.t().is_contiguous():
        return flipped(x.t()).t()
    return x.flip(0, 1)


_SYM_TILE = 256  # rows / columns of the tiles symmetric_copy averages (a tile and its mirror stay in cache)


def symmetric_copy(h: torch.Tensor, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(h + h^T) / 2`` as a new contiguous matrix (in ``dtype``, default ``h``'s; into ``out``, contiguous,
    when given): float products need not give an exactly symmetric Hessian, and the factorisation reads one
    triangle. Tile by tile, so the transposed reads stay in cache (one whole-matrix ``h + h.t()`` reads a
    column per element); on a GPU in one op (the tiles would be thousands of kernel launches)."""
    if h.device.type != "cpu":
        h = h.to(dtype=dtype or h.dtype)
        return (h + h.t()).mul_(0.5) if out is None else torch.add(h, h.t(), out=out).mul_(0.5)
    if out is None:
        out = h.to(dtype=dtype or h.dtype, memory_format=torch.contiguous_format, copy=True)
    else:
        out.copy_(h)
    n = out.shape[0]
    tile = _SYM_TILE
    for i in range(0, n, tile):
        for j in range(i, n, tile):
            upper, lower = out[i : i + tile, j : j + tile], out[j : j + tile, i : i + tile]
            mean = (upper + lower.t()).mul_(0.5)
            upper.copy_(mean)
            if j != i:
                lower.copy_(mean.t())
    return out


def upper_factor_(m: torch.Tensor) -> bool:
    """In place: ``m`` (symmetric, its upper triangle read) becomes the upper-triangular ``R`` with
    ``R R^T = m``, zeros below the diagonal; False (``m`` then undefined) when a pivot is not positive.
    On CPU a large ``m`` goes by halves, ``m = [[A, B], [B^T, C]]``: ``R22 = factor(C)``, ``R12 = B R22^-T``
    (a triangular solve), ``R11 = factor(A - R12 R12^T)``, so most of the arithmetic is one product per level
    (on the measured engine, ``dense.py``) and no full-size matrix is allocated. The leaves, and matrices
    on other devices, take LAPACK's Cholesky of the index-reversed matrix (``J m J = L L^T`` gives
    ``R = J L J``); on a whole large CPU matrix that costs more around the factorisation than in it (torch
    zeroes the other triangle of the column-major factor and the result is copied back transposed)."""
    n = m.shape[0]
    if n <= _LEAF or m.device.type != "cpu":
        lower, info = torch.linalg.cholesky_ex(flipped(m))
        if int(info) != 0:
            return False
        m.copy_(flipped(lower))
        return True
    k = n // 2
    r22 = m[k:, k:]
    if not upper_factor_(r22):
        return False
    # R12 R22^T = B, solved as R22 R12^T = B^T: LAPACK's column-major answer is then R12 in row order (the
    # right-hand form comes back column-major and costs a transposed copy into m)
    m[:k, k:] = torch.linalg.solve_triangular(r22, m[:k, k:].t(), upper=True).t()
    r12 = m[:k, k:]
    m[:k, :k].sub_(dense.linear(r12, r12))
    if not upper_factor_(m[:k, :k]):
        return False
    m[k:, :k].zero_()
    return True


def upper_inverse_(r: torch.Tensor) -> None:
    """In place: an upper-triangular ``r`` becomes ``r^-1``. On CPU by halves: with ``r = [[A, B], [0, C]]``,
    ``r^-1 = [[A^-1, -A^-1 B C^-1], [0, C^-1]]``, so all but the small diagonal leaves are matrix products
    (a third of the arithmetic of a triangular solve against the full identity, in faster kernels; float32 on
    the measured engine, ``dense.py``); elsewhere, and for small matrices, that solve."""
    n = r.shape[0]
    if r.device.type != "cpu" or n <= _LEAF:
        eye = torch.eye(n, dtype=r.dtype, device=r.device)
        r.copy_(torch.linalg.solve_triangular(r, eye, upper=True, out=eye))
        return
    k = n // 2
    upper_inverse_(r[:k, :k])
    upper_inverse_(r[k:, k:])
    r[:k, k:] = dense.mm(r[:k, :k], dense.mm(r[:k, k:], r[k:, k:])).neg_()


def upper_inverse_cholesky(h: torch.Tensor, damp: float = 0.0, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Upper-triangular ``U`` with ``U^T U = (h + damp I)^-1``, or None when that matrix is not
    (numerically) positive definite. ``h`` (symmetric) is not modified: ``h + damp I = R R^T`` with ``R``
    upper triangular (:func:`upper_factor_`), and ``U = R^-1`` (:func:`upper_inverse_`), both in one copy of
    ``h`` (``out`` when given: contiguous, ``h``'s shape and dtype; peak extra memory about 1.5 matrices)."""
    m = h.clone(memory_format=torch.contiguous_format) if out is None else out.copy_(h)
    m.diagonal().add_(damp)
    if not upper_factor_(m):
        return None
    # numerically singular (e.g. percdamp=0 on a rank-deficient H): the inverse would be rounding noise.
    # A damped Hessian has pivots^2 >= damp * mean(diag), far above this unless max/mean diag > damp / eps.
    tol = torch.finfo(h.dtype).eps * (float(h.diagonal().abs().max()) + damp)
    if float(m.diagonal().min()) ** 2 <= tol:
        return None
    upper_inverse_(m)
    return m if all_finite(m) else None

"""An independent, deliberately plain GPTQ used as the tests' oracle.

One column at a time, no blocks, inverse Hessian by ``torch.linalg.inv`` then an upper Cholesky, grid
parameters from their textbook formulas. Slow, but short enough to check by eye.
"""

from __future__ import annotations

import torch


def grid_params(
    x: torch.Tensor, bits: int, sym: bool, clip: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) of x[rows, cols], float64, following the contract's formulas."""
    maxq = 2**bits - 1
    lo = torch.clamp(x.min(1).values, max=0.0)
    hi = torch.clamp(x.max(1).values, min=0.0)
    both_zero = (lo == 0) & (hi == 0)
    lo[both_zero], hi[both_zero] = -1.0, 1.0

    def params(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if sym:
            scale = torch.maximum(lo.abs(), hi) / (2 ** (bits - 1) - 1)
            return scale, torch.full_like(scale, 2 ** (bits - 1))
        scale = (hi - lo) / maxq
        return scale, torch.round(-lo / scale)

    scale, zero = params(lo, hi)
    if clip:
        best = torch.full_like(scale, float("inf"))
        for step in range(80):
            p = 1 - step / 100
            s, z = params(p * lo, p * hi)
            q = s[:, None] * (torch.clamp(torch.round(x / s[:, None]) + z[:, None], 0, maxq) - z[:, None])
            err = ((q - x).abs() ** 2.4).sum(1)
            take = err < best
            best[take], scale[take], zero[take] = err[take], s[take], z[take]
    return scale, zero


def reference_gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int = -1,
    sym: bool = True,
    act_order: bool = False,
    percdamp: float = 0.01,
    clip: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns codes [out, in] (original column order), the dequantized weight, g_idx, and the loss."""
    W = weight.double().clone()
    H = hessian.double().clone()
    out_f, n = W.shape
    maxq = 2**bits - 1
    for i in range(n):
        if H[i, i] == 0:
            H[i, i] = 1
            W[:, i] = 0
    order = list(range(n))
    if act_order:
        order = sorted(range(n), key=lambda i: -float(H[i, i]))  # sorted() is stable, like ours
    W = W[:, order]
    H = H[order][:, order]
    H = H + percdamp * torch.diagonal(H).mean() * torch.eye(n, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    codes = torch.zeros(out_f, n, dtype=torch.int64)
    Q = torch.zeros(out_f, n, dtype=torch.float64)
    group_of_position = []
    scale = zero = None
    if group_size == -1:
        scale, zero = grid_params(W, bits, sym, clip)
    for j in range(n):
        if group_size != -1 and j % group_size == 0:
            scale, zero = grid_params(W[:, j : j + group_size], bits, sym, clip)
        group_of_position.append(0 if group_size == -1 else j // group_size)
        c = torch.clamp(torch.round(W[:, j] / scale) + zero, 0, maxq)
        codes[:, j] = c.long()
        Q[:, j] = scale * (c - zero)
        err = (W[:, j] - Q[:, j]) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
    codes_orig = torch.zeros_like(codes)
    Q_orig = torch.zeros_like(Q)
    g_idx = torch.zeros(n, dtype=torch.int64)
    for pos, col in enumerate(order):
        codes_orig[:, col] = codes[:, pos]
        Q_orig[:, col] = Q[:, pos]
        g_idx[col] = group_of_position[pos]
    D = weight.double() - Q_orig
    loss = torch.trace(D @ hessian.double() @ D.T)
    return codes_orig, Q_orig, g_idx, loss

"""Shared test data: weights and Hessians from correlated inputs (seeded, float64 unless asked)."""

from __future__ import annotations

import torch


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def correlated_inputs(n: int, seed: int, rows: int | None = None, outliers: bool = True) -> torch.Tensor:
    """Rows of a low-rank-plus-noise input with (optionally) log-normal per-channel scales."""
    g = gen(seed)
    rows = rows or 4 * n
    rank = max(1, n // 4)
    x = torch.randn(rows, rank, generator=g, dtype=torch.float64) @ torch.randn(
        rank, n, generator=g, dtype=torch.float64
    )
    x = x + 0.3 * torch.randn(rows, n, generator=g, dtype=torch.float64)
    if outliers:
        x = x * torch.exp(torch.randn(n, generator=g, dtype=torch.float64))
    return x


def correlated_hessian(n: int, seed: int, rows: int | None = None, outliers: bool = True) -> torch.Tensor:
    """``2/rows * X^T X``, exactly symmetric, float64."""
    x = correlated_inputs(n, seed, rows, outliers)
    h = 2.0 / x.shape[0] * (x.T @ x)
    return (h + h.T) / 2


def weight(out: int, n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(out, n, generator=gen(seed), dtype=torch.float64).to(dtype)


def set_amx_kernel_aside(monkeypatch) -> None:
    """Make the AMX kernel (ops/cpu_amx.py) unavailable for one test, as on a CPU without AMX: tests of the
    other CPU kernels' dispatch facts hold on AMX hosts too."""
    from hf_vlm_gptq.ops import cpu_amx

    monkeypatch.setattr(cpu_amx, "_state", {"reason": "set aside by this test (a CPU without AMX)", "ready": True})

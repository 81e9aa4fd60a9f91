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


def assert_patch_embed_runs_through(calls: list) -> None:
    """A Qwen2-VL-style patch embedding (Conv3d 3 -> 32, 2 x 14 x 14, 1176 inputs: not a multiple of 32), 4-bit,
    on 40 patches: one call of the kernel ``calls`` records, and the dense convolution's output."""
    import torch.nn.functional as F
    from torch import nn

    from hf_vlm_gptq.ops import QuantConv, rtn_quantize

    conv = nn.Conv3d(3, 32, (2, 14, 14), stride=(2, 14, 14), bias=True)
    res = rtn_quantize(conv.weight.detach().reshape(32, -1), bits=4, group_size=128)  # 1176 columns
    q = QuantConv.from_result(res, conv, dtype=torch.bfloat16)
    x = torch.randn(40, 3, 2, 14, 14).to(torch.bfloat16)
    y = q(x)
    ref = F.conv3d(x, q.weight, conv.bias.detach().to(torch.bfloat16), stride=(2, 14, 14))
    assert calls == [40]
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)


def packed_linear(out_f: int, in_f: int, group_size: int, act_order: bool = False, sym: bool = True, bias=True,
                  bits: int = 4, kernel: str = "auto"):
    """A bf16 QuantLinear of random weights (RTN, or GPTQ with act-order on a correlated Hessian) and its
    ``kernel``; seeded by its shape."""
    from hf_vlm_gptq.ops import QuantLinear, gptq_quantize, rtn_quantize

    g = torch.Generator().manual_seed(out_f * 31 + in_f)
    w = torch.randn(out_f, in_f, generator=g)
    if act_order:
        res = gptq_quantize(w, correlated_hessian(in_f, seed=2).float(), bits=bits, group_size=group_size,
                            sym=sym, act_order=True)
    else:
        res = rtn_quantize(w, bits=bits, group_size=group_size, sym=sym)
    m = QuantLinear.from_result(res, torch.randn(out_f, generator=g) if bias else None, torch.bfloat16)
    m.kernel = kernel
    return m

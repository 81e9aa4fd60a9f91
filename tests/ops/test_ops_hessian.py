"""Hessian accumulation for Linear and Conv inputs."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_vlm_gptq.ops import HessianAccumulator, unfold_conv_input
from hf_vlm_gptq.ops import hessian as hessian_mod


def test_one_pass_is_two_over_n_xtx():
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    acc = HessianAccumulator(16, dtype=torch.float64)
    acc.add_batch(x)
    rows = x.reshape(-1, 16)
    assert acc.nsamples == 21
    assert torch.allclose(acc.hessian, 2 / 21 * rows.T @ rows, rtol=1e-12, atol=1e-14)


def test_chunked_equals_one_pass():
    x = torch.randn(50, 24) * torch.linspace(0.1, 3, 24)
    one = HessianAccumulator(24)
    one.add_batch(x)
    chunked = HessianAccumulator(24)
    for part in (x[:1], x[1:20], x[20:20], x[20:49], x[49:]):
        chunked.add_batch(part)
    assert chunked.nsamples == one.nsamples == 50
    assert chunked.hessian.dtype == torch.float32
    assert torch.allclose(chunked.hessian, one.hessian, rtol=1e-5, atol=1e-6)


def test_low_precision_inputs_accumulate_in_fp32():
    acc = HessianAccumulator(8)
    x = torch.randn(10, 8).to(torch.bfloat16)
    acc.add_batch(x)
    xf = x.float()
    assert acc.hessian.dtype == torch.float32
    assert torch.allclose(acc.hessian, 2 / 10 * xf.T @ xf, rtol=1e-5, atol=1e-6)


def test_starts_at_zero_and_rejects_bad_input():
    acc = HessianAccumulator(4)
    assert acc.nsamples == 0 and not bool(acc.hessian.any())
    with pytest.raises(ValueError, match="4"):
        acc.add_batch(torch.randn(2, 5))
    with pytest.raises(ValueError, match="non-finite"):
        acc.add_batch(torch.tensor([[1.0, math.nan, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="columns"):
        HessianAccumulator(0)


def _explicit_patches(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """Patch rows by brute force: loop over output positions (independent of the library's unfold)."""
    k, s, d = conv.kernel_size, conv.stride, conv.dilation
    pad = [p for p in conv.padding for _ in range(2)][::-1]  # symmetric, last dim first
    xp = F.pad(x, pad)
    spatial = xp.shape[2:]
    outs = [(sz - dd * (kk - 1) - 1) // ss + 1 for sz, kk, ss, dd in zip(spatial, k, s, d)]
    rows = []
    for b in range(x.shape[0]):
        for pos in itertools.product(*[range(o) for o in outs]):
            idx = [slice(p * ss, p * ss + dd * (kk - 1) + 1, dd) for p, kk, ss, dd in zip(pos, k, s, d)]
            rows.append(xp[(b, slice(None), *idx)].reshape(-1))
    return torch.stack(rows)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 5, 3, stride=2, padding=1),
        nn.Conv2d(2, 4, (2, 3), stride=(1, 2), dilation=(2, 1)),
        nn.Conv3d(2, 4, (2, 3, 3), stride=(1, 2, 2), padding=(1, 0, 1)),
        nn.Conv3d(3, 8, (2, 4, 4), stride=(2, 4, 4)),
    ],
)
def test_conv_hessian_matches_explicit_unfold(conv):
    nd = len(conv.kernel_size)
    x = torch.randn(2, conv.in_channels, *([9] * nd), dtype=torch.float64)
    patches = _explicit_patches(x, conv)
    assert torch.equal(unfold_conv_input(x, conv), patches)
    acc = HessianAccumulator(patches.shape[1], dtype=torch.float64)
    acc.add_conv_batch(x[:1], conv)
    acc.add_conv_batch(x[1:], conv)
    assert acc.nsamples == patches.shape[0]
    assert torch.allclose(acc.hessian, 2 / patches.shape[0] * patches.T @ patches, rtol=1e-10, atol=1e-12)
    # patches @ W^T reproduces the convolution itself, so the column order matches weight.reshape(out, -1)
    conv = conv.double()
    y = conv(x).movedim(1, -1).reshape(-1, conv.out_channels)
    assert torch.allclose(patches @ conv.weight.reshape(conv.out_channels, -1).T + conv.bias, y, atol=1e-10)


def test_qwen2_vl_patch_rows_are_accepted_as_is():
    conv = nn.Conv3d(3, 16, (2, 14, 14), stride=(2, 14, 14), bias=False)
    rows = torch.randn(12, 3 * 2 * 14 * 14)
    assert unfold_conv_input(rows, conv) is rows
    from_5d = HessianAccumulator(rows.shape[1])
    from_5d.add_conv_batch(rows.view(-1, 3, 2, 14, 14), conv)
    from_rows = HessianAccumulator(rows.shape[1])
    from_rows.add_conv_batch(rows, conv)
    assert torch.equal(from_5d.hessian, from_rows.hessian)
    with pytest.raises(ValueError, match="width"):
        unfold_conv_input(torch.randn(4, 100), conv)


def test_unbatched_and_same_padding_and_reflect_mode():
    conv = nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect").double()
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    patches = unfold_conv_input(x, conv)
    y = conv(x).movedim(0, -1).reshape(-1, 3)
    assert torch.allclose(patches @ conv.weight.reshape(3, -1).T + conv.bias, y, atol=1e-10)


def test_grouped_conv_is_rejected():
    with pytest.raises(ValueError, match="groups"):
        unfold_conv_input(torch.randn(1, 4, 5, 5), nn.Conv2d(4, 4, 3, groups=2))


def _upcast_xtx(rows: torch.Tensor) -> torch.Tensor:
    """CPU stand-in for ``torch.mm(x.t(), x, out_dtype=float32)``: products of bf16 / fp16 values are exact in
    fp32, so upcasting first gives the same products; only the summation order may differ."""
    return rows.float().t() @ rows.float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_formula_matches_fp32_accumulation(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(300, 48, generator=g) * torch.exp(torch.randn(48, generator=g))).to(dtype)
    fp32 = HessianAccumulator(48)  # on CPU: the fp32 path (rows cast, scaled by sqrt(2/n), addmm)
    half = torch.zeros(48, 48)
    n = 0
    for part in (x[:1], x[1:77], x[77:200], x[200:]):
        fp32.add_batch(part)
        hessian_mod.update_running_hessian(half, part, n, _upcast_xtx)
        n += part.shape[0]
    exact = 2 / 300 * x.double().T @ x.double()
    assert _rel(half, exact) <= 1e-5 and _rel(fp32.hessian, exact) <= 1e-5
    assert _rel(half, fp32.hessian) <= 1e-5


def test_half_path_is_chosen_for_cuda_half_rows_only():
    assert hessian_mod.half_xtx(torch.zeros(2, 4, dtype=torch.bfloat16), torch.float32) is None  # CPU
    assert hessian_mod.half_xtx(torch.zeros(2, 4), torch.float32) is None
    if torch.cuda.is_available():
        cuda = torch.zeros(2, 4, device="cuda")
        assert hessian_mod.half_xtx(cuda.bfloat16(), torch.float32) is not None
        assert hessian_mod.half_xtx(cuda.half(), torch.float32) is not None
        assert hessian_mod.half_xtx(cuda, torch.float32) is None
        assert hessian_mod.half_xtx(cuda.bfloat16(), torch.float64) is None


def test_accumulator_half_path_keeps_count_and_finite_check(monkeypatch):
    """The accumulator's half-precision branch, forced on CPU with the exact-product stand-in."""
    monkeypatch.setattr(
        hessian_mod, "half_xtx", lambda rows, acc: _upcast_xtx if rows.dtype == torch.bfloat16 else None
    )
    x = torch.randn(40, 16).to(torch.bfloat16)
    acc = HessianAccumulator(16)
    acc.add_batch(x[:10])
    acc.add_batch(x[10:])
    assert acc.nsamples == 40 and acc.hessian.dtype == torch.float32
    assert _rel(acc.hessian, 2 / 40 * x.double().T @ x.double()) <= 1e-5
    with pytest.raises(ValueError, match="non-finite"):
        acc.add_batch(torch.full((2, 16), math.inf).to(torch.bfloat16))
    assert acc.nsamples == 40


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_out_dtype_path_matches_fp32_accumulation(dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3000, 512, generator=g) * torch.exp(torch.randn(512, generator=g))).to(dtype)
    fp32 = HessianAccumulator(512)  # CPU: fp32 path
    half = HessianAccumulator(512, device="cuda")  # CUDA + half rows: torch.mm(..., out_dtype=float32)
    for part in x.split(700):
        fp32.add_batch(part)
        half.add_batch(part.cuda())
    assert half.nsamples == fp32.nsamples == 3000
    assert _rel(half.hessian.cpu(), fp32.hessian) <= 1e-5
    with pytest.raises(ValueError, match="non-finite"):
        half.add_batch(torch.full((2, 512), math.nan, device="cuda").to(dtype))


@pytest.mark.parametrize("columns", [100, 384, 700, 1030, 2048])
def test_the_triangular_update_equals_one_product(columns):
    """On CPU a wide Hessian multiplies only its upper block triangle and mirrors it: the same matrix as one
    addmm_ (to rounding), exactly symmetric outside the diagonal blocks, through the accumulator too."""
    from hf_vlm_gptq.ops.hessian import _TRIANGLE_BLOCK, _TRIANGLE_FROM, add_xtx

    gen = torch.Generator().manual_seed(columns)
    x = torch.randn(2, 150, columns + 1, generator=gen)[..., 1:].reshape(-1, columns)  # a strided view (split)
    base = torch.randn(columns, columns, generator=gen)
    h = base + base.t()
    ref = h.clone().addmm_(x.t(), x, alpha=0.25)
    add_xtx(h, x, 0.25)
    torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-4)
    if columns >= _TRIANGLE_FROM:
        block = _TRIANGLE_BLOCK if columns >= 1024 else _TRIANGLE_BLOCK // 2
        off = torch.ones(columns, columns, dtype=torch.bool)
        for i in range(0, columns, block):
            off[i : i + block, i : i + block] = False
        assert torch.equal(h[off], h.t()[off])
    acc = HessianAccumulator(columns)
    acc.add_batch(x)
    torch.testing.assert_close(acc.hessian, torch.zeros(columns, columns).addmm_(x.t(), x, alpha=2 / x.shape[0]),
                               rtol=1e-5, atol=1e-5)

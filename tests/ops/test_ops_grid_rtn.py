"""Quantization grid (formulas, clip search, guards) and RTN."""

from __future__ import annotations

import math

import pytest
import torch

from hf_vlm_gptq.ops import QuantGrid, dequantize, find_params, quantize_codes, rtn_quantize

from .helpers import correlated_hessian, weight
from .reference_gptq import grid_params


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_formulas(bits):
    w = torch.tensor([[-3.0, 1.0, 2.0], [0.5, 0.25, -0.1]], dtype=torch.float64)
    scale, zero = find_params(w, bits, sym=True)
    assert torch.equal(scale, torch.tensor([3.0, 0.5], dtype=torch.float64) / (2 ** (bits - 1) - 1))
    assert torch.equal(zero, torch.full((2,), 2.0 ** (bits - 1), dtype=torch.float64))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asymmetric_formulas(bits):
    w = torch.tensor([[-3.0, 1.0, 2.0], [0.5, 0.25, 0.1]], dtype=torch.float64)
    scale, zero = find_params(w, bits, sym=False)
    maxq = 2**bits - 1
    assert torch.equal(scale, torch.tensor([5.0, 0.5], dtype=torch.float64) / maxq)  # range widened to 0
    assert torch.equal(zero, torch.round(torch.tensor([3.0, 0.0], dtype=torch.float64) / scale))


@pytest.mark.parametrize("sym", [True, False])
def test_all_zero_rows_get_nonzero_scale_and_dequantize_to_zero(sym):
    w = torch.zeros(3, 8)
    w[1] = torch.linspace(-1, 1, 8)
    scale, zero = find_params(w, 4, sym)
    assert bool((scale > 0).all())
    q = dequantize(quantize_codes(w, scale, zero, 4), scale, zero)
    assert torch.equal(q[0], torch.zeros(8)) and torch.equal(q[2], torch.zeros(8))


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_clip_search_matches_reference_and_never_increases_the_error(bits, sym):
    w = weight(40, 64, seed=bits) * torch.exp(weight(40, 1, seed=9))
    w[0, 0] = 25.0  # an outlier that clipping should cut
    s0, z0 = find_params(w, bits, sym, clip=False)
    s1, z1 = find_params(w, bits, sym, clip=True)
    rs, rz = grid_params(w, bits, sym, clip=True)
    assert torch.equal(s1, rs) and torch.equal(z1, rz)

    def err(s, z):
        return ((dequantize(quantize_codes(w, s, z, bits), s, z) - w).abs() ** 2.4).sum(1)

    assert bool((err(s1, z1) <= err(s0, z0)).all())
    assert bool((s1 < s0).any())
    assert bool((s1 >= 0.2 * s0).all())  # shrink factors stop at 0.21


def test_codes_are_clamped_to_the_grid():
    scale, zero = torch.ones(2), torch.full((2,), 8.0)
    codes = quantize_codes(torch.tensor([[-100.0, 100.0, 0.4], [3.0, -8.0, 7.0]]), scale, zero, 4)
    assert codes.dtype == torch.uint8
    assert codes.tolist() == [[0, 15, 8], [11, 0, 15]]


def test_quant_grid_object_matches_functions():
    grid = QuantGrid(3, sym=False)
    w = weight(5, 12, seed=3)
    s, z = grid.find_params(w)
    assert grid.maxq == 7
    assert torch.equal(
        grid.dequantize(grid.quantize(w, s, z), s, z), dequantize(quantize_codes(w, s, z, 3), s, z)
    )
    with pytest.raises(ValueError, match="bits"):
        QuantGrid(6)


@pytest.mark.parametrize("bad", [1, 5, 16, True, 4.0, "4"])
def test_bad_bits_raise(bad):
    with pytest.raises(ValueError, match="bits"):
        find_params(torch.randn(2, 4), bad, True)


@pytest.mark.parametrize(("group_size", "clip"), [(-1, False), (16, True), (20, False)])
def test_rtn_matches_per_group_rounding(group_size, clip):
    w = weight(12, 50, seed=5)  # 50 columns: groups of 20 leave a partial group of 10
    res = rtn_quantize(w, bits=4, group_size=group_size, sym=False, clip=clip)
    size = 50 if group_size == -1 else group_size
    for gi, c0 in enumerate(range(0, 50, size)):
        cols = slice(c0, min(c0 + size, 50))
        s, z = grid_params(w[:, cols], 4, False, clip)
        expected = torch.clamp(torch.round(w[:, cols] / s[:, None]) + z[:, None], 0, 15)
        assert torch.equal(res.codes[:, cols].double(), expected)
        assert torch.equal(res.scales[:, gi], s.float())
        assert bool((res.g_idx[cols] == gi).all())
    assert res.method == "rtn" and math.isnan(res.loss)


def test_rtn_loss_with_hessian_is_the_trace_formula():
    w, h = weight(8, 32, seed=6), correlated_hessian(32, seed=6)
    res = rtn_quantize(w, bits=3, group_size=8, hessian=h)
    d = w - res.dequantize().double()
    assert res.loss == pytest.approx(float(torch.trace(d @ h @ d.T)), rel=1e-6)


def test_rtn_rejects_bad_input():
    with pytest.raises(ValueError, match="weight"):
        rtn_quantize(torch.tensor([[1.0, math.inf]]), bits=4)
    with pytest.raises(ValueError, match="group_size"):
        rtn_quantize(torch.randn(2, 4), bits=4, group_size=0)
    with pytest.raises(ValueError, match="hessian"):
        rtn_quantize(torch.randn(2, 4), bits=4, hessian=torch.eye(3))


@pytest.mark.parametrize(("in_f", "group_size", "act_order"), [(256, 64, False), (256, -1, False), (200, 64, False),
                                                                 (256, 64, True)])
def test_a_result_dequantizes_to_scale_times_code_minus_zero_of_its_group(in_f, group_size, act_order):
    """Consecutive groups (broadcast), one group, a partial last group and act-order's permuted groups (both
    by ``g_idx``): each entry is ``scale[g] * (code - zero[g])`` in float32, exactly."""
    from hf_vlm_gptq.ops import gptq_quantize

    h = correlated_hessian(in_f, seed=in_f)
    res = gptq_quantize(weight(24, in_f, seed=5), h, bits=4, group_size=group_size, sym=False, act_order=act_order)
    g = res.g_idx.long()
    want = res.scales.float()[:, g] * (res.codes.float() - res.zeros.float()[:, g])
    got = res.dequantize()
    assert got.dtype == torch.float32 and got.shape == (24, in_f)
    assert torch.equal(got, want)
    if act_order:
        assert not torch.equal(res.g_idx, torch.arange(in_f, dtype=res.g_idx.dtype) // group_size)

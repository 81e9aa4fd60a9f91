"""The GPTQ options against float64 references: token-weighted Hessians, GPTAQ (asymmetric calibration),
group-aware column order and the full-range symmetric grid; and that each reduces to the plain algorithm
when it has nothing to do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_vlm_gptq.ops import (
    AsymmetricAccumulator,
    HessianAccumulator,
    QuantLinear,
    find_params,
    gptq_quantize,
    gptq_quantize_shared,
    group_aware_order,
    rtn_quantize,
)

from .helpers import correlated_hessian, correlated_inputs, gen, weight

# --- float64 references ---------------------------------------------------------------------------


def ref_grid(x: torch.Tensor, bits: int, sym: bool, clip: bool = False, full_range: bool = False):
    """Per-row (scale, zero), float64, from the formulas in grid.py's docstring."""
    maxq = 2**bits - 1
    lo = torch.clamp(x.min(1).values, max=0.0)
    hi = torch.clamp(x.max(1).values, min=0.0)
    both_zero = (lo == 0) & (hi == 0)
    lo[both_zero], hi[both_zero] = -1.0, 1.0

    def params(lo, hi):
        if sym:
            absmax = torch.maximum(lo.abs(), hi)
            scale = 2 * absmax / maxq if full_range else absmax / (2 ** (bits - 1) - 1)
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


def ref_group_order(diag: list[float], group_size: int) -> list[int]:
    """Group-aware order in plain Python: full groups by their largest diag (stable), partial group last,
    columns inside a group by decreasing diag (stable)."""
    n = len(diag)
    if group_size == -1 or group_size >= n:
        return sorted(range(n), key=lambda i: -diag[i])
    groups = [list(range(g, min(g + group_size, n))) for g in range(0, n, group_size)]
    full = [g for g in groups if len(g) == group_size]
    rest = [g for g in groups if len(g) < group_size]
    full = sorted(full, key=lambda g: -max(diag[i] for i in g))
    return [i for g in full + rest for i in sorted(g, key=lambda i: -diag[i])]


def ref_gptq(weight, hessian, bits, group_size=-1, sym=True, order="plain", percdamp=0.01, clip=False,
             full_range=False, cross=None, alpha=0.25):
    """One column at a time, full-width updates, inverse by torch.linalg.inv. GPTAQ: after column j is
    rounded, every later column k moves by + w_j P[j, k] with w_j the column before rounding.
    Returns codes (original column order) and g_idx."""
    W = weight.double().clone()
    H = hessian.double().clone()
    out_f, n = W.shape
    maxq = 2**bits - 1
    C = None if cross is None else cross.double().clone()
    for i in range(n):
        if H[i, i] == 0:
            H[i, i] = 1
            W[:, i] = 0
            if C is not None:
                C[:, i] = 0
    diag = [float(H[i, i]) for i in range(n)]
    if order == "act":
        perm = sorted(range(n), key=lambda i: -diag[i])
    elif order == "group":
        perm = ref_group_order(diag, group_size)
    else:
        perm = list(range(n))
    W, H = W[:, perm], H[perm][:, perm]
    H = H + percdamp * torch.diagonal(H).mean() * torch.eye(n, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    P = None if C is None else alpha * torch.triu(C[perm][:, perm] @ U.T, 1) @ U
    codes = torch.zeros(out_f, n, dtype=torch.int64)
    group_of_pos = []
    for j in range(n):
        if group_size == -1 and j == 0:
            scale, zero = ref_grid(W, bits, sym, clip, full_range)
        elif group_size != -1 and j % group_size == 0:
            scale, zero = ref_grid(W[:, j : j + group_size], bits, sym, clip, full_range)
        group_of_pos.append(0 if group_size == -1 else j // group_size)
        c = torch.clamp(torch.round(W[:, j] / scale) + zero, 0, maxq)
        codes[:, j] = c.long()
        q = scale * (c - zero)
        pre = W[:, j].clone()
        err = (W[:, j] - q) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
        if P is not None:
            W[:, j + 1 :] += pre[:, None] * P[j, j + 1 :][None, :]
    codes_orig = torch.zeros_like(codes)
    g_idx = torch.zeros(n, dtype=torch.int64)
    for pos, col in enumerate(perm):
        codes_orig[:, col] = codes[:, pos]
        g_idx[col] = group_of_pos[pos] if order != "group" else (0 if group_size == -1 else col // group_size)
    return codes_orig, g_idx


def same_result(a, b, loss_rel: float = 0.0) -> None:
    """The same solve; ``loss_rel``: the losses may come from two computations (GPTAQ's from the Hessian,
    plain GPTQ's from the sweep's errors) and agree to that relative tolerance."""
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.scales, b.scales)
    assert torch.equal(a.zeros, b.zeros)
    assert torch.equal(a.g_idx, b.g_idx)
    assert a.loss == pytest.approx(b.loss, rel=loss_rel, abs=0) and a.damp == b.damp and a.method == b.method


# --- token-weighted Hessians -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_ones_weights_give_exactly_the_plain_hessian(dtype):
    x = correlated_inputs(24, seed=1, rows=90).to(dtype)
    plain, weighted = HessianAccumulator(24, dtype=dtype), HessianAccumulator(24, dtype=dtype)
    for part in (x[:7], x[7:40], x[40:]):
        plain.add_batch(part)
        weighted.add_batch(part, weights=torch.ones(part.shape[0], dtype=dtype))
    assert torch.equal(weighted.hessian, plain.hessian)
    assert weighted.nsamples == plain.nsamples == 90
    scalar = HessianAccumulator(24, dtype=dtype)
    scalar.add_batch(x, weights=1.0)
    one = HessianAccumulator(24, dtype=dtype)
    one.add_batch(x)
    assert torch.equal(scalar.hessian, one.hessian)


def test_all_ones_weights_conv_and_3d_batches():
    conv = nn.Conv2d(3, 8, kernel_size=4, stride=4, bias=False)
    x = torch.randn(2, 3, 16, 16, generator=gen(3))
    plain, weighted = HessianAccumulator(48), HessianAccumulator(48)
    plain.add_conv_batch(x, conv)
    weighted.add_conv_batch(x, conv, weights=torch.ones(2 * 16))
    assert torch.equal(weighted.hessian, plain.hessian)
    seq = torch.randn(2, 5, 48, generator=gen(4))
    plain.add_batch(seq)
    weighted.add_batch(seq, weights=torch.ones(2, 5))
    assert torch.equal(weighted.hessian, plain.hessian)


def test_weighted_hessian_matches_float64_reference():
    x = correlated_inputs(20, seed=5, rows=64)
    w = torch.rand(64, generator=gen(6), dtype=torch.float64) * 3
    w[::7] = 0  # excluded tokens
    acc = HessianAccumulator(20, dtype=torch.float64)
    for a, b in ((0, 10), (10, 33), (33, 64)):
        acc.add_batch(x[a:b], weights=w[a:b])
    ref = 2.0 / 64 * x.T @ torch.diag(w) @ x
    assert torch.allclose(acc.hessian, ref, rtol=1e-12, atol=1e-12)
    scaled = HessianAccumulator(20, dtype=torch.float64)
    scaled.add_batch(x, weights=2.5)
    assert torch.allclose(scaled.hessian, 2.5 * 2.0 / 64 * x.T @ x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "ones"])
def test_bad_weights_raise(bad):
    acc = HessianAccumulator(4)
    x = torch.randn(3, 4)
    weights = torch.ones(2) if bad == "ones" else torch.tensor([1.0, bad, 1.0])
    with pytest.raises(ValueError, match="weights"):
        acc.add_batch(x, weights=weights)


# --- GPTAQ -------------------------------------------------------------------------------------------


def test_asymmetric_accumulator_matches_float64_reference():
    xq = correlated_inputs(16, seed=7, rows=50)
    xf = xq + 0.1 * torch.randn(50, 16, generator=gen(8), dtype=torch.float64)
    w = torch.rand(50, generator=gen(9), dtype=torch.float64)
    acc = AsymmetricAccumulator(16, dtype=torch.float64)
    acc.add_pair(xq[:20], xf[:20], weights=w[:20])
    acc.add_pair(xq[20:], xf[20:], weights=w[20:])
    assert torch.allclose(acc.hessian, 2.0 / 50 * xq.T @ torch.diag(w) @ xq, rtol=1e-12, atol=1e-12)
    ref_cross = 2.0 / 50 * (xf - xq).T @ torch.diag(w) @ xq
    assert torch.allclose(acc.cross, ref_cross, rtol=1e-12, atol=1e-12)


def test_asymmetric_accumulator_with_equal_inputs_is_the_plain_hessian_and_zero_cross():
    x = correlated_inputs(16, seed=10, rows=40).float()
    acc, plain = AsymmetricAccumulator(16), HessianAccumulator(16)
    for part in (x[:13], x[13:]):
        acc.add_pair(part, part.clone())
        plain.add_batch(part)
    assert torch.equal(acc.hessian, plain.hessian)
    assert not bool(acc.cross.any())


CONFIGS = [
    # bits, group_size, sym, order, clip, full_range
    (4, -1, True, "plain", False, False),
    (4, 32, True, "act", False, False),
    (3, 16, False, "group", False, False),
    (2, 100, True, "plain", False, False),  # partial last group, blocks of 128
    (4, 64, True, "group", True, True),
    (3, -1, True, "group", True, False),
]


def _kw(order: str) -> dict:
    return {"act_order": order == "act", "group_order": order == "group"}


@pytest.mark.parametrize(("bits", "group_size", "sym", "order", "clip", "full_range"), CONFIGS)
def test_gptaq_with_equal_inputs_is_exactly_gptq(bits, group_size, sym, order, clip, full_range):
    n = 257
    x = correlated_inputs(n, seed=bits, rows=600)
    acc = AsymmetricAccumulator(n, dtype=torch.float64)
    acc.add_pair(x, x.clone())
    w = weight(24, n, seed=bits)
    common = dict(bits=bits, group_size=group_size, sym=sym, clip=clip, full_range=full_range, **_kw(order))
    plain = gptq_quantize(w, acc.hessian, **common)
    gptaq = gptq_quantize(w, acc.hessian, gptaq_cross=acc.cross, **common)
    same_result(gptaq, plain, loss_rel=1e-9)  # float64: the two loss computations agree to rounding


@pytest.mark.parametrize(("bits", "group_size", "sym", "order", "clip", "full_range"), CONFIGS)
@pytest.mark.parametrize("block_size", [128, 16])
def test_gptaq_codes_match_float64_reference(bits, group_size, sym, order, clip, full_range, block_size):
    n = 257
    xq = correlated_inputs(n, seed=20 + bits, rows=700)
    xf = xq + 0.2 * correlated_inputs(n, seed=30 + bits, rows=700, outliers=False)
    acc = AsymmetricAccumulator(n, dtype=torch.float64)
    acc.add_pair(xq, xf)
    h, cross = acc.hessian.clone(), acc.cross.clone()
    h[5, :] = h[:, 5] = 0  # a dead input column
    cross[:, 5] = 0
    w = weight(16, n, seed=bits + 1)
    ours = gptq_quantize(w, h, bits=bits, group_size=group_size, sym=sym, clip=clip, full_range=full_range,
                         gptaq_cross=cross, block_size=block_size, **_kw(order))
    codes, g_idx = ref_gptq(w, h, bits, group_size, sym, order, clip=clip, full_range=full_range, cross=cross)
    assert ours.method == "gptq"
    assert torch.equal(ours.codes.long(), codes)
    assert torch.equal(ours.g_idx.long(), g_idx)


def test_gptaq_fits_float_outputs_better_than_gptq():
    """The asymmetric objective ||Q x~ - W x||^2 on held-in tokens: GPTAQ below GPTQ (and below both, RTN)."""
    n = 128
    xf = correlated_inputs(n, seed=40, rows=2000).float()
    xq = xf + 0.3 * correlated_inputs(n, seed=41, rows=2000, outliers=False).float()  # upstream error
    acc = AsymmetricAccumulator(n)
    acc.add_pair(xq, xf)
    w = weight(64, n, seed=42, dtype=torch.float32)
    target = xf @ w.T

    def err(result) -> float:
        return float((xq @ result.dequantize().T - target).pow(2).sum())

    plain = gptq_quantize(w, acc.hessian, bits=4, group_size=32)
    gptaq = gptq_quantize(w, acc.hessian, bits=4, group_size=32, gptaq_cross=acc.cross)
    rtn = rtn_quantize(w, bits=4, group_size=32)
    assert err(gptaq) < err(plain) < err(rtn)


def test_gptaq_argument_checks():
    w, h = weight(4, 8, seed=1), correlated_hessian(8, seed=1)
    with pytest.raises(ValueError, match="gptaq_cross"):
        gptq_quantize(w, h, bits=4, gptaq_cross=torch.zeros(7, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="gptaq_alpha"):
        gptq_quantize(w, h, bits=4, gptaq_cross=torch.zeros_like(h), gptaq_alpha=-1.0)
    with pytest.raises(ValueError, match="pick one"):
        gptq_quantize(w, h, bits=4, act_order=True, group_order=True)


# --- group-aware order -------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "group_size"), [(64, 16), (70, 16), (40, 64), (33, -1)])
def test_group_aware_order_matches_python_reference(n, group_size):
    diag = torch.rand(n, generator=gen(n), dtype=torch.float64)
    diag[3] = diag[4]  # a tie
    perm, group_perm = group_aware_order(diag, group_size)
    assert perm.tolist() == ref_group_order(diag.tolist(), group_size)
    assert sorted(perm.tolist()) == list(range(n))
    if group_size != -1 and group_size < n:  # each group contiguous, in group_perm order
        groups = [int(c) // group_size for c in perm]
        assert [groups[i] for i in range(0, n, group_size)] == group_perm.tolist()
        assert all(groups[i] == groups[i - i % group_size] for i in range(n))


@pytest.mark.parametrize("group_size", [-1, 300])
@pytest.mark.parametrize("clip", [False, True])
def test_group_order_with_one_group_is_act_order(group_size, clip):
    n = 257
    h, w = correlated_hessian(n, seed=50), weight(20, n, seed=51)
    grouped = gptq_quantize(w, h, bits=3, group_size=group_size, group_order=True, clip=clip)
    act = gptq_quantize(w, h, bits=3, group_size=group_size, act_order=True, clip=clip)
    same_result(grouped, act)


def test_group_order_with_flat_diagonal_is_plain_order():
    n = 96
    x = torch.linalg.qr(torch.randn(n, n, generator=gen(52), dtype=torch.float64))[0]
    h = x @ torch.diag(torch.linspace(0.5, 2, n, dtype=torch.float64)) @ x.T
    h.diagonal().fill_(1.0)  # every column equally important: stable sorts keep the plain order
    w = weight(12, n, seed=53)
    same_result(gptq_quantize(w, h, bits=4, group_size=32, group_order=True),
                gptq_quantize(w, h, bits=4, group_size=32))


@pytest.mark.parametrize(("bits", "group_size"), [(4, 32), (3, 48), (2, 100)])
def test_group_order_codes_match_reference_and_keep_plain_g_idx(bits, group_size):
    n = 257
    h, w = correlated_hessian(n, seed=60 + bits), weight(24, n, seed=61)
    ours = gptq_quantize(w, h, bits=bits, group_size=group_size, group_order=True)
    codes, g_idx = ref_gptq(w, h, bits, group_size, True, "group")
    assert torch.equal(ours.codes.long(), codes)
    assert torch.equal(ours.g_idx.long(), torch.arange(n) // group_size)
    assert torch.equal(ours.g_idx.long(), g_idx)
    # scales belong to the column groups: dequantizing with g_idx = col // group_size reproduces the solve
    shared = gptq_quantize_shared([w[:10], w[10:]], h, bits=bits, group_size=group_size, group_order=True)
    assert torch.equal(torch.cat([r.codes for r in shared]), ours.codes)


# --- full-range symmetric grid ----------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("clip", [False, True])
def test_full_range_grid_matches_reference(bits, clip):
    x = torch.randn(40, 64, generator=gen(bits), dtype=torch.float64)
    x[3] = 0  # an all-zero row
    scale, zero = find_params(x, bits, True, clip, full_range=True)
    ref_scale, ref_zero = ref_grid(x, bits, True, clip, full_range=True)
    assert torch.allclose(scale, ref_scale, rtol=1e-14)
    assert torch.equal(zero, ref_zero)


def test_full_range_4bit_uses_all_16_codes():
    w = torch.randn(256, 128, generator=gen(70))
    restricted = rtn_quantize(w, bits=4, group_size=128)
    full = rtn_quantize(w, bits=4, group_size=128, full_range=True)
    assert int((restricted.codes == 0).sum()) == 0  # the wasted level
    assert set(full.codes.unique().tolist()) == set(range(16))
    absmax = w.abs().amax(1)
    assert torch.allclose(full.scales[:, 0], 2 * absmax / 15)
    assert bool((full.zeros == 8).all())


@pytest.mark.parametrize(("bits", "group_size", "clip"), [(4, 32, False), (3, -1, True), (2, 64, False)])
def test_gptq_full_range_matches_reference(bits, group_size, clip):
    """Without clipping, the largest |w| of a group sits exactly half a step past the last level
    (``absmax / scale = 2**(bits-1) - 1/2``): a rounding tie that a 1-ulp difference in the error-updated
    column flips, after which that row's later columns drift. So: almost all codes agree."""
    n = 257
    h, w = correlated_hessian(n, seed=80 + bits), weight(16, n, seed=81)
    ours = gptq_quantize(w, h, bits=bits, group_size=group_size, clip=clip, full_range=True)
    codes, _ = ref_gptq(w, h, bits, group_size, True, "plain", clip=clip, full_range=True)
    assert float((ours.codes.long() == codes).double().mean()) >= 0.98


def test_full_range_result_packs_and_runs():
    w = torch.randn(64, 128, generator=gen(90))
    h = correlated_hessian(128, seed=91).float()
    result = gptq_quantize(w, h, bits=4, group_size=64, full_range=True)
    module = QuantLinear.from_result(result, bias=None, dtype=torch.float32)
    # scales are stored as fp16: the packed weight is the solve's up to fp16 rounding of the scales
    assert torch.allclose(module.weight.float(), result.dequantize(), rtol=1e-3, atol=1e-6)
    g = result.g_idx.long()
    exact = result.scales.half().float()[:, g] * (result.codes.float() - result.zeros.float()[:, g])
    assert torch.equal(module.weight.float(), exact)
    x = torch.randn(3, 128, generator=gen(92))
    assert torch.allclose(module(x), x @ exact.T, atol=1e-4, rtol=1e-4)

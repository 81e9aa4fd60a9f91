"""The measured float32 engine (ops/dense.py): both engines give the float64 products, the measurement keeps
BLAS when oneDNN disagrees, the calibration passes' Linear patch is undone, and the Hessian and factorisation
paths built on it match their float64 references."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_vlm_gptq.ops import dense, hessian
from hf_vlm_gptq.ops.gptq_matrices import upper_factor_, upper_inverse_cholesky
from hf_vlm_gptq.ops.hessian import HessianAccumulator, add_xtx

ONEDNN = pytest.mark.skipif(dense._onednn_unavailable() is not None, reason=str(dense._onednn_unavailable()))
ENGINES = ["blas", pytest.param("onednn", marks=ONEDNN)]


@pytest.fixture
def engine(request, monkeypatch):
    monkeypatch.setenv(dense.ENV_ENGINE, request.param)
    return request.param


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    scale = float(want.abs().max()) or 1.0
    return float((got.double() - want.double()).abs().max()) <= 2e-6 * scale * want.shape[-1] ** 0.5


def test_engine_setting_is_checked(monkeypatch):
    monkeypatch.setenv(dense.ENV_ENGINE, "mkl")
    with pytest.raises(ValueError, match=dense.ENV_ENGINE):
        dense.engine()
    monkeypatch.setenv(dense.ENV_ENGINE, "blas")
    assert dense.engine() == "blas"
    assert not dense.takes(torch.ones(4, 4))


@ONEDNN
def test_measurement_keeps_blas_when_onednn_disagrees(monkeypatch, caplog):
    monkeypatch.setattr(dense, "_onednn_linear", lambda x, w, b: F.linear(x, w, b) * (1 + 1e-2))
    with caplog.at_level(logging.WARNING, logger=dense.__name__):
        assert dense._measure() == "blas"
    assert "disagrees" in caplog.text
    monkeypatch.undo()
    assert dense._measure() in dense.ENGINES


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_products_match_float64_for_every_layout(engine):
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(96, 80, generator=gen)
    weights = {"contiguous": torch.randn(40, 24, generator=gen), "transposed": torch.randn(24, 40, generator=gen).t(),
               "sub-block": big[10:50, 30:54]}
    x3 = torch.randn(3, 7, 24, generator=gen)
    inputs = {"2-D": x3[0], "3-D": x3, "strided 3-D": torch.randn(3, 24, 7, generator=gen).transpose(1, 2),
              "sub-block": big[:9, 2:26]}
    bias = torch.randn(40, generator=gen)
    for wname, w in weights.items():
        for xname, x in inputs.items():
            for b in (None, bias):
                want = F.linear(x.double(), w.double(), None if b is None else b.double())
                got = dense.linear(x, w, b)
                assert got.dtype == torch.float32 and got.shape == want.shape
                assert _close(got, want), f"{engine}: input {xname}, weight {wname}, bias {b is not None}"
    a, m = torch.randn(33, 24, generator=gen), big[:24, 5:45]
    assert _close(dense.mm(a, m), a.double() @ m.double())


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_other_dtypes_and_autograd_keep_torch(engine):
    x, w = torch.randn(5, 8), torch.randn(6, 8)
    assert torch.equal(dense.linear(x.bfloat16(), w.bfloat16()), F.linear(x.bfloat16(), w.bfloat16()))
    xg = x.clone().requires_grad_(True)
    dense.linear(xg, w).sum().backward()
    assert torch.allclose(xg.grad, w.sum(0).expand(5, 8))
    assert dense.linear(torch.empty(0, 8), w).shape == (0, 6)


class _OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) + 1


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_fast_layers_patches_plain_linears_and_undoes_it(engine):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), _OwnForward(8, 8), nn.Linear(8, 4))
    hooked = model[2]
    hooked.forward = lambda x, _lin=hooked: F.linear(x, _lin.weight, _lin.bias) * 0  # a wrapper of its own
    x = torch.randn(3, 8)
    with torch.no_grad():
        before = model[0](x)
        with dense.fast_layers(model):
            patched = "forward" in model[0].__dict__
            assert "forward" not in model[1].__dict__
            assert torch.equal(model[2](x), torch.zeros(3, 4))  # its own forward kept
            inside = model[0](x)
        assert patched == (engine == "onednn")
        assert "forward" not in model[0].__dict__
        assert torch.allclose(inside, before, atol=1e-6)
        with pytest.raises(RuntimeError), dense.fast_layers(model):
            raise RuntimeError("a failed pass")
        assert "forward" not in model[0].__dict__


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_fast_layers_run_patch_convs_as_one_product(engine):
    """A Qwen-style Conv3d stem (the input one patch per row), a SigLIP-style Conv2d with trailing pixels that
    fill no patch, in fp32 and bf16: patched, the conv's result to rounding, hooks still see the input; a conv
    that overlaps its patches (stride < kernel) and a grouped one keep the conv; all undone on exit."""
    torch.manual_seed(0)
    stem = nn.Conv3d(3, 16, (2, 4, 4), stride=(2, 4, 4), bias=False)
    image = nn.Conv2d(3, 8, 5, stride=5)
    overlap = nn.Conv2d(3, 8, 3, stride=2)
    grouped = nn.Conv2d(4, 8, 2, stride=2, groups=2)
    model = nn.ModuleList([stem, image, overlap, grouped])
    inputs = [torch.randn(40, 3, 2, 4, 4), torch.randn(2, 3, 23, 17), torch.randn(2, 3, 9, 9), torch.randn(1, 4, 6, 6)]
    seen = []
    stem.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape))
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        xs = [x.to(dtype) for x in inputs]
        with torch.no_grad():
            want = [conv(x) for conv, x in zip(model, xs)]
            with dense.fast_layers(model):
                assert ["forward" in conv.__dict__ for conv in model] == [True, True, False, False]
                got = [conv(x) for conv, x in zip(model, xs)]
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.is_contiguous()
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            assert float((g.float() - w.float()).abs().max()) <= tol * float(w.float().abs().max())
        assert all("forward" not in conv.__dict__ for conv in model)
    assert seen == [(40, 3, 2, 4, 4)] * 4


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
@pytest.mark.parametrize("columns", [100, 300, 640])
def test_gram_matches_float64(engine, columns):
    gen = torch.Generator().manual_seed(columns)
    pieces = [torch.randn(n, columns, generator=gen) for n in (70, 129, 3)]
    h = torch.eye(columns)
    add_xtx(h, pieces, 0.5)
    rows = torch.cat(pieces).double()
    want = torch.eye(columns, dtype=torch.float64) + 0.5 * rows.t() @ rows
    assert _close(h, want)
    acc = HessianAccumulator(columns)
    for piece in pieces:
        acc.add_batch(piece)
    assert _close(acc.hessian, 2 / rows.shape[0] * rows.t() @ rows)
    block = hessian._GRAM_BLOCK if engine == "onednn" else 128
    if columns >= 384:  # off the diagonal blocks the matrix is mirrored: exactly symmetric
        assert torch.equal(h[block:, :block], h[:block, block:].t())


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_gptaq_cross_term_from_several_pieces_matches_float64(engine):
    """GPTAQ's ``2/n sum w (x~ - x)^T x`` and ``H`` from pairs added in pieces (the transposed difference is
    built piece by piece), one of them weighted, against float64."""
    from hf_vlm_gptq.ops.hessian import AsymmetricAccumulator

    gen = torch.Generator().manual_seed(5)
    columns = 300
    quant = [torch.randn(n, columns, generator=gen) for n in (70, 129, 3)]
    floats = [q + 0.1 * torch.randn(q.shape, generator=gen) for q in quant]
    weights = [None, torch.rand(129, generator=gen) + 0.5, None]
    acc = AsymmetricAccumulator(columns)
    for q, f, w in zip(quant, floats, weights):
        acc.add_pair(q, f, weights=w)
    scale = torch.cat([torch.ones(70), weights[1], torch.ones(3)]).double().sqrt()[:, None]
    xq, xf = torch.cat(quant).double() * scale, torch.cat(floats).double() * scale
    n = xq.shape[0]
    assert _close(acc.cross, 2 / n * (xf - xq).t() @ xq)
    assert _close(acc.hessian, 2 / n * xq.t() @ xq)


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_upper_factor_by_halves_matches_float64(engine):
    gen = torch.Generator().manual_seed(1)
    n = 700
    x = torch.randn(2 * n, n, generator=gen)
    a = x.t() @ x / (2 * n) + 0.1 * torch.eye(n)
    upper = a.clone()
    assert upper_factor_(upper) and torch.equal(upper, upper.triu())
    assert _close(upper @ upper.t(), a.double())
    damp = 0.01
    u = upper_inverse_cholesky(a, damp)
    eye = torch.eye(n, dtype=torch.float64)
    assert float((u.double().t() @ u.double() @ (a.double() + damp * eye) - eye).abs().max()) < 1e-4
    broken = a.clone()
    broken[5, 5] = -1.0  # not positive definite in the first half only (the second is factored first)
    assert not upper_factor_(broken)
    assert upper_inverse_cholesky(broken) is None


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_large_cpu_factor_goes_by_halves_on_every_engine(engine, dtype, monkeypatch):
    """LAPACK's Cholesky sees only the leaves, whatever the engine and dtype (on a whole large matrix torch
    zeroes the factor's other triangle and the result is copied back transposed: most of the time)."""
    from hf_vlm_gptq.ops import gptq_matrices

    seen: list[int] = []
    lapack = torch.linalg.cholesky_ex

    def recorded(m, *args, **kwargs):
        seen.append(m.shape[0])
        return lapack(m, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", recorded)
    gen = torch.Generator().manual_seed(2)
    n = 1100
    x = torch.randn(2 * n, n, generator=gen, dtype=dtype)
    a = x.t() @ x / (2 * n) + 0.1 * torch.eye(n, dtype=dtype)
    upper = a.clone()
    assert upper_factor_(upper) and torch.equal(upper, upper.triu())
    assert seen and max(seen) <= gptq_matrices._LEAF
    assert float((upper.double() @ upper.double().t() - a.double()).abs().max()) < (1e-4 if dtype == torch.float32
                                                                                    else 1e-10)


def test_transposed_casts_and_subtracts_in_the_asked_dtype():
    """bf16 pieces into a float32 transpose: the difference taken after the cast (exact), not in bf16; pieces
    longer than one chunk and of uneven lengths."""
    gen = torch.Generator().manual_seed(3)
    a = [torch.randn(n, 48, generator=gen).bfloat16() for n in (150, 7)]
    b = [(p.float() + 0.01 * torch.randn(p.shape, generator=gen)).bfloat16() for p in a]
    got = dense.transposed(a, minus=b, dtype=torch.float32)
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert torch.equal(got, (torch.cat(a).float() - torch.cat(b).float()).t())
    assert torch.equal(dense.transposed(b, dtype=torch.float32), torch.cat(b).float().t())
    assert torch.equal(dense.transposed(a, minus=b), (torch.cat(a) - torch.cat(b)).t())  # same dtype: bf16

"""Fused Triton GPTQ column sweep against the torch loop on the same inputs (float32).

Runs in the Triton interpreter on CPU (tests/ops/conftest.py) and compiled on CUDA. Both sides round the
same way (IEEE divisions, half-to-even) but sum the updates in another order, so a code may differ where a
value is within float rounding of a tie -- and then that row's later columns take another (equally good)
path. The criteria: >= 99.9% identical codes; on rows without such a flip the proxy loss within 1e-3
relative (row by row and summed); the whole loss within 1e-2 (one flipped row of an 8-bit layer, whose
loss is small, moves it by a few 1e-3).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hf_vlm_gptq.ops import gptq as G
from hf_vlm_gptq.ops import gptq_quantize, gptq_quantize_shared
from hf_vlm_gptq.ops import triton_gptq as TG

from .helpers import correlated_hessian, weight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    TG.columns_unavailable_reason(torch.zeros(1, 1, device=DEVICE)) is not None, reason="Triton unavailable"
)


def _inputs(out_f: int, n: int, seed: int, dead: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    h = correlated_hessian(n, seed=seed)
    if dead is not None:
        h[dead, :] = 0
        h[:, dead] = 0
    return weight(out_f, n, seed=seed + 1, dtype=torch.float32).to(DEVICE), h.float().to(DEVICE)


def _assert_same_codes(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    assert (a == b).float().mean() >= 0.999


def _fused_and_torch(w, h, monkeypatch, **kwargs):
    ref = gptq_quantize(w, h, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(G, "_use_triton_sweep", lambda w: True)  # the fused sweep on any device
        fused = gptq_quantize(w, h, **kwargs)
    return w, h, fused, ref


def _row_losses(w: torch.Tensor, h: torch.Tensor, result) -> torch.Tensor:
    d = (w - result.dequantize()).double()
    return ((d @ h.double()) * d).sum(1)


def _check_solve(w, h, fused, ref) -> None:
    assert fused.method == ref.method == "gptq" and fused.damp == ref.damp
    _assert_same_codes(fused.codes, ref.codes)
    assert torch.equal(fused.g_idx, ref.g_idx)
    same = (fused.codes == ref.codes).all(1)
    assert same.float().mean() >= 0.95
    assert torch.allclose(fused.scales[same], ref.scales[same], rtol=1e-5, atol=1e-7)
    rows_fused, rows_ref = _row_losses(w, h, fused), _row_losses(w, h, ref)
    assert torch.allclose(rows_fused[same], rows_ref[same], rtol=1e-3)
    assert float(rows_fused[same].sum()) == pytest.approx(float(rows_ref[same].sum()), rel=1e-3)
    assert fused.loss == pytest.approx(ref.loss, rel=1e-2)


# bits, group_size, sym, act_order, clip, columns: in-kernel grids (g32 / g128 with partial last groups),
# grids from torch (group -1, clip), 3 bits (codes only, no packing here)
CASES = [
    (4, 128, True, False, False, 300),
    (4, 128, False, True, False, 300),
    (2, 32, False, False, False, 200),
    (8, 32, True, True, False, 200),
    (3, 64, True, False, False, 200),
    (2, -1, True, True, False, 150),
    (8, -1, False, False, False, 150),
    (4, 32, False, True, True, 200),
    (4, -1, True, False, True, 150),
]


@pytest.mark.parametrize(("bits", "group_size", "sym", "act_order", "clip", "n"), CASES)
def test_fused_sweep_solves_like_the_torch_loop(bits, group_size, sym, act_order, clip, n, monkeypatch):
    w, h = _inputs(40, n, seed=bits, dead=5)
    kwargs = {"bits": bits, "group_size": group_size, "sym": sym, "act_order": act_order, "clip": clip}
    _check_solve(*_fused_and_torch(w, h, monkeypatch, **kwargs))


@pytest.mark.slow
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fused_sweep_grid_of_settings(bits, group_size, act_order, sym, monkeypatch):
    w, h = _inputs(48, 300, seed=10 * bits + max(group_size, 0))
    kwargs = {"bits": bits, "group_size": group_size, "sym": sym, "act_order": act_order}
    _check_solve(*_fused_and_torch(w, h, monkeypatch, **kwargs))


@pytest.mark.slow
def test_groups_wider_than_a_launch_block(monkeypatch):
    """Group 320 > MAX_BLOCK: torch computes each group's grid, launches are cut inside the group."""
    w, h = _inputs(24, 700, seed=3)
    _check_solve(*_fused_and_torch(w, h, monkeypatch, bits=4, group_size=320, sym=False))


@pytest.mark.parametrize(("group_size", "clip"), [(32, False), (-1, False), (32, True)])
def test_sweep_outputs_match_with_several_row_tiles(group_size, clip):
    """The column functions side by side: 40 rows in tiles of 16 (a partial last tile), both grid modes."""
    w, h = _inputs(40, 96, seed=7)
    u = G.upper_inverse_cholesky(h, 0.01 * float(h.diagonal().mean()))
    a = G._gptq_columns(w, u, 4, group_size, False, clip, 64)
    b = TG.gptq_columns_triton(w, u, 4, group_size, False, clip, 64, rows_per_program=16)
    _assert_same_codes(b[0], a[0])
    for x, y in zip(a[1:], b[1:]):
        assert x.shape == y.shape and torch.allclose(x, y, rtol=1e-5, atol=1e-6)


def test_shared_solve_uses_the_fused_sweep_for_stacked_weights(monkeypatch):
    calls = []
    real = TG.gptq_columns_triton
    monkeypatch.setattr(G, "_use_triton_sweep", lambda w: True)
    monkeypatch.setattr(TG, "gptq_columns_triton", lambda w, *a: calls.append(tuple(w.shape)) or real(w, *a))
    (w1, h), (w2, _) = _inputs(16, 64, seed=1), _inputs(8, 64, seed=2)
    fused = gptq_quantize_shared([w1, w2], h, bits=4, group_size=32)
    monkeypatch.setattr(G, "_use_triton_sweep", lambda w: False)
    ref = gptq_quantize_shared([w1, w2], h, bits=4, group_size=32)
    assert calls == [(24, 64)]
    for wi, f, r in zip((w1, w2), fused, ref):
        _check_solve(wi, h, f, r)


def test_first_layer_checks_the_fused_sweep_against_the_torch_loop(monkeypatch, caplog):
    """On each device the first solve runs both; a fused sweep that disagrees is reported and dropped."""
    monkeypatch.setattr(G, "_sweep_verified", {})
    monkeypatch.setattr(G, "_use_triton_sweep", lambda w: True)
    real, calls = TG.gptq_columns_triton, []

    def broken(w, *a):
        calls.append(tuple(w.shape))
        codes, *rest = real(w, *a)
        return (codes ^ 1, *rest)  # every code off by one bit

    monkeypatch.setattr(TG, "gptq_columns_triton", broken)
    w, h = _inputs(16, 64, seed=3)
    first = gptq_quantize(w, h, bits=4, group_size=32)
    second = gptq_quantize(w, h, bits=4, group_size=32)
    monkeypatch.setattr(G, "_use_triton_sweep", lambda w: False)
    ref = gptq_quantize(w, h, bits=4, group_size=32)
    assert calls == [(16, 64)]  # checked once, then never used again
    assert "disagrees" in caplog.text
    assert torch.equal(first.codes, ref.codes) and torch.equal(second.codes, ref.codes)
    assert G._sweep_verified == {str(w.device): False}


def test_a_fused_sweep_that_agrees_is_kept(monkeypatch):
    monkeypatch.setattr(G, "_sweep_verified", {})
    monkeypatch.setattr(G, "_use_triton_sweep", lambda w: True)
    w, h = _inputs(16, 64, seed=4)
    gptq_quantize(w, h, bits=4, group_size=32)
    assert G._sweep_verified == {str(w.device): True}


def test_dispatch_is_cuda_float32_only():
    assert not G._use_triton_sweep(torch.zeros(4, 4))  # CPU tensors keep the torch loop
    assert "float32" in TG.columns_unavailable_reason(torch.zeros(4, 4, dtype=torch.float64, device=DEVICE))
    if torch.cuda.is_available():
        assert G._use_triton_sweep(torch.zeros(4, 4, device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_solve_matches_cpu_torch_loop():
    w, h = _inputs(256, 1024, seed=5)
    kwargs = {"bits": 4, "group_size": 128, "act_order": True}
    cuda = gptq_quantize(w.cuda(), h.cuda(), **kwargs)  # fused sweep
    cpu = gptq_quantize(w.cpu(), h.cpu(), **kwargs)  # torch loop (and CPU Cholesky: U differs in rounding)
    moved = {f.name: getattr(cuda, f.name) for f in dataclasses.fields(cuda)}
    moved.update({k: v.cpu() for k, v in moved.items() if isinstance(v, torch.Tensor)})
    _check_solve(w.cpu(), h.cpu(), type(cuda)(**moved), cpu)


@pytest.mark.parametrize("group_size", [-1, 8])
def test_exact_ties_round_half_to_even(group_size):
    """U = I (no error feedback) and scale exactly 1: every .5 is a tie, resolved as torch.round does."""
    row = torch.tensor([7.0, -0.5, 0.5, 1.5, 2.5, -1.5, -2.5, 3.5])
    w = torch.stack([row, -row, row.flip(0)]).to(DEVICE)
    u = torch.eye(8, device=DEVICE)
    a = G._gptq_columns(w, u, 4, group_size, True, False, 8)
    b = TG.gptq_columns_triton(w, u, 4, group_size, True, False, 8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[3], b[3])
    assert a[0][0, 1:5].tolist() == [8, 8, 10, 10]  # zero 8: -0.5 -> -0, 0.5 -> 0, 1.5 -> 2, 2.5 -> 2

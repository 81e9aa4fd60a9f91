"""The GPTQ column kernel (ops/cpu_gptq.py + csrc/gptq_columns_avx2.c): the sweep the torch loop computes (to
rounding), against the float64 reference too, used only after its self-check, and the torch loop where it is
unavailable or disagrees."""

from __future__ import annotations

import pytest
import torch

from hf_vlm_gptq.ops import cpu_gptq, gptq_quantize
from hf_vlm_gptq.ops import gptq as G
from hf_vlm_gptq.ops import kernel_cache as KC

from .helpers import correlated_hessian, weight
from .reference_gptq import reference_gptq

KERNEL = G._cpu_kernel(torch.zeros(1, 1))
needs_kernel = pytest.mark.skipif(KERNEL is None, reason=f"GPTQ column kernel unavailable: {cpu_gptq._state.get('reason')}")


def _factor(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    h = correlated_hessian(n, seed).float()
    return h, G.upper_inverse_cholesky(h, 0.01 * float(h.diagonal().mean()))


def _loss(w: torch.Tensor, q_t: torch.Tensor, h: torch.Tensor) -> float:
    d = (w.t() - q_t).double()
    return float(((h.double() @ d) * d).sum())


@pytest.fixture
def fresh_state(monkeypatch):
    monkeypatch.setattr(cpu_gptq, "_state", {})


@needs_kernel
@pytest.mark.parametrize(("bits", "group_size", "sym", "clip", "gptaq"),
                         [(4, 128, True, True, False), (4, 32, False, False, True), (3, 48, True, False, False),
                          (2, -1, False, True, False), (8, 64, True, False, True)])
@pytest.mark.parametrize(("out", "n"), [(300, 256), (7, 200), (1030, 96)])
def test_the_kernel_sweeps_as_the_torch_loop(bits, group_size, sym, clip, gptaq, out, n):
    """Same codes (a rounding tie may flip a handful, which then moves that output's later columns), the
    same quantized weight to rounding elsewhere, the same loss; partial last groups (200 / 48), a group
    wider than the block (-1), outputs not a multiple of a tile (1030, 7)."""
    h, u = _factor(n, seed=n + bits)
    w = weight(out, n, seed=out, dtype=torch.float32)
    p = G.gptaq_correction(0.05 * h.flip(0), u) if gptaq else None
    ref = G._gptq_columns(w, u, bits, group_size, sym, clip, 128, p=p)
    got = G._gptq_columns(w, u, bits, group_size, sym, clip, 128, p=p, kernel=KERNEL)
    same = (ref[0] == got[0]).all(1)  # outputs without a flipped code
    # 1 % of the outputs, and at least one: a value exactly on a rounding tie (x / s against x * (1 / s))
    # flips one of the 7 outputs when the factor's rounding happens to land there
    assert int((~same).sum()) <= max(1, out // 100)
    assert torch.allclose(got[3][:, same], ref[3][:, same], rtol=1e-4, atol=1e-5)
    assert torch.allclose(got[1][same], ref[1][same], rtol=1e-4)  # each group's grid, from updated columns
    assert _loss(w[same], got[3][:, same], h) == pytest.approx(_loss(w[same], ref[3][:, same], h), rel=2e-3)


@needs_kernel
@pytest.mark.parametrize(("bits", "group_size", "act_order"), [(4, 64, False), (3, 32, True)])
def test_through_the_kernel_gptq_tracks_the_float64_reference(bits, group_size, act_order):
    n = 256
    h = correlated_hessian(n, seed=5)
    w = weight(96, n, seed=6)
    codes, _, _, loss = reference_gptq(w, h, bits, group_size, True, act_order)
    ours = gptq_quantize(w.float(), h.float(), bits=bits, group_size=group_size, act_order=act_order)
    assert ours.method == "gptq"
    assert float((ours.codes.long() == codes).float().mean()) > 0.98
    assert ours.loss == pytest.approx(float(loss), rel=5e-3)


@needs_kernel
def test_a_kernel_that_sweeps_wrong_is_never_used(fresh_state, monkeypatch, caplog):
    calls = []

    def wrong(w, ldw, out, n, *args):
        calls.append(n)
        return 0  # leaves the columns as they were: nothing quantized

    monkeypatch.setattr(cpu_gptq, "_state", {"lib": wrong})
    h = correlated_hessian(64, seed=1).float()
    w = weight(40, 64, seed=2, dtype=torch.float32)
    with caplog.at_level("WARNING"):
        ours = gptq_quantize(w, h, bits=4, group_size=32)
    monkeypatch.setenv(KC.ENV_SWITCH, "0")
    monkeypatch.setattr(cpu_gptq, "_state", {})
    loop = gptq_quantize(w, h, bits=4, group_size=32)
    assert torch.equal(ours.codes, loop.codes)  # the torch loop served
    assert "self-check" in caplog.text and calls
    checked = len(calls)
    monkeypatch.setattr(cpu_gptq, "_state", {"lib": wrong, "ready": True, "reason": "x"})
    assert G._cpu_kernel(w) is wrong  # (a state that passed is used as is: the check runs once per process)
    monkeypatch.setattr(cpu_gptq, "_state", {"lib": wrong})  # loaded, not yet checked
    monkeypatch.delenv(KC.ENV_SWITCH)
    assert G._cpu_kernel(w) is None and len(calls) > checked and "self-check" in cpu_gptq._state["reason"]


def test_without_the_kernel_the_torch_loop_serves(fresh_state, monkeypatch):
    monkeypatch.setenv(KC.ENV_SWITCH, "0")
    w = weight(30, 64, seed=3, dtype=torch.float32)
    assert G._cpu_kernel(w) is None and "disabled" in cpu_gptq._state["reason"]
    result = gptq_quantize(w, correlated_hessian(64, seed=4).float(), bits=4, group_size=32)
    assert result.method == "gptq"
    assert G._cpu_kernel(w.double()) is None  # float64 never takes it


@needs_kernel
def test_bad_arguments_are_named_before_the_kernel_runs():
    wt, u = torch.zeros(8, 16), torch.eye(8)
    codes, err = torch.zeros(8, 16, dtype=torch.uint8), torch.zeros(8, 16)
    scale, zero = torch.ones(16), torch.zeros(16)
    with pytest.raises(ValueError, match="float32"):
        cpu_gptq.call(KERNEL, wt.double(), u, scale, zero, 15, codes, err)
    with pytest.raises(ValueError, match="shapes disagree"):
        cpu_gptq.call(KERNEL, wt, torch.eye(9), scale, zero, 15, codes, err)
    with pytest.raises(ValueError, match="pre and p"):
        cpu_gptq.call(KERNEL, wt, u, scale, zero, 15, codes, err, pre=torch.zeros(8, 16))
    with pytest.raises(ValueError, match="contiguous rows"):
        cpu_gptq.call(KERNEL, torch.zeros(16, 8).t(), u, scale, zero, 15, codes, err)

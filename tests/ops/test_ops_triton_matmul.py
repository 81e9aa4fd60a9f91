"""Fused Triton matmul on packed GPTQ weights against the reference (dequantize_packed + F.linear).

Runs in the Triton interpreter on CPU (tests/ops/conftest.py) and compiled on CUDA.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from hf_vlm_gptq.ops import QuantLinear, rtn_quantize
from hf_vlm_gptq.ops import backends as B
from hf_vlm_gptq.ops import triton_matmul as TM
from hf_vlm_gptq.ops.backends import int4 as I4
from hf_vlm_gptq.ops.grid import num_groups
from hf_vlm_gptq.ops.packing import dequantize_packed

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = B.BACKENDS["triton"]

pytestmark = pytest.mark.skipif(TRITON.unavailable_reason(B.LayerShape(4, 32, 64, 16), torch.float16,
                                                          torch.device(DEVICE)) is not None,
                                reason="Triton unavailable")
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}  # max abs err / max |ref|: the dtype's output rounding


def _module(out_f, in_f, bits, group_size, act_order, sym, dtype, seed=0, positive_rows=0) -> QuantLinear:
    """A packed layer from RTN codes; with ``act_order`` the groups are reassigned through a random
    permutation, as act-order checkpoints store them (``g_idx[perm[i]] = i // group_size``)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    w[:positive_rows] = w[:positive_rows].abs()  # asymmetric zero point 0: stored as 2**bits - 1 in v1
    res = rtn_quantize(w, bits=bits, group_size=group_size, sym=sym)
    if act_order:
        perm = torch.randperm(in_f, generator=g)
        res.g_idx = torch.empty_like(res.g_idx).index_copy_(0, perm, res.g_idx.clone())
        assert res.scales.shape[1] == num_groups(in_f, group_size)
    return QuantLinear.from_result(res, None, dtype).to(DEVICE)


def _weights(m: QuantLinear) -> TM.PackedWeights:
    return TM.packed_weights(
        m.qweight, m.qzeros, m.scales, m.g_idx, bits=m.bits, group_size=m.group_size,
        in_features=m.in_features, out_features=m.out_features,
    )  # fmt: skip


def _reference(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    w = dequantize_packed(
        m.qweight, m.qzeros, m.scales, m.g_idx, bits=m.bits, in_features=m.in_features,
        out_features=m.out_features, group_size=m.group_size, dtype=x.dtype,
    )  # fmt: skip
    return F.linear(x, w)


def _check(m: QuantLinear, rows: int, dtype: torch.dtype, seed: int = 1) -> None:
    x = torch.randn(rows, m.in_features, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)
    y = TM.triton_matmul(x, _weights(m))
    ref = _reference(m, x)
    assert y.shape == ref.shape and y.dtype == dtype
    err = float((y.float() - ref.float()).abs().max())
    assert err <= TOL[dtype] * float(ref.float().abs().max()), (err, float(ref.abs().max()))


# (bits, group_size, out, in, act_order, sym, dtype): awkward widths, in = 1176 with g128 (last group 24
# columns), act-order, group -1, group sizes that are and are not a multiple of the K step
CASES = [
    (4, 128, 100, 1176, False, True, torch.bfloat16),
    (4, 128, 56, 1176, True, False, torch.float16),
    (2, 128, 8, 1176, True, True, torch.bfloat16),
    (8, 128, 72, 1176, False, False, torch.float16),
    (2, 32, 40, 300, False, False, torch.float16),
    (8, -1, 24, 300, False, True, torch.bfloat16),
    (4, 48, 33, 200, False, False, torch.bfloat16),
    (8, 16, 16, 160, True, True, torch.float16),
]


@pytest.mark.parametrize("rows", [1, 3, 17, 64])
@pytest.mark.parametrize(("bits", "group_size", "out_f", "in_f", "act_order", "sym", "dtype"), CASES)
def test_fused_matmul_matches_dequant_reference(bits, group_size, out_f, in_f, act_order, sym, dtype, rows):
    m = _module(out_f, in_f, bits, group_size, act_order, sym, dtype, positive_rows=2 if not sym else 0)
    _check(m, rows, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40, 130])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fused_matmul_sweep(bits, group_size, act_order, dtype, rows):
    out_f = {2: 100, 4: 64, 8: 24}[bits]
    _check(_module(out_f, 1176, bits, group_size, act_order, False, dtype, seed=bits, positive_rows=1), rows, dtype)


def test_split_k_variant_cuts_k_for_decode_rows():
    """M <= 16 runs the split-K launch (several K slices summed); the result does not depend on the cut."""
    m = _module(8, 1176, 4, 128, False, True, torch.float16)
    w = _weights(m)
    x = torch.randn(2, 1176).half().to(DEVICE)
    launches = []
    real = TM._packed_mm_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    TM._packed_mm_kernel = Spy()
    try:
        y_split = TM.triton_matmul(x, w)
        y_tiled = TM.triton_matmul(torch.cat([x, torch.zeros(15, 1176, dtype=x.dtype, device=DEVICE)]), w)[:2]
    finally:
        TM._packed_mm_kernel = real
    assert launches[0][1] > 1 and launches[1][1] == 1
    assert torch.allclose(y_split.float(), y_tiled.float(), rtol=2e-3, atol=2e-3)


def test_reasons():
    def reason(bits, dtype):
        return TRITON.unavailable_reason(B.LayerShape(bits, 32, 64, 16), dtype, torch.device(DEVICE))

    assert "bits=3" in reason(3, torch.float16)
    assert "dtype" in reason(4, torch.float32)
    assert reason(4, torch.float16) is None and reason(2, torch.bfloat16) is None
    assert "device meta" in TRITON.unavailable_reason(B.LayerShape(4, 32, 64, 16), torch.float16,
                                                      torch.device("meta"))


def test_cuda_policy_replayed_on_cpu(monkeypatch):
    """CUDA's order and batch ranges, replayed on this host (Triton in the interpreter, torch's CPU int4
    kernel in place of the CUDA one): the fused kernel up to its batch limit, then dequantize + matmul;
    the int4 kernel only where the fused kernel cannot serve the layer."""
    monkeypatch.setitem(B.DISPATCH, DEVICE, B.DISPATCH["cuda"])
    monkeypatch.setitem(B.MAX_BATCH, DEVICE, B.MAX_BATCH["cuda"])
    m = _module(32, 128, 4, 32, False, True, torch.bfloat16)
    dense = m.dequantize_weight(torch.bfloat16)
    calls = []
    monkeypatch.setattr(TM, "triton_matmul", lambda x2, w: calls.append(("triton", x2.shape[0])) or x2 @ dense.T)
    real_int4 = I4.int4_matmul
    monkeypatch.setattr(I4, "int4_matmul", lambda x2, w: calls.append(("int4", x2.shape[0])) or real_int4(x2, w))
    limits = B.MAX_BATCH["cuda"]

    def path(rows: int, kernel: str = "auto") -> str | None:
        calls.clear()
        m.kernel = kernel
        y = m(torch.randn(rows, 128, device=DEVICE).to(torch.bfloat16))
        assert y.shape == (rows, 32)
        return calls[-1][0] if calls else "dequant"

    assert path(1) == "triton"
    assert path(limits["triton"]["uncached"]) == "triton"
    assert path(limits["triton"]["uncached"] + 1) == "dequant"
    assert path(limits["triton"]["uncached"] + 1, "triton") == "triton"  # forced: every batch
    m.cache_dequantized = True
    assert path(limits["triton"]["cached"]) == "triton"
    assert path(limits["triton"]["cached"] + 1) == "dequant"
    m.cache_dequantized = False
    monkeypatch.setattr(TM, "triton_matmul", lambda x2, w: torch.zeros_like(x2[:, :32]))  # fails its self-check
    m.clear_cache()
    assert path(limits["int4"]["uncached"]) == "int4"
    assert path(limits["int4"]["uncached"] + 1) == "dequant"
    with pytest.raises(ValueError, match="self-check"):
        path(1, "triton")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_module_triton_mode_runs_the_fused_kernel(dtype, monkeypatch):
    m = _module(40, 1176, 4, 128, True, False, dtype)
    m.bias = torch.nn.Parameter(torch.randn(40, device=DEVICE).to(dtype), requires_grad=False)
    m.kernel = "triton"
    calls = []
    real = TM.triton_matmul
    monkeypatch.setattr(TM, "triton_matmul", lambda x2, w: calls.append(x2.shape[0]) or real(x2, w))
    x = torch.randn(3, 5, 1176, device=DEVICE).to(dtype)
    y = m(x)
    ref = m.forward_reference(x.reshape(-1, 1176))
    assert calls[-1] == 15 and len(calls) == 4  # three self-check probes, then the call
    err = (y.reshape(ref.shape).float() - ref.float()).abs().max()
    assert float(err) <= TOL[dtype] * float(ref.float().abs().max())
    m(x)
    assert len(calls) == 5  # self-check once per module / dtype


def test_failed_self_check_is_reported_and_never_used(monkeypatch, caplog):
    m = _module(16, 128, 4, 32, False, True, torch.float16)
    monkeypatch.setattr(TM, "triton_matmul", lambda x2, w: torch.zeros_like(x2[:, :16]))  # a wrong result
    m.kernel = "triton"
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="self-check"):
        m(torch.randn(2, 128).half().to(DEVICE))
    assert "self-check failed" in caplog.text
    m.kernel = "dequant"
    x = torch.randn(2, 128).half().to(DEVICE)
    assert torch.equal(m(x), m.forward_reference(x))


def test_forcing_triton_where_unsupported_raises():
    m = _module(16, 64, 3, 32, False, True, torch.float16)
    m.kernel = "triton"
    with pytest.raises(ValueError, match="bits=3"):
        m(torch.randn(1, 64).half().to(DEVICE))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_prefers_the_fused_kernel(monkeypatch):
    m = _module(64, 256, 4, 64, True, True, torch.bfloat16)
    calls = []
    real = TM.triton_matmul
    monkeypatch.setattr(TM, "triton_matmul", lambda x2, w: calls.append(x2.shape[0]) or real(x2, w))
    for rows in (1, 16, 300):
        x = torch.randn(rows, 256, device="cuda").to(torch.bfloat16)
        y = m(x)
        ref = m.forward_reference(x)
        assert float((y.float() - ref.float()).abs().max()) <= 1e-2 * float(ref.float().abs().max())
    assert calls[3:] == [1, 16, 300]  # after the three self-check probes
    m.cache_dequantized = True
    m(torch.randn(B.MAX_BATCH["cuda"]["triton"]["cached"] + 1, 256, device="cuda").to(torch.bfloat16))
    assert calls[-1] == 300


def test_batches_past_int32_offsets_are_cut(monkeypatch):
    """Rows beyond what int32 offsets address go in several launches (forced small here)."""
    m = _module(24, 160, 4, 32, True, False, torch.float16)
    w = _weights(m)
    x = torch.randn(40, 160).half().to(DEVICE)
    whole = TM.triton_matmul(x, w)
    real = TM._packed_mm_kernel
    launches = []

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(TM, "_packed_mm_kernel", Spy())
    monkeypatch.setattr(TM, "_MAX_OFFSET", 160 * 17)
    cut = TM.triton_matmul(x, w)
    assert [g[0] for g in launches] == [1, 1, 1]  # 17 + 17 + 6 rows, one program column each
    assert torch.allclose(cut.float(), whole.float(), rtol=2e-3, atol=2e-3)

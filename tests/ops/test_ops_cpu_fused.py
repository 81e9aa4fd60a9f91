"""The fused 4-bit CPU GEMM (ops/cpu_fused.py + csrc): exact dequantization, every shape class against the
reference, the dispatch in QuantLinear / QuantConv, and what happens when the kernel cannot be built."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from hf_vlm_gptq.ops import QuantLinear, rtn_quantize
from hf_vlm_gptq.ops import cpu_fused as CF
from hf_vlm_gptq.ops import kernel_cache as KC
from hf_vlm_gptq.ops.cpu_kernel import build_fused

from .helpers import assert_patch_embed_runs_through, packed_linear, set_amx_kernel_aside

REASON = CF.kernel_unavailable_reason()
needs_kernel = pytest.mark.skipif(REASON is not None, reason=f"fused CPU kernel unavailable: {REASON}")


def _module(out_f: int, in_f: int, group_size: int, act_order: bool = False, sym: bool = True, bias=True,
            bits: int = 4):
    return packed_linear(out_f, in_f, group_size, act_order, sym, bias, bits, kernel="fused")


@pytest.fixture
def count_fused(monkeypatch):
    """The rows of every fused-kernel call, on this host as if it had no AMX (the AMX kernel comes first
    in ``auto``'s order where it exists: tests/ops/test_ops_cpu_amx.py)."""
    set_amx_kernel_aside(monkeypatch)
    calls = []
    real = CF.fused_matmul

    def spy(x2, *args):
        calls.append(x2.shape[0])
        return real(x2, *args)

    monkeypatch.setattr(CF, "fused_matmul", spy)
    return calls


@needs_kernel
@pytest.mark.parametrize(
    ("out_f", "in_f", "group_size", "act_order", "sym"),
    [
        (64, 256, 128, False, True),
        (48, 1176, 128, False, False),  # partial last group, 1176 = Qwen2-VL's patch width
        (112, 1176, 128, True, True),  # act-order: groups scattered over the columns
        (32, 98, -1, False, True),  # per-channel, 98 columns: a partial last int32 word
        (80, 96, 32, True, False),
    ],
)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dequantization_is_bit_exact(out_f, in_f, group_size, act_order, sym, bits):
    """x = identity reads the weight back: every bf16 weight equals the reference's, bit for bit."""
    m = _module(out_f, in_f, group_size, act_order, sym, bias=False, bits=bits)
    eye = torch.eye(in_f, dtype=torch.bfloat16)
    assert torch.equal(m(eye).T, m.dequantize_weight(torch.bfloat16))


@needs_kernel
# rows 1-4: the small-batch path (not for act-order); 6 = GEMM micro-kernel rows; 1021 > one task of 1020 rows
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 13, 1021])
@pytest.mark.parametrize(
    ("out_f", "in_f", "group_size", "act_order"),
    [(48, 1176, 128, False), (112, 256, 64, True), (32, 98, -1, False), (80, 136, 8, False)],
)
def test_matches_reference_within_bf16_rounding(rows, out_f, in_f, group_size, act_order):
    m = _module(out_f, in_f, group_size, act_order)
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    y = m(x)
    w = m.dequantize_weight(torch.float64)
    exact = F.linear(x.double(), w, m.bias.to(torch.bfloat16).double())
    ref = m.forward_reference(x)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, out_f)
    assert _rel_err(y, exact) <= max(2 * _rel_err(ref, exact), 2e-3)
    # elementwise: output rounding + fp32 accumulation away from the exact product of the weights the path
    # uses -- rounded to bf16 like the reference's, or (small-batch path) not rounded at all
    small_batch_path = rows <= 4 and m._prepare("fused", x).regular_group > 0
    w16 = m.dequantize_weight(torch.bfloat16).double()
    exact16 = F.linear(x.double(), w16, m.bias.to(torch.bfloat16).double())
    target = exact if small_batch_path else exact16
    bound = target.abs() * 2**-8 + 1e-5 * (x.double().abs() @ w16.abs().T)
    assert bool(((y.double() - target).abs() <= bound).all())
    assert bool(((ref.double() - exact16).abs() <= bound).all())


def _rel_err(y: torch.Tensor, exact: torch.Tensor) -> float:
    return float((y.double() - exact).norm() / exact.norm())


@needs_kernel
@pytest.mark.parametrize("bits", [2, 8])
@pytest.mark.parametrize("rows", [1, 4, 13])
def test_two_and_eight_bits_take_the_gemm_path(bits, rows, count_fused):
    m = _module(48, 1176, 128, bits=bits)
    m.kernel = "auto"
    x = torch.randn(rows, 1176, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    y = m(x)
    assert count_fused == [rows]
    w16 = m.dequantize_weight(torch.bfloat16).double()
    exact16 = F.linear(x.double(), w16, m.bias.to(torch.bfloat16).double())
    bound = exact16.abs() * 2**-8 + 1e-5 * (x.double().abs() @ w16.abs().T)
    assert bool(((y.double() - exact16).abs() <= bound).all())


@needs_kernel
@pytest.mark.parametrize("act_order", [False, True])
def test_auto_uses_the_fused_kernel(count_fused, act_order):
    """At every batch for groups of consecutive columns; act-order layers keep torch's int4 kernel (which
    permutes the input once) for the few rows where it is faster than the fused GEMM."""
    m = _module(64, 256, 64, act_order=act_order)
    m.kernel = "auto"
    for rows in (1, 4, 5, 300):
        m(torch.randn(rows, 256).to(torch.bfloat16))
    m(torch.randn(300, 256))  # float32: not the fused kernel's dtype
    assert count_fused == ([5, 300] if act_order else [1, 4, 5, 300])


@needs_kernel
def test_patch_embed_goes_through_the_fused_kernel(count_fused):
    assert_patch_embed_runs_through(count_fused)


@needs_kernel
def test_runs_under_inference_mode_and_on_non_contiguous_input():
    with torch.inference_mode():
        m = _module(64, 128, 32)
        x = torch.randn(128, 20).to(torch.bfloat16).T  # [20, 128], not contiguous
        torch.testing.assert_close(m(x), m.forward_reference(x.contiguous()), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(
    ("bits", "out_f", "dtype", "why"),
    [(3, 32, torch.bfloat16, "bits"), (4, 40, torch.bfloat16, "out_features"), (4, 32, torch.float16, "dtype")],
)
def test_forcing_fused_where_unsupported_names_the_reason(bits, out_f, dtype, why):
    res = rtn_quantize(torch.randn(out_f, 64), bits=bits, group_size=32)
    m = QuantLinear.from_result(res, None, dtype)
    m.kernel = "fused"
    with pytest.raises(ValueError, match=why):
        m(torch.randn(8, 64).to(dtype))


def test_out_of_range_g_idx_is_refused_before_the_kernel_reads_it():
    with pytest.raises(ValueError, match="g_idx"):
        build_fused(
            torch.zeros(1, 16, dtype=torch.int32),
            torch.zeros(2, 16, dtype=torch.float16),
            torch.zeros(2, 16, dtype=torch.int32),
            torch.tensor([0, 1, 2, 1], dtype=torch.int32),
            2,
        )


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """A process state where the kernel has not been looked for yet, with an empty cache directory."""
    monkeypatch.setattr(CF, "_state", {})
    monkeypatch.setenv("HF_VLM_GPTQ_CACHE", str(tmp_path))
    return tmp_path


def test_env_switch_disables_the_kernel_and_auto_stays_correct(fresh_state, monkeypatch):
    monkeypatch.setenv(KC.ENV_SWITCH, "0")
    assert "disabled" in CF.kernel_unavailable_reason()
    m = _module(32, 64, 32)
    with pytest.raises(ValueError, match="disabled"):
        m(torch.randn(9, 64).to(torch.bfloat16))
    m.kernel = "auto"
    x = torch.randn(9, 64).to(torch.bfloat16)
    exact = F.linear(x.double(), m.dequantize_weight(torch.float64), m.bias.to(torch.bfloat16).double())
    assert _rel_err(m(x), exact) <= max(2 * _rel_err(m.forward_reference(x), exact), 2e-3)


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="needs /proc/cpuinfo")
def test_a_failing_compiler_leaves_nothing_behind_and_says_why(fresh_state, monkeypatch, caplog):
    monkeypatch.setattr(KC, "cpu_flags", lambda: set(CF.REQUIRED_CPU_FLAGS))
    monkeypatch.setenv("CC", "false")  # exists, always fails
    reason = CF.kernel_unavailable_reason()
    assert reason is not None and "could not build" in reason
    assert list(fresh_state.iterdir()) == []  # no half-written library


def test_missing_cpu_features_and_compiler_are_reported(fresh_state, monkeypatch):
    monkeypatch.setattr(KC, "cpu_flags", lambda: {"avx512f"})
    assert "avx512_bf16" in CF.kernel_unavailable_reason()
    monkeypatch.setattr(CF, "_state", {})
    monkeypatch.setattr(KC, "cpu_flags", lambda: set(CF.REQUIRED_CPU_FLAGS))
    monkeypatch.setattr(KC, "compiler", lambda: None)
    assert "compiler" in CF.kernel_unavailable_reason()


@needs_kernel
def test_library_is_compiled_once_into_the_cache(fresh_state):
    stale = fresh_state / f"{CF.SOURCE.stem}-0000000000000000.so"  # a build of an older source
    stale.write_bytes(b"old")
    assert CF.kernel_unavailable_reason() is None
    assert not stale.exists()
    built = sorted(fresh_state.iterdir())
    assert [p.suffix for p in built] == [".json", ".so"]  # the library and its record
    stamp = built[1].stat().st_mtime_ns
    CF._state.clear()
    assert CF.kernel_unavailable_reason() is None
    assert sorted(fresh_state.iterdir()) == built and built[1].stat().st_mtime_ns == stamp

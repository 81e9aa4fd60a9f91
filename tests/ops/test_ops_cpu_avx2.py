"""The AVX2 + FMA low-bit CPU GEMM (ops/cpu_avx2.py + csrc/lowbit_gemm_avx2.c): exact against a float64
dequantize + matmul, shapes with padding, bf16 and fp32 inputs, act-order, the dispatch on this host, the
switch, and a build failure falling back with a reason. Skips on CPUs without AVX2 / FMA or without a C
compiler (the shape tests); the fallback tests run everywhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_vlm_gptq.ops import QuantLinear, gptq_quantize, rtn_quantize
from hf_vlm_gptq.ops import cpu_avx2 as A
from hf_vlm_gptq.ops import cpu_fused as CF
from hf_vlm_gptq.ops import kernel_cache as KC
from hf_vlm_gptq.ops.backends import BACKENDS, MAX_BATCH, MIN_BATCH, choose
from hf_vlm_gptq.ops.cpu_kernel import FusedWeights

from .helpers import correlated_hessian

REASON = A.kernel_unavailable_reason()
needs_kernel = pytest.mark.skipif(REASON is not None, reason=f"AVX2 CPU kernel unavailable: {REASON}")


def _module(out_f: int, in_f: int, group_size: int, *, act_order: bool = False, bits: int = 4,
            dtype: torch.dtype = torch.bfloat16, kernel: str = "avx2") -> QuantLinear:
    g = torch.Generator().manual_seed(out_f * 31 + in_f)
    w = torch.randn(out_f, in_f, generator=g)
    if act_order:
        res = gptq_quantize(w, correlated_hessian(in_f, seed=2).float(), bits=bits, group_size=group_size,
                            act_order=True)
    else:
        res = rtn_quantize(w, bits=bits, group_size=group_size, sym=False)
    m = QuantLinear.from_result(res, torch.randn(out_f, generator=g), dtype)
    m.kernel = kernel
    return m


def _reference(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """float64 dequantize + matmul, written here from the packed buffers (not the library's dequantize)."""
    bits, out_f, in_f = m.bits, m.out_features, m.in_features
    shifts = torch.arange(0, 32, bits)
    codes = ((m.qweight.unsqueeze(1) >> shifts.view(1, -1, 1)) & (2**bits - 1)).reshape(-1, out_f)[:in_f]
    zeros = ((m.qzeros.unsqueeze(2) >> shifts.view(1, 1, -1)) & (2**bits - 1)).reshape(m.qzeros.shape[0], -1)
    zeros = (zeros[:, :out_f] + 1) & (2**bits - 1)  # GPTQ v1 stores zero - 1, wrapped
    g = m.g_idx.long()
    w = (codes.double() - zeros.double()[g]) * m.scales.double()[g]  # [in, out]
    return x.double() @ w + m.bias.to(x.dtype).double()


def _check(m: QuantLinear, x: torch.Tensor) -> None:
    """Within float rounding of the exact product: bf16 outputs are rounded once (2**-8 relative) plus
    float32 accumulation; the library's own dequantize + matmul is the yardstick for the overall error."""
    y = m(x)
    assert y.dtype == x.dtype and y.shape == (x.shape[0], m.out_features)
    exact = _reference(m, x)
    w = m.dequantize_weight(torch.float64).abs()
    scale = x.double().abs() @ w.T
    tol = (2**-8 if x.dtype == torch.bfloat16 else 2**-20) * (exact.abs() + scale) + 1e-6
    assert bool(((y.double() - exact).abs() <= tol).all())
    ref = F.linear(x, m.dequantize_weight(x.dtype), m.bias.to(x.dtype)).double()
    err, ref_err = (y.double() - exact).norm(), (ref - exact).norm()
    assert float(err) <= float(max(ref_err, 1e-6 * exact.norm())) * 1.05


@needs_kernel
@pytest.mark.parametrize(
    ("out_f", "in_f", "group_size", "act_order", "bits"),
    [
        (64, 256, 128, False, 4),
        (40, 100, 32, False, 4),  # 40 = 16 + 16 + 8 outputs (half panel), 100 inputs: a partial int32 word
        (56, 1176, 128, False, 4),  # partial last group (Qwen2-VL's patch width)
        (48, 98, -1, False, 4),  # per-channel
        (72, 200, 64, True, 4),  # act-order: groups scattered over the columns
        (32, 96, 32, False, 2),
        (24, 80, 16, True, 8),
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_exact_against_float64_dequantize_matmul(out_f, in_f, group_size, act_order, bits, dtype):
    m = _module(out_f, in_f, group_size, act_order=act_order, bits=bits, dtype=dtype)
    gen = torch.Generator().manual_seed(7)
    for rows in (1, 2, 5, 6, 7, 13, 64, 241, 300):  # micro-kernel tails, several row blocks
        _check(m, torch.randn(rows, in_f, generator=gen).to(dtype))


@needs_kernel
def test_large_layer_several_threads_and_zero_rows():
    m = _module(256, 512, 128)
    _check(m, torch.randn(300, 512).bfloat16())  # ~40M multiply-adds: the threaded path
    assert m(torch.randn(0, 512).bfloat16()).shape == (0, 256)


@needs_kernel
@pytest.mark.parametrize("cached", [False, True])
def test_dispatch_picks_it_where_the_tables_say_on_this_host(cached):
    m = _module(64, 256, 128, kernel="auto")
    m32 = _module(64, 256, 128, dtype=torch.float32, kernel="auto")  # int4 and the AVX512 kernel: bf16 only
    m.cache_dequantized = m32.cache_dequantized = cached
    most_int4, least = MAX_BATCH["cpu"]["int4"]["avx2"], MIN_BATCH["cpu"]["avx2"].get("cached", 0) if cached else 0
    assert "avx2" not in MAX_BATCH["cpu"]  # no upper limit: it beats dequantize + matmul at every batch
    has_fused = CF.kernel_unavailable_reason() is None
    for rows in (1, 3, 4, 6, 7, 16, 300):
        backend, _ = choose(m, torch.randn(rows, 256).bfloat16(), "auto")
        if has_fused:  # the AVX512 / AMX kernels come first in the order; AVX2 is never int4's alternative there
            assert backend.name in ("int4", "amx", "fused")
        else:
            assert backend.name == ("int4" if rows <= most_int4 else "avx2" if rows >= least else "dequant")
        assert choose(m32, torch.randn(rows, 256), "auto")[0].name == ("avx2" if rows >= least else "dequant")


def test_refusals_name_the_reason():
    layer = _module(40, 64, 32, kernel="dequant")
    backend = BACKENDS["avx2"]
    assert "dtype" in backend.unavailable_reason(layer, torch.float16, torch.device("cpu"))
    assert "device" in backend.unavailable_reason(layer, torch.bfloat16, torch.device("meta"))
    odd = _module(36, 64, 32, kernel="avx2")
    with pytest.raises(ValueError, match="out_features"):
        odd(torch.randn(3, 64).bfloat16())
    three = QuantLinear.from_result(rtn_quantize(torch.randn(32, 64), bits=3, group_size=32), None, torch.bfloat16)
    three.kernel = "avx2"
    with pytest.raises(ValueError, match="bits=3"):
        three(torch.randn(3, 64).bfloat16())


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """A process state where the AVX2 kernel has not been looked for yet, with an empty cache directory."""
    monkeypatch.setattr(A, "_state", {})
    monkeypatch.setenv("HF_VLM_GPTQ_CACHE", str(tmp_path))
    return tmp_path


def _auto_is_still_correct(m: QuantLinear) -> None:
    m.kernel = "auto"
    x = torch.randn(40, m.in_features).bfloat16()
    assert choose(m, x, "auto")[0].name != "avx2"
    exact = _reference(m, x)
    ref = F.linear(x, m.dequantize_weight(x.dtype), m.bias.to(x.dtype)).double()
    assert float((m(x).double() - exact).norm()) <= 2 * float((ref - exact).norm()) + 1e-3


def test_env_switch_disables_it_and_auto_stays_correct(fresh_state, monkeypatch):
    monkeypatch.setenv(KC.ENV_SWITCH, "0")
    assert "disabled" in A.kernel_unavailable_reason()
    m = _module(32, 64, 32)
    with pytest.raises(ValueError, match="disabled"):
        m(torch.randn(9, 64).bfloat16())
    _auto_is_still_correct(m)


def test_a_build_failure_falls_back_with_a_reason(fresh_state, monkeypatch):
    monkeypatch.setattr(KC, "cpu_flags", lambda: set(A.KERNEL.required_cpu_flags))
    monkeypatch.setenv("CC", "false")  # exists, always fails
    reason = A.kernel_unavailable_reason()
    assert reason is not None and "could not build" in reason
    assert list(fresh_state.iterdir()) == []  # no half-written library
    _auto_is_still_correct(_module(32, 64, 32))


def test_missing_cpu_features_and_compiler_are_reported(fresh_state, monkeypatch):
    monkeypatch.setattr(KC, "cpu_flags", lambda: {"avx2"})
    assert "fma" in A.kernel_unavailable_reason()
    monkeypatch.setattr(A, "_state", {})
    monkeypatch.setattr(KC, "cpu_flags", lambda: set(A.KERNEL.required_cpu_flags))
    monkeypatch.setattr(KC, "compiler", lambda: None)
    assert "compiler" in A.kernel_unavailable_reason()


@needs_kernel
def test_its_cache_entry_sits_beside_the_avx512_one_and_is_reused(fresh_state):
    assert A.kernel_unavailable_reason() is None
    built = sorted(fresh_state.iterdir())
    assert [p.suffix for p in built] == [".json", ".so"] and built[1].name.startswith("lowbit_gemm_avx2-")
    stamp = built[1].stat().st_mtime_ns
    A._state.clear()
    assert A.kernel_unavailable_reason() is None
    assert sorted(fresh_state.iterdir()) == built and built[1].stat().st_mtime_ns == stamp


@needs_kernel
def test_a_kernel_that_disagrees_is_never_used(monkeypatch):
    def wrong(*args):
        raise AssertionError("not to be called after a failed check")

    monkeypatch.setattr(A, "_state", {"lib": lambda *a: 0})  # returns without writing the output
    assert "self-check" in A.kernel_unavailable_reason()
    monkeypatch.setattr(A, "_call", wrong)
    _auto_is_still_correct(_module(32, 64, 32))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_its_op_is_traced_by_torch_compile_once_for_every_row_count(dtype):
    from torch._dynamo.utils import counters

    m = _module(64, 128, 32, dtype=dtype)
    weights = m._prepare("avx2", torch.empty(1, 128, dtype=dtype))
    assert isinstance(weights, FusedWeights)
    torch._dynamo.reset()
    counters.clear()
    try:
        fn = torch.compile(lambda x: A.avx2_matmul(x, weights, m.bias) * 2)
        with torch._dynamo.config.patch(recompile_limit=3, fail_on_recompile_limit_hit=True):
            for rows in (3, 5, 7, 16, 33):
                x = torch.randn(rows, 128, dtype=dtype)
                torch.testing.assert_close(fn(x), A.avx2_matmul(x, weights, m.bias) * 2, rtol=0, atol=0)
        assert not counters["graph_break"]
        assert counters["stats"]["unique_graphs"] <= 2  # static first shape, then one dynamic graph
    finally:
        torch._dynamo.reset()

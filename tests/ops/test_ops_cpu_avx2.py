"""The FMA low-bit CPU GEMM (ops/cpu_avx2.py + csrc/lowbit_gemm_fma.c, an AVX2 and an AVX-512 build): each build
this CPU runs exact against a float64 dequantize + matmul on both of its paths (small batch, GEMM), shapes with
padding, bf16 and fp32 inputs, act-order; the faster build serving; the dispatch on this host, the switch, and a
build failure falling back with a reason. Skips on CPUs without AVX2 / FMA or without a C compiler (the shape
tests; the AVX-512 build's without AVX-512F); the fallback tests run everywhere."""

from __future__ import annotations

import functools
import time

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


@functools.cache
def _builds() -> dict:
    return A.builds()


@pytest.fixture(params=[b.entry_name for b in A.BUILDS])
def each_build(request, monkeypatch) -> str:
    """The kernel of one build (loaded and self-checked here) in place of the one this process picked."""
    build = next(b for b in A.BUILDS if b.entry_name == request.param)
    if not set(build.required_cpu_flags) <= KC.cpu_flags():
        assert build is not A.KERNEL
        pytest.skip(f"this CPU lacks the flags of {build.entry_name}")
    fns = _builds()
    assert build.entry_name in fns  # built, loaded and self-checked wherever the CPU has its flags
    monkeypatch.setattr(A, "_state", {"lib": fns[build.entry_name], "build": build.entry_name, "ready": True})
    return build.entry_name


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
        (56, 88, 8, False, 2),  # groups of 8 at 16 codes per word: group edges inside words; 32 + 24 outputs
        (24, 80, 16, True, 8),
        (24, 80, 16, False, 8),
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_exact_against_float64_dequantize_matmul(out_f, in_f, group_size, act_order, bits, dtype, each_build):
    m = _module(out_f, in_f, group_size, act_order=act_order, bits=bits, dtype=dtype)
    gen = torch.Generator().manual_seed(7)
    # every row count of the small-batch path and the first past it, micro-kernel tails, several row blocks
    for rows in (1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 16, 17, 64, 241, 300):
        _check(m, torch.randn(rows, in_f, generator=gen).to(dtype))


def test_the_small_batch_path_and_the_gemm_agree(each_build):
    """The rows of one input through the small-batch path (its first SMALL_ROWS rows alone) and through the GEMM
    path (all rows at once) agree to float32 rounding (of the sum of |x| |w|) on a layer with several threads'
    worth of work."""
    m = _module(520, 1024, 128, dtype=torch.float32)
    x = torch.randn(A.SMALL_ROWS[each_build] + 1, 1024, generator=torch.Generator().manual_seed(3))
    small, gemm = m(x[:-1]), m(x)[:-1]
    scale = x[:-1].abs() @ m.dequantize_weight(torch.float32).abs().T
    assert not torch.equal(small, gemm)  # two paths indeed
    assert bool(((small - gemm).abs() <= 2**-20 * scale).all())
    _check(m, x[:1])


@needs_kernel
def test_the_faster_build_serves(monkeypatch):
    """``fastest`` times the builds on its probe and names the quicker; ``load_fastest`` keeps that one."""
    calls: dict[str, int] = {}

    def fake(name, delay):
        def fn(*args):
            calls[name] = calls.get(name, 0) + 1
            time.sleep(delay)
            return 0
        return fn

    narrow, wide = A.KERNEL.entry_name, A.KERNEL_AVX512.entry_name
    fns = {narrow: fake(narrow, 0.004), wide: fake(wide, 0.0)}
    assert A.fastest(fns) == wide and calls == {narrow: 6, wide: 6}  # 1 and 64 rows, 3 rounds each
    fns = {narrow: fake(narrow, 0.0), wide: fake(wide, 0.004)}
    assert A.fastest(fns) == narrow
    state: dict = {}
    monkeypatch.setattr(KC, "load_kernel", lambda src, one: one.update(lib=fns[src.entry_name]))
    KC.load_fastest(A.BUILDS, state, A.fastest)
    assert state["build"] == narrow and state["lib"] is fns[narrow]


@needs_kernel
@pytest.mark.parametrize(("dtype", "act_order"), [(torch.bfloat16, False), (torch.float32, True)])
def test_long_inputs_go_in_row_chunks_with_the_same_result(monkeypatch, each_build, dtype, act_order):
    """Past ROWS_PER_CALL rows the kernel runs on balanced row chunks (bounding its float32 copy of x): the same
    bits as one call, each chunk above half the limit (so none takes the small-batch path)."""
    m = _module(64, 256, 64, dtype=dtype, act_order=act_order)
    x = torch.randn(250, 256, generator=torch.Generator().manual_seed(3)).to(dtype)
    whole = m(x)
    rows: list[int] = []
    lib = A._state["lib"]
    monkeypatch.setitem(A._state, "lib", lambda *args: rows.append(args[2]) or lib(*args))
    monkeypatch.setattr(A, "ROWS_PER_CALL", 100)
    assert torch.equal(m(x), whole)
    assert rows == [84, 84, 82]


@needs_kernel
def test_wide_inputs_go_in_chunks_whose_float32_copy_the_kernel_keeps(monkeypatch, each_build):
    """Rows whose float32 copy would pass KEPT_COPY_BYTES go in chunks of whole TASK_ROWS blocks that fit:
    64 KB is 64 rows of 256 float32 inputs, so 250 rows in blocks of 32 take four calls; the same bits as one
    call."""
    m = _module(64, 256, 64)
    x = torch.randn(250, 256, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    whole = m(x)
    rows: list[int] = []
    lib = A._state["lib"]
    monkeypatch.setitem(A._state, "lib", lambda *args: rows.append(args[2]) or lib(*args))
    monkeypatch.setattr(A, "KEPT_COPY_BYTES", 64 << 10)
    monkeypatch.setattr(A, "TASK_ROWS", 32)
    assert A.rows_per_call(256) == 64
    assert torch.equal(m(x), whole)
    assert rows == [63, 63, 63, 61]
    monkeypatch.setattr(A, "TASK_ROWS", 240)
    assert A.rows_per_call(256) == 240  # never below one row block


@needs_kernel
def test_large_layer_several_threads_and_zero_rows(each_build):
    m = _module(256, 512, 128)
    _check(m, torch.randn(300, 512).bfloat16())  # ~40M multiply-adds: the threaded path
    assert m(torch.randn(0, 512).bfloat16()).shape == (0, 256)


@needs_kernel
@pytest.mark.parametrize("cached", [False, True])
def test_dispatch_picks_it_where_the_tables_say_on_this_host(cached):
    m = _module(64, 256, 128, kernel="auto")
    m32 = _module(64, 256, 128, dtype=torch.float32, kernel="auto")  # int4 and the AVX512 kernel: bf16 only
    m.cache_dequantized = m32.cache_dequantized = cached
    column = BACKENDS["avx2"].variant(m, None)  # the build that serves: "avx2" or "avx512"
    assert column == ("avx512" if A.build_in_use() == A.KERNEL_AVX512.entry_name else "avx2")
    most_int4, least = MAX_BATCH["cpu"]["int4"][column], MIN_BATCH["cpu"]["avx2"].get("cached", 0) if cached else 0
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
def test_its_cache_entries_sit_beside_the_avx512_one_and_are_reused(fresh_state):
    assert A.kernel_unavailable_reason() is None
    built = sorted(fresh_state.iterdir())
    runnable = [b.entry_name for b in A.BUILDS if set(b.required_cpu_flags) <= KC.cpu_flags()]
    assert sorted(p.name.split("-")[0] + p.suffix for p in built) == sorted(
        n + suffix for n in runnable for suffix in (".json", ".so"))
    assert A._state["build"] in runnable
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

    m = _module(64, 128, 32, dtype=dtype, act_order=True)  # its sorted copy: the op takes x's column order too
    prepared = m._prepare("avx2", torch.empty(1, 128, dtype=dtype))
    weights, order = prepared.fused, prepared.input_order
    assert isinstance(weights, FusedWeights) and order is not None
    torch._dynamo.reset()
    counters.clear()
    try:
        fn = torch.compile(lambda x: A.avx2_matmul(x, weights, m.bias, order) * 2)
        with torch._dynamo.config.patch(recompile_limit=3, fail_on_recompile_limit_hit=True):
            for rows in (3, 5, 7, 16, 33):
                x = torch.randn(rows, 128, dtype=dtype)
                torch.testing.assert_close(fn(x), A.avx2_matmul(x, weights, m.bias, order) * 2, rtol=0, atol=0)
        assert not counters["graph_break"]
        assert counters["stats"]["unique_graphs"] <= 2  # static first shape, then one dynamic graph
    finally:
        torch._dynamo.reset()

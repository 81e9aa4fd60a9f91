"""The AMX low-bit CPU GEMM (ops/cpu_amx.py + csrc/lowbit_gemm_amx.c): the reference's bf16 weights times x
within float32 summation on every shape class and ragged edge, its place in ``auto``, and, on every host,
what a CPU without AMX is told and that the self-check refuses a wrong kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_vlm_gptq.ops import QuantLinear
from hf_vlm_gptq.ops import cpu_amx as AMX
from hf_vlm_gptq.ops import cpu_fused as CF
from hf_vlm_gptq.ops import kernel_cache as KC
from hf_vlm_gptq.ops.backends import BACKENDS, MAX_BATCH, MIN_BATCH, choose
from hf_vlm_gptq.ops.cpu_kernel import fused_weights_of

from .helpers import assert_patch_embed_runs_through, packed_linear

REASON = AMX.kernel_unavailable_reason()
needs_amx = pytest.mark.skipif(REASON is not None, reason=f"AMX CPU kernel unavailable: {REASON}")


def _module(out_f: int, in_f: int, group_size: int, act_order: bool = False, sym: bool = True, bits: int = 4,
            kernel: str = "amx") -> QuantLinear:
    return packed_linear(out_f, in_f, group_size, act_order, sym, bits=bits, kernel=kernel)


def _small_batch_path(m: QuantLinear, rows: int) -> bool:
    w = m._prepare("amx", torch.empty(0, m.in_features, dtype=torch.bfloat16)).fused
    regular = w.regular_group > 0 and (w.regular_group % 32 == 0 or w.regular_group >= w.in_features)
    return regular and rows <= AMX.SMALL_BATCH_ROWS.get(w.bits, 0)


def _assert_reference_product(m: QuantLinear, x: torch.Tensor, y: torch.Tensor) -> None:
    """y is x times the reference's bf16 weights (+ bias) summed in float32 and rounded once to bf16: within
    2^-8 of the exact product of those weights, plus float32 summation error. A kernel that left the weights
    unrounded (off by up to 2^-9 each) or summed in bf16 would miss this bound. The small-batch path is held
    to the unrounded weights (float32 is exact for them) the same way."""
    rounded = torch.float32 if _small_batch_path(m, x.shape[0]) else torch.bfloat16
    w16 = m.dequantize_weight(rounded).double()
    exact16 = F.linear(x.double(), w16, m.bias.to(torch.bfloat16).double())
    bound = exact16.abs() * 2**-8 + 1e-5 * (x.double().abs() @ w16.abs().T)
    assert bool(((y.double() - exact16).abs() <= bound).all())


@pytest.fixture
def count_amx(monkeypatch):
    calls = []
    real = AMX.amx_matmul
    monkeypatch.setattr(AMX, "amx_matmul", lambda x2, *a: calls.append(x2.shape[0]) or real(x2, *a))
    return calls


@needs_amx
@pytest.mark.parametrize(
    ("out_f", "in_f", "group_size", "act_order", "sym", "bits"),
    [
        (64, 256, 128, False, True, 4),
        (48, 1176, 128, False, False, 4),  # 1176 inputs: not a multiple of 32 (a padded last tile)
        (112, 1176, 128, True, True, 4),  # act-order: groups scattered over the columns
        (32, 98, -1, False, True, 4),  # per-channel, a partial last int32 word
        (80, 96, 32, True, False, 2),  # five column tiles: a half pair at the panel's end
        (272, 264, 64, False, True, 8),  # a second panel of 16 columns
    ],
)
@pytest.mark.parametrize("rows", [1, 5, 17, 33, 48, 70])
def test_matches_the_reference_weights_within_float32_summation(out_f, in_f, group_size, act_order, sym, bits,
                                                                rows):
    m = _module(out_f, in_f, group_size, act_order, sym, bits)
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    _assert_reference_product(m, x, m(x))


@needs_amx
def test_a_build_whose_small_batch_path_takes_four_row_tiles(monkeypatch, tmp_path):
    """SMALL_BATCH_ROWS up to 64 is a supported build (four x tiles, one column tile at a time): it passes the
    self-check and gives the unrounded weights' product at 49 and 64 rows, 4 and 8 bits."""
    import dataclasses

    flags = (*(f for f in AMX.KERNEL.cflags if not f.startswith("-DSMALL_ROWS")), "-DSMALL_ROWS=64",
             "-DSMALL_ROWS8=64")
    monkeypatch.setattr(AMX, "KERNEL", dataclasses.replace(AMX.KERNEL, cflags=flags))
    monkeypatch.setattr(AMX, "SMALL_BATCH_ROWS", {4: 64, 8: 64})
    monkeypatch.setattr(AMX, "_state", {})
    monkeypatch.setenv("HF_VLM_GPTQ_CACHE", str(tmp_path))
    assert AMX.kernel_unavailable_reason() is None
    for bits in (4, 8):
        m = _module(80, 1176, 128, sym=False, bits=bits)
        for rows in (49, 64):
            x = torch.randn(rows, 1176, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
            _assert_reference_product(m, x, m(x))


@needs_amx
def test_more_rows_than_one_task_and_any_thread_count_give_the_same_result():
    """1030 rows: two row blocks; 1, 2 and 5 threads: other panel widths (narrowed until each thread has two
    tasks). Each output is one tile's float32 sums in a fixed order, so not a bit changes."""
    m = _module(1024, 512, 128)
    x = torch.randn(1030, 512, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    threads, outputs = torch.get_num_threads(), []
    try:
        for count in (1, 2, 5):
            torch.set_num_threads(count)
            outputs.append(m(x))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outputs[0], y) for y in outputs[1:])
    _assert_reference_product(m, x, outputs[0])


@needs_amx
def test_work_buffers_kept_between_calls_carry_nothing_over():
    """The kernel keeps its work buffers per thread from call to call (csrc/thread_scratch.h): calls of other
    sizes in between (more rows than one task, a ragged input width, the small-batch path, a wider layer)
    leave every result what it is alone, bit for bit, and each the reference's product."""
    gen = torch.Generator().manual_seed(3)
    layers = [(_module(96, 600, 120), 1100), (_module(64, 256, 128), 37), (_module(48, 1176, 128), 70),
              (_module(256, 2048, 128), 600)]
    inputs = [torch.randn(rows, m.in_features, generator=gen).to(torch.bfloat16) for m, rows in layers]
    first = [m(x) for (m, _), x in zip(layers, inputs)]
    again = [m(x) for (m, _), x in reversed(list(zip(layers, inputs)))][::-1]
    for (m, _), x, y, z in zip(layers, inputs, first, again):
        assert torch.equal(y, z)
        _assert_reference_product(m, x, y)


@needs_amx
@pytest.mark.parametrize("act_order", [False, True])
def test_auto_takes_every_bf16_batch(count_amx, act_order):
    """The fixed table (tests run with HF_VLM_GPTQ_DISPATCH=table): the AMX kernel comes first in the CPU
    order with no batch limit, and torch's int4 kernel keeps no rows against it, act-order layers included
    (they take a copy sorted by group); float32 never goes to it."""
    m = _module(64, 256, 64, act_order=act_order, kernel="auto")
    batches = (1, 2, 4, 5, 300)
    for rows in batches:
        m(torch.randn(rows, 256).to(torch.bfloat16))
    m(torch.randn(300, 256))
    assert "amx" not in MIN_BATCH["cpu"] and MAX_BATCH["cpu"]["int4"]["amx"] == 0
    assert count_amx == list(batches)
    sorted_copy = m._prepare("amx", torch.empty(0, 256, dtype=torch.bfloat16)).input_order is not None
    assert sorted_copy == act_order


@needs_amx
def test_patch_embed_goes_through_it(count_amx):
    assert_patch_embed_runs_through(count_amx)


@needs_amx
def test_the_torch_op_is_the_kernel():
    """``hf_vlm_gptq::fused_matmul_amx`` (what ``torch.compile`` traces) gives the eager call's bits, and its
    fake implementation the right shape and dtype."""
    m = _module(48, 96, 32)
    w = m._prepare("amx", torch.empty(0, 96, dtype=torch.bfloat16)).fused
    x = torch.randn(7, 96).to(torch.bfloat16)
    bias = m.bias.to(torch.bfloat16)
    assert torch.equal(torch.ops.hf_vlm_gptq.fused_matmul_amx(x, bias, *w.op_fields()), AMX.amx_matmul(x, w, bias))
    torch.library.opcheck(AMX.amx_matmul_op, (x, bias, *w.op_fields()), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(not set(AMX.KERNEL.required_cpu_flags) <= KC.cpu_flags() or KC.compiler() is None,
                    reason="not an AMX host with a C compiler")
def test_on_an_amx_host_the_kernel_builds_and_passes_its_self_check():
    """Where the CPU has AMX, a kernel that fails its probes would skip the tests above: it must not."""
    assert REASON is None


def test_a_cpu_without_amx_is_told_which_flags_are_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(AMX, "_state", {})
    monkeypatch.setenv("HF_VLM_GPTQ_CACHE", str(tmp_path))
    monkeypatch.setattr(KC, "cpu_flags", lambda: set(CF.REQUIRED_CPU_FLAGS))  # AVX512-BF16, no AMX
    reason = AMX.kernel_unavailable_reason()
    assert "amx_tile" in reason and "amx_bf16" in reason
    m = _module(64, 256, 128, kernel="auto")
    x = torch.randn(64, 256).to(torch.bfloat16)
    assert choose(m, x, "auto")[0].name != "amx"
    m.kernel = "amx"
    with pytest.raises(ValueError, match=r"kernel='amx' is unavailable.*amx_tile"):
        m(x)
    assert BACKENDS["amx"].unavailable_reason(m, torch.float32, torch.device("cpu")).startswith("input dtype")
    assert not list(tmp_path.glob(f"{AMX.SOURCE.stem}*"))  # no AMX build was tried


def _first_group_weight(w) -> torch.Tensor:
    """The weight of the kernel data ``w`` as a kernel would compute it that read group 0's scales and zero
    points for every input column (float32 [out, in])."""
    per_word = 32 // w.bits
    k = torch.arange(w.in_features)
    codes = (w.qweight[k // per_word] >> (w.bits * (k % per_word))[:, None]) & ((1 << w.bits) - 1)
    return ((codes.float() - w.zeros[0].float()) * w.scales[0].float()).T


def test_the_self_check_refuses_a_kernel_that_reads_the_wrong_group(monkeypatch):
    """The probes hold the kernel to the reference: one that applies the first group's scales everywhere is
    refused, naming the probe layer that caught it. Needs no AMX: the kernel call is a stand-in."""
    seen = []

    def wrong_group(fn, x2, w, bias, what, *more_args):
        seen.append(tuple(x2.shape))
        return F.linear(x2.float(), _first_group_weight(w), bias.float()).to(torch.bfloat16)

    monkeypatch.setattr(AMX, "call_bf16_kernel", wrong_group)
    reason = AMX._self_check(None)
    assert reason is not None and "error" in reason and "group" in reason and seen


def _weight(w) -> torch.Tensor:
    """The float32 weight [out, in] the kernel data ``w`` stands for."""
    from hf_vlm_gptq.ops.packing import unpack_codes

    g = w.g_idx.long()
    codes = unpack_codes(w.qweight, w.bits, w.in_features).float()
    return (codes - w.zeros.float().T[:, g]) * w.scales.float().T[:, g]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_act_order_layers_get_a_copy_sorted_by_group(bits):
    """The AMX backend's layout for act-order layers: the same weight with its input columns in group order
    (consecutive groups, so the kernel's regular paths serve), and x's columns gathered the same way; other
    layers keep the checkpoint's buffers. Pure torch: runs on every host."""
    from hf_vlm_gptq.ops.cpu_kernel import fused_weights_of, sorted_by_group

    m = _module(48, 200, 32, act_order=True, bits=bits)
    w = fused_weights_of(m, "test")
    copy = sorted_by_group(w, m.group_size)
    assert w.regular_group == 0 and copy.fused.regular_group == 32
    assert torch.equal(_weight(copy.fused), _weight(w)[:, copy.input_order])
    assert copy.input_order.dtype == torch.int32 and torch.equal(torch.sort(copy.input_order.long()).values, torch.arange(200))
    plain = fused_weights_of(_module(48, 200, 32, bits=bits), "test")
    kept = sorted_by_group(plain, 32)
    assert kept.input_order is None and kept.fused is plain


@needs_amx
def test_a_column_order_out_of_range_is_refused_before_the_kernel_reads_it():
    """The op's x_order indexes x in the kernel: a wrong dtype, length or value is a ValueError first."""
    m = _module(48, 96, 32)
    w = m._prepare("amx", torch.empty(0, 96, dtype=torch.bfloat16)).fused
    x = torch.randn(3, 96).to(torch.bfloat16)
    for order in (torch.arange(96, dtype=torch.int64), torch.arange(95, dtype=torch.int32),
                  torch.arange(1, 97, dtype=torch.int32)):
        with pytest.raises(ValueError, match="x_order must be contiguous int32"):
            AMX.amx_matmul(x, w, None, order)
    reverse = torch.arange(95, -1, -1, dtype=torch.int32)
    assert torch.equal(AMX.amx_matmul(x, w, None, reverse), AMX.amx_matmul(x.flip(1).contiguous(), w, None))


def test_a_refused_amx_state_is_named_in_the_error():
    """Code 3 (Linux refused the AMX tile state, e.g. before 5.16) reaches the user as that, not as a bare
    number; the self-check that runs first then says it. Needs no AMX: the kernel is a stand-in."""
    m = _module(48, 96, 32)
    w = fused_weights_of(m, "test")
    with pytest.raises(RuntimeError, match=r"code 3: the operating system refused this process the AMX tile state"):
        AMX._call(lambda *args: 3, torch.randn(2, 96).to(torch.bfloat16), w, None)


def _chunked_calls(monkeypatch, rows: int, seed: int, **limits) -> list[int]:
    """Rows of each kernel call for ``rows`` inputs of a 64x256 layer once ``limits`` (attributes of cpu_amx)
    are set, after checking that the chunked result is bit for bit the one-call result."""
    m = _module(64, 256, 64)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    whole = m(x)
    calls = []
    real = AMX.call_bf16_kernel
    monkeypatch.setattr(AMX, "call_bf16_kernel", lambda fn, x2, *a, **k: calls.append(x2.shape[0]) or real(fn, x2, *a, **k))
    for name, value in limits.items():
        monkeypatch.setattr(AMX, name, value)
    assert torch.equal(m(x), whole)
    return calls


@needs_amx
def test_long_inputs_go_in_row_chunks_with_the_same_result(monkeypatch):
    """Past ROWS_PER_CALL rows the kernel runs on balanced row chunks (bounding its tile copy of x): the same
    bits as one call, each chunk above half the limit (so none takes the small-batch path)."""
    assert _chunked_calls(monkeypatch, 250, 3, ROWS_PER_CALL=100) == [84, 84, 82]


@needs_amx
def test_wide_inputs_go_in_chunks_whose_tile_copy_the_kernel_keeps(monkeypatch):
    """Rows whose tile copy would pass KEPT_TILE_COPY_BYTES go in balanced chunks that fit (but never below
    TASK_ROWS rows): 64 KB of copy is 128 rows of 256 bf16 inputs, so 300 rows take three calls; the same bits
    as one call."""
    calls = _chunked_calls(monkeypatch, 300, 4, KEPT_TILE_COPY_BYTES=64 << 10, TASK_ROWS=32)
    assert AMX.rows_per_call(256) == 128 and AMX.rows_per_call(250) == 128
    assert calls == [100, 100, 100]
    monkeypatch.setattr(AMX, "TASK_ROWS", 512)
    assert AMX.rows_per_call(256) == 512  # never below one task's rows

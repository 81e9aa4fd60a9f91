"""The bf16 Hessian kernel (ops/cpu_gram.py + csrc/gram_bf16_avx512bf16.c, csrc/gram_bf16_amx.c on AMX tiles, each
build where the CPU has it): bf16 rows go into the float32
Hessian without a float32 copy, to float32 summation error of the float64 matrix, exactly symmetric; rows it
does not take keep the float32 path; a kernel that fails its self-check is never used."""

from __future__ import annotations

import functools
import logging

import pytest
import torch

from hf_vlm_gptq.ops import AsymmetricAccumulator, HessianAccumulator, cpu_gram
from hf_vlm_gptq.ops import hessian as H
from hf_vlm_gptq.ops import kernel_cache as KC

BUILDS = (cpu_gram.KERNEL, cpu_gram.AMX)

KERNEL = cpu_gram.checked_kernel(cpu_gram._check)
needs_kernel = pytest.mark.skipif(KERNEL is None, reason=f"bf16 Hessian kernel unavailable: "
                                                          f"{cpu_gram._state.get('reason')}")


@functools.cache
def _builds() -> dict:
    """Each build this CPU loads that passes the self-check: {entry name: its function}."""
    found = {}
    for build in BUILDS:
        state: dict = {}
        KC.load_kernel(build, state)
        if "lib" in state and cpu_gram._check(state["lib"], build.entry_name) is None:
            found[build.entry_name] = state["lib"]
    return found


@pytest.fixture(params=[b.entry_name for b in BUILDS])
def each_build(request, monkeypatch) -> str:
    """The kernel of one build (loaded and self-checked here) in place of the one this process picked."""
    build = next(b for b in BUILDS if b.entry_name == request.param)
    if not set(build.required_cpu_flags) <= KC.cpu_flags():
        pytest.skip(f"this CPU lacks the flags of {build.entry_name}")
    fns = _builds()
    assert build.entry_name in fns  # built, loaded and self-checked wherever the CPU has its flags
    monkeypatch.setattr(cpu_gram, "_state", {"lib": fns[build.entry_name], "build": build.entry_name, "ready": True})
    return build.entry_name


@pytest.fixture(autouse=True)
def kernel_wins(monkeypatch):
    """The kernel as the faster path, whatever this CPU measures (its speed is not what these tests check)."""
    monkeypatch.setitem(H._gram_wins, torch.get_num_threads(), True)


def _rows(n: int, columns: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(columns, generator=gen) * 3  # columns of different sizes, as activations have
    return (torch.randn(n, columns, generator=gen) * scale).bfloat16()


def _accumulate(batches: list[torch.Tensor], columns: int, **kwargs) -> torch.Tensor:
    acc = HessianAccumulator(columns)
    for b in batches:
        acc.add_batch(b, **kwargs)
    return acc.hessian


@pytest.fixture
def gram_calls(monkeypatch) -> list[int]:
    """Rows each call of the kernel's wrapper received from the Hessian (not from the self-check's probes,
    which name the kernel they test)."""
    calls: list[int] = []
    real = cpu_gram.add_gram

    def spy(h, pieces, alpha, fn=None, build=None):
        if fn is None:
            calls.append(sum(p.shape[0] for p in pieces))
        return real(h, pieces, alpha, fn, build)

    monkeypatch.setattr(cpu_gram, "add_gram", spy)
    return calls


@needs_kernel
@pytest.mark.parametrize("columns", [256, 272, 528, 2048])
def test_bf16_rows_reach_the_hessian_through_the_kernel(columns, each_build, gram_calls):
    """An odd row count, a partial last panel (272, 528), several flushes (2048 columns: 8M bf16 values
    collected at most), batches of uneven sizes."""
    sizes = [148, 1, 77, 2300, 1500, 9, 4000][: 7 if columns == 2048 else 4]
    batches = [_rows(n, columns, seed=k) for k, n in enumerate(sizes)]
    h = _accumulate(batches, columns)
    x = torch.cat(batches).double()
    expected = (2.0 / x.shape[0]) * (x.t() @ x)
    bound = 2e-6 * (2.0 / x.shape[0]) * (x.abs().t() @ x.abs()) * max(1.0, x.shape[0] / 1000)
    assert gram_calls and sum(gram_calls) >= x.shape[0]  # every row went through the kernel
    assert bool(((h.double() - expected).abs() <= bound).all())
    assert torch.equal(h, h.t())
    # the same matrix as the float32 path of the same values, to float32 rounding
    fp32 = _accumulate([b.float() for b in batches], columns)
    assert torch.allclose(h, fp32, rtol=1e-5, atol=1e-5 * float(fp32.abs().max()))


@needs_kernel
def test_rows_beyond_one_kernel_call_go_in_chunks(monkeypatch, each_build, gram_calls):
    """More rows than one call takes (MAX_ROWS, made small here): chunks, the odd last one padded."""
    monkeypatch.setattr(cpu_gram, "MAX_ROWS", 101)
    batches = [_rows(450, 256, seed=7)]
    h = _accumulate(batches, 256)
    x = batches[0].double()
    expected = (2.0 / 450) * (x.t() @ x)
    assert gram_calls == [450]
    assert torch.allclose(h.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert torch.equal(h, h.t())


@needs_kernel
@pytest.mark.parametrize("with_hessian", [True, False])
def test_gptaq_pairs_of_bf16_rows_take_the_kernel_for_their_hessian(with_hessian, gram_calls):
    """GPTAQ's accumulator keeps bf16 pairs bf16: its H is the plain accumulator's, bit for bit, and its cross
    term the float32 product of the same values (to float32 error of the float64 one); equal inputs, zero."""
    quant = [_rows(n, 272, seed=10 + n) for n in (148, 1, 300)]
    floats = [(q.float() + 0.05 * torch.randn(q.shape, generator=torch.Generator().manual_seed(k))).bfloat16()
              for k, q in enumerate(quant)]
    acc = AsymmetricAccumulator(272, with_hessian=with_hessian)
    for q, f in zip(quant, floats):
        acc.add_pair(q, f)
    q, f = torch.cat(quant).double(), torch.cat(floats).double()
    expected = (2.0 / q.shape[0]) * ((f - q).t() @ q)
    assert torch.allclose(acc.cross.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    if with_hessian:
        assert torch.equal(acc.hessian, _accumulate(quant, 272))
        assert gram_calls == [q.shape[0]] * 2  # this accumulator's, then the plain one's
    else:
        assert not gram_calls
    same = AsymmetricAccumulator(272)
    for piece in quant:
        same.add_pair(piece, piece.clone())
    assert not bool(same.cross.any())


@needs_kernel
@pytest.mark.parametrize(("columns", "weights"), [(200, None), (128, None), (256, 0.5)])
def test_rows_the_kernel_does_not_take_keep_the_float32_path(columns, weights, gram_calls):
    """Widths that are not a multiple of 16 or below MIN_COLUMNS, and weighted rows (scaled in float32)."""
    batches = [_rows(n, columns, seed=n) for n in (100, 61)]
    h = _accumulate(batches, columns, weights=weights)
    x = torch.cat(batches).double()
    expected = (2.0 / x.shape[0]) * (weights or 1.0) * (x.t() @ x)
    assert not gram_calls
    assert torch.allclose(h.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_a_kernel_that_computes_wrong_is_never_used(monkeypatch, caplog, gram_calls):
    calls = []

    def wrong(xt, ldxt, d, n, h, ldh, alpha, threads):
        calls.append(n)
        return 0  # adds nothing

    monkeypatch.setattr(cpu_gram, "_state", {"lib": wrong})
    batches = [_rows(300, 256, seed=3)]
    with caplog.at_level(logging.WARNING, logger="hf_vlm_gptq.ops.cpu_gram"):
        h = _accumulate(batches, 256)
    assert calls  # the self-check ran it ...
    assert "bf16 Hessian kernel self-check failed" in caplog.text and "float32 path" in caplog.text
    assert "self-check failed" in cpu_gram.unavailable_reason(cpu_gram._check)
    assert not gram_calls  # ... and then nothing went through it
    x = batches[0].double()
    assert torch.allclose(h.double(), (2.0 / 300) * (x.t() @ x), rtol=1e-5, atol=1e-4)


def test_without_the_kernel_bf16_rows_take_the_float32_path(monkeypatch, gram_calls):
    monkeypatch.setattr(cpu_gram, "_state", {"reason": "HF_VLM_GPTQ_CPU_KERNEL=0", "ready": True})
    batches = [_rows(64, 256, seed=4), _rows(33, 256, seed=5)]
    h = _accumulate(batches, 256)
    x = torch.cat(batches).double()
    assert not gram_calls
    assert torch.allclose(h.double(), (2.0 / x.shape[0]) * (x.t() @ x), rtol=1e-5, atol=1e-4)


@needs_kernel
def test_where_the_kernel_loses_to_the_float32_path_bf16_rows_take_that_path(monkeypatch, gram_calls):
    """On a CPU where the probe timed the kernel slower (some Intel Xeons), bf16 rows are cast and go
    through the float32 path: the kernel is never called, and the matrix is that path's."""
    monkeypatch.setitem(H._gram_wins, torch.get_num_threads(), False)
    batches = [_rows(n, 512, seed=n) for n in (148, 300)]
    h = _accumulate(batches, 512)
    assert gram_calls == []
    assert torch.equal(h, _accumulate([b.float() for b in batches], 512))
    acc = AsymmetricAccumulator(512)
    acc.add_pair(batches[0], batches[0].float().add(0.01).bfloat16())
    _ = acc.hessian
    assert gram_calls == []


def test_the_choice_is_timed_once_per_thread_count(monkeypatch):
    """gram_kernel_wins times both paths on its probe the first time for a thread count, then remembers."""
    timed = []
    real = H._add_xtx_float32
    monkeypatch.setattr(H, "_add_xtx_float32", lambda *a: timed.append(1) or real(*a))
    monkeypatch.setattr(H, "_gram_wins", {})
    if KERNEL is None:
        pytest.skip("bf16 Hessian kernel unavailable")
    first = H.gram_kernel_wins()
    assert len(timed) == 3 and H.gram_kernel_wins() is first and len(timed) == 3


@needs_kernel
def test_any_thread_count_gives_the_same_matrix(each_build):
    """Each block of h is summed by one thread in a fixed order, so 1, 2 or 3 threads give the same bits
    (a ragged width: 528 columns, a half last block)."""
    x = _rows(700, 528, seed=11)
    threads, out = torch.get_num_threads(), []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            h = torch.zeros(528, 528)
            cpu_gram.add_gram(h, [x], 0.5)
            out.append(h)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(out[0], h) for h in out[1:])

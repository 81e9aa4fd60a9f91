"""The dequantization kernel (ops/cpu_dequant.py + csrc/dequant_avx2.c): bit for bit the torch path of
``packing.dequantize_packed``, used by everything that dequantizes on the CPU, only after its self-check,
never when it disagrees, and the torch path where it is unavailable or does not serve the layer."""

from __future__ import annotations

import ctypes
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_vlm_gptq
from hf_vlm_gptq.ops import QuantLinear, cpu_dequant
from hf_vlm_gptq.ops import kernel_cache as KC
from hf_vlm_gptq.ops import packing as P
from hf_vlm_gptq.ops.result import QuantResult

REASON = cpu_dequant.unavailable_reason(P._dequant_kernel_check)
needs_kernel = pytest.mark.skipif(REASON is not None, reason=f"dequantization kernel unavailable: {REASON}")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _result(bits: int, out_f: int, in_f: int, group_size: int, act_order: bool, seed: int,
            scales: torch.Tensor | None = None) -> QuantResult:
    """Random codes and zero points (every value of the range), float16-exact scales over a wide range."""
    gen = torch.Generator().manual_seed(seed)
    n_groups = 1 if group_size == -1 else math.ceil(in_f / group_size)
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=gen).to(torch.uint8)
    zeros = torch.randint(0, 2**bits, (out_f, n_groups), generator=gen, dtype=torch.int32)
    if scales is None:
        exps = torch.randint(-20, 10, (out_f, n_groups), generator=gen).float()
        scales = (torch.randn(out_f, n_groups, generator=gen) * exps.exp2()).clamp(-6e4, 6e4).half().float()
        scales = torch.where(scales == 0, 1.0, scales)
    g_idx = torch.arange(in_f, dtype=torch.int32) // (in_f if group_size == -1 else group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(in_f, generator=gen)].contiguous()
    return QuantResult(codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, bits=bits, group_size=group_size,
                       sym=False, loss=float("nan"), damp=0.0, method="test", fallback=None, nsamples=0)


def _bits(w: torch.Tensor) -> torch.Tensor:
    return w.view(_INT_VIEW[w.dtype])


@pytest.fixture
def spy(monkeypatch):
    """The checked kernel with a call counter in front (a list of the bit widths it was called for)."""
    fn = cpu_dequant.checked_kernel(P._dequant_kernel_check)
    calls = []

    def counted(*args):
        calls.append(args[8])
        return fn(*args)

    monkeypatch.setattr(cpu_dequant, "_state", {"lib": counted, "ready": True})
    return calls


def _torch_path(module: QuantLinear, dtype: torch.dtype, monkeypatch) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setattr(cpu_dequant, "_state", {"reason": "forced off by the test", "ready": True})
        return module.dequantize_weight(dtype)


# (out, in, group_size, act_order): groups of consecutive columns, act-order, a last partial group, input
# widths not multiples of 8 or 16, output widths not multiples of 8, one row, one column, one group
SHAPES = [
    (64, 256, 128, False),
    (40, 200, 64, True),
    (13, 100, 32, False),
    (30, 77, 16, True),
    (1, 300, 128, False),
    (9, 1, -1, False),
    (24, 96, -1, True),
]


@needs_kernel
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_the_kernel_gives_the_torch_paths_bits(spy, monkeypatch, bits, dtype, shape):
    out_f, in_f, group_size, act_order = shape
    module = QuantLinear.from_result(_result(bits, out_f, in_f, group_size, act_order, seed=bits + in_f))
    got = module.dequantize_weight(dtype)
    assert spy == [bits]
    ref = _torch_path(module, dtype, monkeypatch)
    assert got.dtype == dtype and got.shape == (out_f, in_f) and got.is_contiguous()
    assert torch.equal(_bits(got), _bits(ref))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_ties_round_to_even_and_overflow_like_torch(spy, monkeypatch, dtype):
    # 1 + 2**-8 (and odd multiples): halfway between two bfloat16 values; (1 + 2**-10) * 3: between two float16
    # values; 6e4 * 15 overflows float16
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-10, 6e4, -6e4, 2**-14, 3 * 2**-10])
    scales = ties.repeat(2).view(16, 1).half().float()
    module = QuantLinear.from_result(_result(4, 16, 64, -1, False, seed=7, scales=scales))
    got = module.dequantize_weight(dtype)
    ref = _torch_path(module, dtype, monkeypatch)
    assert spy == [4] and torch.equal(_bits(got), _bits(ref))
    assert not bool(torch.isfinite(ref).all()) or dtype == torch.bfloat16  # the overflow is there to compare


@needs_kernel
def test_several_threads_give_the_same_bits(spy, monkeypatch):
    module = QuantLinear.from_result(_result(4, 520, 1000, 128, True, seed=3))
    assert module.out_features * module.in_features >= cpu_dequant.SERIAL_ELEMS
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = module.dequantize_weight(torch.bfloat16)
    finally:
        torch.set_num_threads(threads)
    assert spy == [4]
    assert torch.equal(_bits(got), _bits(_torch_path(module, torch.bfloat16, monkeypatch)))


@needs_kernel
def test_the_dense_paths_go_through_it(spy):
    module = QuantLinear.from_result(_result(4, 32, 128, 64, False, seed=5), dtype=torch.bfloat16)
    module.kernel = "dequant"
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    y = module(x)
    assert spy == [4]
    assert torch.equal(y, torch.nn.functional.linear(x, module.dequantize_weight()))
    dense = module.to_linear()
    assert len(spy) == 3 and torch.equal(dense.weight, module.dequantize_weight())


@needs_kernel
def test_3_bits_and_float64_take_the_torch_path(spy):
    result3, result4 = _result(3, 16, 64, 32, True, seed=9), _result(4, 16, 64, 32, True, seed=9)
    w3 = QuantLinear.from_result(result3).dequantize_weight(torch.float32)
    w64 = QuantLinear.from_result(result4).dequantize_weight(torch.float64)
    assert spy == []
    assert torch.equal(w3, result3.dequantize()) and torch.equal(w64, result4.dequantize().double())


@needs_kernel
def test_a_kernel_that_writes_zeros_is_never_used(monkeypatch, caplog):
    calls = []

    def zeros(qweight, qzeros, zw, scales, g_idx, groups, n, k, bits, kind, out, threads):
        calls.append(bits)
        ctypes.memset(out, 0, n * k * (4 if kind == 0 else 2))
        return 0

    monkeypatch.setattr(cpu_dequant, "_state", {"lib": zeros})
    module = QuantLinear.from_result(_result(4, 24, 96, 32, False, seed=11))
    with caplog.at_level("WARNING"):
        got = module.dequantize_weight(torch.bfloat16)
    assert "self-check" in caplog.text and calls
    assert "self-check" in cpu_dequant.unavailable_reason(P._dequant_kernel_check)
    checked = len(calls)
    again = module.dequantize_weight(torch.bfloat16)
    assert len(calls) == checked  # not called again
    assert bool((got != 0).any()) and torch.equal(got, again)
    assert torch.equal(_bits(got), _bits(_torch_path(module, torch.bfloat16, monkeypatch)))


def test_without_the_kernel_the_torch_path_serves(monkeypatch):
    monkeypatch.setattr(cpu_dequant, "_state", {})
    monkeypatch.setenv(KC.ENV_SWITCH, "0")
    module = QuantLinear.from_result(_result(4, 24, 96, 32, True, seed=13))
    got = module.dequantize_weight(torch.float32)
    result = _result(4, 24, 96, 32, True, seed=13)
    assert torch.equal(got, result.dequantize())
    assert "disabled" in cpu_dequant.unavailable_reason(P._dequant_kernel_check)


NESTED = """
from hf_vlm_gptq.ops import cpu_avx2, cpu_dequant
print(cpu_avx2.kernel_unavailable_reason(), cpu_dequant._state.get("ready"))
"""


@needs_kernel
def test_a_matmul_kernels_self_check_may_look_the_dequant_kernel_up():
    # in a fresh process the AVX2 kernel's self-check (which dequantizes its probe layers) is the first to look
    # for the dequantization kernel, while its own look-up holds kernel_cache's lock
    env = {**os.environ, "PYTHONPATH": str(Path(hf_vlm_gptq.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", NESTED], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    avx2_reason, dequant_ready = done.stdout.split()[-2:]
    if avx2_reason == "None":
        assert dequant_ready == "True"

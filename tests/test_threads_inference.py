"""The packed layers' thread policy at inference: their matmuls run on fewer threads while other work waits for the
cores (CPU pressure over the last ~0.1 s, threads.PressureWatch: half the count per busy window, down to one),
on the caller's count otherwise."""

from __future__ import annotations

import pytest
import torch

import hf_vlm_gptq.ops.qbase as qbase
import hf_vlm_gptq.threads as threads
from hf_vlm_gptq.ops import QuantLinear, rtn_quantize
from hf_vlm_gptq.ops.backends import BACKENDS


class FakePsi:
    """A /proc/pressure/cpu of our own and a clock: `advance(s, stalled_pct)` moves both."""

    def __init__(self, tmp_path, monkeypatch):
        self.path, self.now, self.total = tmp_path / "cpu", 1000.0, 0
        monkeypatch.setattr(threads.time, "monotonic", lambda: self.now)
        self.write()

    def write(self) -> None:
        self.path.write_text(f"some avg10=0.00 avg60=0.00 avg300=0.00 total={self.total}\n"
                             "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")

    def advance(self, seconds: float, stalled_pct: float) -> None:
        self.now += seconds
        self.total += int(seconds * 1e6 * stalled_pct / 100)
        self.write()


@pytest.fixture
def psi(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_VLM_GPTQ_ADAPTIVE_THREADS", "1")
    return FakePsi(tmp_path, monkeypatch)


def test_the_watch_sees_pressure_within_a_window_holds_it_then_tries_again(psi):
    watch = threads.PressureWatch(str(psi.path), window_s=0.1, hold_s=2.0)
    assert watch.threads(2) == 2  # the first read only sets the baseline
    psi.advance(0.1, stalled_pct=5.0)  # this process's own threads on free cores
    assert watch.threads(2) == 2
    psi.advance(0.1, stalled_pct=90.0)  # another process wants the cores
    assert watch.threads(2) == 1
    psi.advance(0.05, stalled_pct=0.0)  # inside the window: not read again
    assert watch.threads(2) == 1
    for _ in range(15):  # one thread beside one hog: no pressure, but the hold keeps one thread
        psi.advance(0.1, stalled_pct=0.0)
        assert watch.threads(2) == 1
    psi.advance(0.5, stalled_pct=0.0)
    assert watch.threads(2) == 2  # the hold is over: more threads are tried
    psi.advance(0.1, stalled_pct=80.0)
    assert watch.threads(2) == 1  # and the pressure is back at once


def test_many_cores_halve_step_by_step_and_come_back_step_by_step(psi):
    """16 threads beside a busy process: 8 (the fair share of 16 cores between two), 4 if the pressure stays;
    each hold that ends without pressure gives one step back."""
    watch = threads.PressureWatch(str(psi.path), window_s=0.1, hold_s=2.0)
    watch.threads(16)
    seen = []
    for pct in (90.0, 90.0, 0.0, 0.0):
        psi.advance(0.1, stalled_pct=pct)
        seen.append(watch.threads(16))
    assert seen == [8, 4, 4, 4]
    counts = []
    for _ in range(45):  # 4.5 s of calls without pressure
        psi.advance(0.1, stalled_pct=0.0)
        counts.append(watch.threads(16))
    assert counts[:17] == [4] * 17 and counts[18:37] == [8] * 19 and counts[-1] == 16
    for _ in range(8):  # never below one thread
        psi.advance(0.1, stalled_pct=100.0)
        assert watch.threads(16) >= 1
    assert watch.threads(16) == 1


def test_a_long_gap_is_not_read_as_pressure_and_missing_psi_or_the_switch_mean_all_threads(psi, monkeypatch):
    watch = threads.PressureWatch(str(psi.path), window_s=0.1, hold_s=2.0)
    watch.threads(2)
    psi.advance(30.0, stalled_pct=50.0)  # an idle process waking up: 30 s averaged say nothing about now
    assert watch.threads(2) == 2
    psi.advance(0.1, stalled_pct=50.0)
    assert watch.threads(2) == 1
    assert threads.PressureWatch(str(psi.path.with_name("absent"))).threads(2) == 2
    monkeypatch.setenv("HF_VLM_GPTQ_ADAPTIVE_THREADS", "0")
    psi.advance(0.1, stalled_pct=50.0)
    assert watch.threads(2) == 2


@pytest.fixture
def layer():
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    module = QuantLinear.from_result(rtn_quantize(weight, bits=4, group_size=64), bias=None,
                                     dtype=torch.bfloat16).eval()
    module.kernel = "dequant"
    return module


def test_a_packed_layer_computes_on_fewer_threads_while_the_cores_are_busy(layer, psi, monkeypatch):
    seen = []
    backend = BACKENDS["dequant"]
    real = type(backend).matmul

    def matmul(self, *args):
        seen.append(torch.get_num_threads())
        return real(self, *args)

    monkeypatch.setattr(type(backend), "matmul", matmul)
    watch = threads.PressureWatch(str(psi.path), window_s=0.1, hold_s=2.0)
    monkeypatch.setattr(qbase, "CPU_PRESSURE", watch)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(3, 256, dtype=torch.bfloat16)
        with torch.inference_mode():
            quiet = layer(x)
            psi.advance(0.1, stalled_pct=1.0)
            layer(x)
            psi.advance(0.1, stalled_pct=95.0)
            busy = layer(x)
            assert torch.get_num_threads() == 2  # the caller's count is given back
        assert seen == [2, 2, 1]
        torch.testing.assert_close(busy, quiet, rtol=0, atol=0)
    finally:
        torch.set_num_threads(before)

"""The CPU thread policy while quantizing: one thread when parallel ops are slow (other processes hold the
cores), the caller's count when they are fast, and the caller's count given back afterwards."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

import hf_vlm_gptq.threads as threads
from hf_vlm_gptq import VLMGPTQConfig


@pytest.fixture(autouse=True)
def no_pressure_reading(monkeypatch):
    """The probes decide unless a test says the kernel reports CPU pressure; the policy is on (the rest of
    the suite runs with it off, tests/conftest.py)."""
    monkeypatch.setattr(threads, "cpu_pressure", lambda: None)
    monkeypatch.setenv("HF_VLM_GPTQ_ADAPTIVE_THREADS", "1")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def fake_probe(seconds_by_threads):
    def probe(n, _buffer):
        torch.set_num_threads(n)
        return seconds_by_threads[1 if n == 1 else "many"]
    return probe


def test_busy_cores_give_one_thread_and_the_count_comes_back(two_threads, monkeypatch):
    monkeypatch.setattr(threads, "_PROBE_VALID_S", 0.0)  # every refresh probes again
    monkeypatch.setattr(threads, "probe_seconds", fake_probe({"many": 0.030, 1: 0.010}))
    with threads.adaptive_threads() as policy:
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(threads, "probe_seconds", fake_probe({"many": 0.004, 1: 0.010}))
        assert policy.refresh() == 2 and torch.get_num_threads() == 2  # the cores came free
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize(("pressure", "chosen"), [(40.0, 1), (0.0, 2), (6.0, 2)])
def test_cpu_pressure_gives_one_thread_without_probing(two_threads, monkeypatch, pressure, chosen):
    """Tens of % (another process wants the cores): one thread at once. A few % is what this process's own
    threads cause on a free 2-core host: the probes decide there."""
    monkeypatch.setattr(threads, "probe_seconds", fake_probe({"many": 0.001, 1: 0.010}))
    monkeypatch.setattr(threads, "cpu_pressure", lambda: pressure)
    with threads.adaptive_threads():
        assert torch.get_num_threads() == chosen


def test_free_cores_keep_the_callers_count(two_threads, monkeypatch):
    monkeypatch.setattr(threads, "probe_seconds", fake_probe({"many": 0.006, 1: 0.010}))
    with threads.adaptive_threads():
        assert torch.get_num_threads() == 2


def test_switched_off_by_the_environment_or_on_gpu(two_threads, monkeypatch):
    monkeypatch.setattr(threads, "probe_seconds", fake_probe({"many": 0.030, 1: 0.010}))
    monkeypatch.setenv("HF_VLM_GPTQ_ADAPTIVE_THREADS", "0")
    with threads.adaptive_threads():
        assert torch.get_num_threads() == 2
    monkeypatch.delenv("HF_VLM_GPTQ_ADAPTIVE_THREADS")
    with threads.adaptive_threads(enabled=False):
        assert torch.get_num_threads() == 2


def test_a_recent_probe_is_kept_and_an_old_one_measured_again(two_threads, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(threads.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(threads, "probe_seconds", fake_probe({"many": 0.030, 1: 0.010}))
    with threads.adaptive_threads() as policy:
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(threads, "probe_seconds", fake_probe({"many": 0.004, 1: 0.010}))
        now[0] += threads._PROBE_VALID_S / 2
        assert policy.refresh() == 1  # probed a moment ago: kept
        now[0] += threads._PROBE_VALID_S
        assert policy.refresh() == 2  # stale: measured again, the cores came free
        monkeypatch.setattr(threads, "cpu_pressure", lambda: 50.0)
        assert policy.refresh() == 1  # CPU pressure is read before every block, probe or not


def test_quantizing_measures_before_each_block_and_restores_the_count(tiny_qwen2vl_dir, two_threads, monkeypatch):
    monkeypatch.setattr(threads, "_PROBE_VALID_S", 0.0)  # every block probes again
    calls = []

    def probe(n, _buffer):
        calls.append(n)
        torch.set_num_threads(n)
        return 0.030 if n > 1 else 0.010

    monkeypatch.setattr(threads, "probe_seconds", probe)
    seen = []
    real_solve = __import__("hf_vlm_gptq.block_solve", fromlist=["solve_weights"]).solve_weights

    def solve(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_solve(*args, **kwargs)

    monkeypatch.setattr("hf_vlm_gptq.block_solve.solve_weights", solve)
    cfg = VLMGPTQConfig(num_samples=3, w_groupsize=32, calibration_device="cpu")
    AutoModelForImageTextToText.from_pretrained(tiny_qwen2vl_dir, quantization_config=cfg, dtype=torch.float32)
    blocks = 2 + 1 + 2  # vision blocks, merger, LLM layers of the tiny model
    assert len(calls) == 2 * (1 + blocks)  # once at the start, then before every block; both counts each time
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2


def test_the_command_asks_for_passive_waiting_unless_the_user_chose(monkeypatch):
    import hf_vlm_gptq.cli
    import hf_vlm_gptq_launcher

    monkeypatch.setattr(hf_vlm_gptq.cli, "main", lambda: __import__("os").environ["OMP_WAIT_POLICY"])
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert hf_vlm_gptq_launcher.main() == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert hf_vlm_gptq_launcher.main() == "ACTIVE"


"""The measured CPU dispatch (``ops/backends/measure.py``): measured rankings decide ``choose``, the per-CPU
cache (round trip, garbage, flags in the key), the table mode, one measurement per class and process / cache,
and backends this host lacks measured through stand-ins."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from hf_vlm_gptq.ops import QuantLinear, rtn_quantize
from hf_vlm_gptq.ops import backends as B
from hf_vlm_gptq.ops import cpu_fused as CF
from hf_vlm_gptq.ops.backends import dispatch_cache as C
from hf_vlm_gptq.ops.backends import measure as M

from .test_ops_backends import install_stand_ins

MS = 1e-3


@pytest.fixture(autouse=True)
def measured(monkeypatch, tmp_path):
    """Measuring on, the cache in a temporary folder, nothing known before or after."""
    monkeypatch.setenv(M.ENV_MODE, "measure")
    monkeypatch.setenv("HF_VLM_GPTQ_CACHE", str(tmp_path))
    M.forget()
    yield tmp_path
    M.forget()


def _module(out_f: int = 16, in_f: int = 32, bits: int = 4, dtype=torch.float32, seed: int = 0) -> QuantLinear:
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))
    return QuantLinear.from_result(rtn_quantize(w, bits=bits, group_size=32), None, dtype)


@pytest.fixture
def fake_times(monkeypatch):
    """Stand-ins fast / mid / dequant on CPU with a table of their own, and the timer replaced by
    ``times[name][batch]`` (ms); returns (times, the batches timed, the stand-ins)."""
    fast, mid, _ = install_stand_ins(monkeypatch)
    times = {  # fast wins at 1 and 4 rows, mid at 16 and 64, dequant from 256: not what the table says
        "fast": dict(zip(M.BATCHES, (1, 2, 9, 40, 400, 1600))),
        "mid": dict(zip(M.BATCHES, (2, 3, 5, 20, 300, 1200))),
        "dequant": dict(zip(M.BATCHES, (9, 9, 10, 30, 100, 350))),
        C.DENSE: dict(zip(M.BATCHES, (3, 3, 6, 25, 90, 320))),
    }
    timed: list[int] = []

    def timer(fns, reps, deadline):
        batch = fns[C.DENSE].args[0].shape[0]  # F.linear(x, dense): the rows being timed
        timed.append(batch)
        return {name: times[name][batch] * MS for name in fns}

    monkeypatch.setattr(M, "_time_round_robin", timer)
    monkeypatch.setattr(M, "BUDGET_S", 60.0)  # the fake times count against the budget's prediction
    return times, timed, (fast, mid)


def _chosen(module, rows: int) -> str:
    backend, _ = B.choose(module, torch.randn(rows, module.in_features), "auto")
    return backend.name


def test_measured_ranking_decides_choose(fake_times):
    _times, timed, _ = fake_times
    module = _module()
    picks = {rows: _chosen(module, rows) for rows in (1, 2, 8, 9, 64, 128, 129, 5000)}
    assert picks == {1: "fast", 2: "fast", 8: "fast", 9: "mid", 64: "mid", 128: "mid", 129: "dequant",
                     5000: "dequant"}  # buckets end at the geometric midpoints between measured batches
    assert timed == list(M.BATCHES)
    measured = M.measured_for(module, torch.randn(1, 32), [B.BACKENDS[n] for n in B.DISPATCH["cpu"]])
    assert measured.ranges() == {"fast": [(1, 8)], "mid": [(9, 128)], "dequant": [(129, None)]}
    assert measured.ranking(16) == ("mid", "fast", "dequant")  # the dense yardstick is not a choice


def test_a_winner_that_cannot_serve_the_module_gives_way_to_the_next(fake_times):
    _times, _timed, (_fast, mid) = fake_times
    module = _module()
    assert _chosen(module, 16) == "mid"
    other = _module(seed=1)  # same class: no new measurement; its "mid" layout fails
    mid.serves = False
    assert _chosen(other, 16) == "fast"


def test_table_mode_never_measures(fake_times, monkeypatch):
    _times, timed, _ = fake_times
    monkeypatch.setenv(M.ENV_MODE, "table")
    module = _module()
    assert [_chosen(module, rows) for rows in (1, 3, 4, 5, 6)] == ["fast", "fast", "mid", "mid", "dequant"]
    assert timed == []
    monkeypatch.setenv(M.ENV_MODE, "sometimes")
    with pytest.raises(ValueError, match="HF_VLM_GPTQ_DISPATCH must be one of"):
        _chosen(module, 1)


def test_rows_past_an_unfinished_measurement_go_by_the_table(fake_times, monkeypatch):
    _times, timed, _ = fake_times
    monkeypatch.setattr(M, "BUDGET_S", 0.0)  # the deadline has passed after the first batch
    module = _module()
    assert _chosen(module, 1) == "fast" and timed == [1]
    assert _chosen(module, 4) == "mid"  # table: fast serves up to 3 rows against mid
    assert C.Measured((1,), {"fast": (1.0,), C.DENSE: (2.0,)}, False).ranges() == {"fast": [(1, 1)]}


def test_a_batch_predicted_past_the_budget_is_not_timed(fake_times, monkeypatch):
    _times, timed, _ = fake_times
    monkeypatch.setenv(M.ENV_BUDGET, "0.3")  # rounds of 15, 17, 30, 115 ms: ~455 ms predicted at 256
    measured = M.measure(_module(), torch.randn(1, 32), [B.BACKENDS[n] for n in B.DISPATCH["cpu"]])
    assert timed == [1, 4, 16, 64] and measured.batches == (1, 4, 16, 64) and not measured.complete


def test_a_class_is_measured_once_per_process_and_once_per_cache(fake_times, measured, caplog):
    _times, timed, _ = fake_times
    with caplog.at_level(logging.INFO, logger=M.__name__):
        for seed in (0, 1):
            _chosen(_module(seed=seed), 1)
    assert timed == list(M.BATCHES)  # the second layer of the class: nothing measured
    assert caplog.text.count("CPU dispatch for b4-g32-i32-o16-seq-float32-nodense:fast,mid,dequant") == 1
    assert "fast rows 1-8; mid rows 9-128; dequant rows 129-" in caplog.text
    _chosen(_module(in_f=64), 1)  # another class
    assert len(timed) == 2 * len(M.BATCHES)

    M.forget()  # as a new process: the cache file answers
    timed.clear()
    assert [_chosen(_module(), rows) for rows in (1, 16, 256)] == ["fast", "mid", "dequant"]
    assert timed == []
    data = json.loads(C.cache_path(C.cpu_hash()).read_text())
    assert data["schema"] == C.SCHEMA and data["cpu"] == C.cpu_key() and len(data["classes"]) == 2
    assert C.cache_path(C.cpu_hash()).parent == measured / "dispatch"
    assert [p.name for p in (measured / "dispatch").iterdir()] == [C.cache_path(C.cpu_hash()).name]  # no temp


@pytest.mark.parametrize("garbage", [
    "{not json",
    json.dumps({"schema": 999, "classes": {}}),
    "WRONG-CPU",
    "OTHER-BUILD",  # measured with another build of the kernels or the backends: times that no longer hold
    "BAD-TIMES",
])
def test_a_garbage_cache_is_ignored_and_measured_again(fake_times, garbage, caplog):
    _times, timed, _ = fake_times
    path = C.cache_path(C.cpu_hash())
    path.parent.mkdir(parents=True)
    cls = M.shape_class(_module(), torch.float32, [B.BACKENDS[n] for n in B.DISPATCH["cpu"]])
    entry = {"batches": [1], "times": {"fast": [1.0], C.DENSE: [1.0]}, "complete": True}
    if garbage == "WRONG-CPU":
        garbage = json.dumps({"schema": C.SCHEMA, "cpu": {**C.cpu_key(), "model": "other"}, "classes": {cls: entry}})
    elif garbage == "OTHER-BUILD":
        assert C.cpu_key()["code"] == C.code_hash() and len(C.code_hash()) == 16
        garbage = json.dumps({"schema": C.SCHEMA, "cpu": {**C.cpu_key(), "code": "0" * 16}, "classes": {cls: entry}})
    elif garbage == "BAD-TIMES":
        entry["times"]["fast"] = [1.0, 2.0]
        garbage = json.dumps({"schema": C.SCHEMA, "cpu": C.cpu_key(), "classes": {cls: entry}})
    path.write_text(garbage)
    with caplog.at_level(logging.DEBUG, logger=C.__name__):
        assert _chosen(_module(), 16) == "mid"
    assert "ignoring the dispatch cache" in caplog.text and timed == list(M.BATCHES)
    assert C.read_cache(path, C.cpu_key())[cls].ranking(16) == ("mid", "fast", "dequant")  # rewritten, valid


def test_the_cpu_key_differs_by_kernel_flags_and_threads(monkeypatch):
    def key_with(flags, threads=2):
        monkeypatch.setattr(C, "cpu_identity", lambda: ("Some CPU", frozenset(flags)))
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        return C.cpu_hash(), C.cpu_key()

    avx2, key = key_with({"avx2", "fma", "sse4_2"})
    assert key["model"] == "Some CPU" and key["flags"] == ["avx2", "fma"] and key["threads"] == 2
    assert key_with({"avx2", "fma"})[0] == avx2  # flags no kernel reads do not count
    assert key_with({"avx2", "fma", "avx512f", "avx512_bf16"})[0] != avx2
    assert key_with({"avx2", "fma", "amx_bf16", "amx_tile"})[0] != avx2
    assert key_with({"avx2", "fma"}, threads=1)[0] != avx2
    assert C.cache_path(avx2).name == f"{avx2}.json"


def test_tracing_uses_only_what_is_known(fake_times, monkeypatch):
    _times, timed, _ = fake_times
    module, order = _module(), [B.BACKENDS[n] for n in B.DISPATCH["cpu"]]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert M.measured_for(module, torch.randn(1, 32), order) is None and timed == []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    known = M.measured_for(module, torch.randn(1, 32), order)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert M.measured_for(module, torch.randn(1, 32), order) is known


def test_a_failed_measurement_falls_back_to_the_table_once(fake_times, monkeypatch, caplog):
    calls = []

    def broken(fns, reps, deadline):
        calls.append(1)
        raise RuntimeError("timer broke")

    monkeypatch.setattr(M, "_time_round_robin", broken)
    module = _module()
    with caplog.at_level(logging.WARNING, logger=M.__name__):
        assert [_chosen(module, rows) for rows in (1, 4, 6)] == ["fast", "mid", "dequant"]
    assert calls == [1] and "RuntimeError: timer broke); using the table" in caplog.text


def test_real_measurement_of_this_hosts_backends(monkeypatch):
    """Timed for real on a tiny layer: every serving backend and the yardstick at every batch (a budget no
    host misses, however busy: whether the default one suffices is a question of speed, not of this test)."""
    monkeypatch.setenv(M.ENV_BUDGET, "60")
    module = _module(32, 128, dtype=torch.bfloat16)
    order = [B.BACKENDS[n] for n in B.DISPATCH["cpu"]]
    x = torch.randn(3, 128).to(torch.bfloat16)
    measured = M.measured_for(module, x, order)
    serving = {b.name for b in order if b.unavailable_reason(module, x.dtype, x.device) is None}
    assert set(measured.times) == serving | {C.DENSE} and measured.complete
    assert module._cache.keys() <= {"dispatch_class"}  # layouts built for the measurement are dropped
    y = module(x)
    torch.testing.assert_close(y, module.forward_reference(x), rtol=2e-2, atol=0.1)  # bf16 rounding


def test_a_class_only_one_backend_serves_is_not_measured(monkeypatch):
    monkeypatch.setattr(M, "_time_round_robin", lambda *a: pytest.fail("measured"))
    module = _module(dtype=torch.float16)  # float16: only dequantize + matmul serves it on CPU
    x = torch.randn(1, 32, dtype=torch.float16)
    order = [B.BACKENDS[n] for n in B.DISPATCH["cpu"]]
    assert [b.name for b in order if b.unavailable_reason(module, x.dtype, x.device) is None] == ["dequant"]
    assert M.measured_for(module, x, order) is None
    assert B.choose(module, x, "auto")[0].name == "dequant"


def test_a_backend_this_host_lacks_is_measured_through_a_stand_in(monkeypatch):
    """The fused kernel (AVX512-BF16) forced on with a stand-in computation: measured like the others."""
    module = _module(32, 128, dtype=torch.bfloat16)
    dense = module.dequantize_weight(torch.bfloat16)
    calls = []
    monkeypatch.setattr(CF, "_state", {"lib": object(), "ready": True})
    monkeypatch.setattr(CF, "call_bf16_kernel", lambda fn, x2, w, bias: calls.append(x2.shape[0]) or x2 @ dense.T)
    order = [B.BACKENDS[n] for n in B.DISPATCH["cpu"]]
    measured = M.measured_for(module, torch.randn(1, 128).to(torch.bfloat16), order)
    assert "fused" in measured.times and set(calls) == set(M.BATCHES)
    rows = 4
    winner = measured.ranking(rows)[0]
    assert _chosen_bf16(module, rows) == winner


def _chosen_bf16(module, rows: int) -> str:
    backend, _ = B.choose(module, torch.randn(rows, module.in_features).to(torch.bfloat16), "auto")
    return backend.name

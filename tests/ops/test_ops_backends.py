"""The kernel backends' interface, the dispatch tables, the walk of ``backends.choose`` and the one self-check
helper (``ops/selfcheck.py``)."""

from __future__ import annotations

import logging

import pytest
import torch

from hf_vlm_gptq.ops import QuantLinear, rtn_quantize
from hf_vlm_gptq.ops import backends as B
from hf_vlm_gptq.ops.selfcheck import matmul_probes, self_check


def test_every_backend_answers_to_its_kernel_mode():
    assert B.KERNEL_MODES == ("auto", "int4", "fused", "dequant", "triton", "avx2", "amx")
    for name, backend in B.BACKENDS.items():
        assert isinstance(backend, B.Backend) and backend.name == name and backend.variants


def test_the_tables_name_known_backends_and_end_in_the_reference():
    for device, order in B.DISPATCH.items():
        assert order[-1] == "dequant" and set(order) <= set(B.BACKENDS), device
        for name, row in B.MAX_BATCH.get(device, {}).items():
            later = order[order.index(name) + 1 :]
            columns = {v for n in later for v in B.BACKENDS[n].variants}
            assert set(row) <= columns, (device, name)  # every column is a later backend's variant
            assert any(v in row for v in B.BACKENDS["dequant"].variants), (device, name)
    for device, rows in B.MIN_BATCH.items():
        order = B.DISPATCH[device]
        for name, row in rows.items():
            columns = {v for n in order[order.index(name) + 1 :] for v in B.BACKENDS[n].variants}
            assert set(row) <= columns, (device, name)
    assert B.FALLBACK_ORDER == ("dequant",)


def test_reasons_share_one_signature():
    fp16_cpu = (torch.float16, torch.device("cpu"))
    layer = B.LayerShape(bits=3, group_size=32, in_features=64, out_features=32)
    assert "bits=3" in B.BACKENDS["int4"].unavailable_reason(layer, *fp16_cpu)
    assert "bits=3" in B.BACKENDS["fused"].unavailable_reason(layer, *fp16_cpu)
    assert "bits=3" in B.BACKENDS["triton"].unavailable_reason(layer, *fp16_cpu)
    assert B.BACKENDS["dequant"].unavailable_reason(layer, *fp16_cpu) is None
    assert "device meta" in B.BACKENDS["int4"].unavailable_reason(layer._replace(bits=4), torch.bfloat16,
                                                                  torch.device("meta"))


class StandIn(B.Backend):
    """A backend that records what the walk asked of it."""

    def __init__(self, name: str, variants: tuple[str, ...], log: list, serves: bool = True):
        self.name, self.variants, self.log, self.serves = name, variants, log, serves

    def unavailable_reason(self, layer, dtype, device):
        return None

    def prepare(self, module, x2):
        self.log.append(self.name)
        return self.name if not self.serves else {"weights of": self.name}

    def matmul(self, module, x2, weights, bias):
        return torch.full((x2.shape[0], module.out_features), float(len(self.name)), dtype=x2.dtype)

    def variant(self, module, weights):
        return self.variants[0]


def install_stand_ins(monkeypatch) -> tuple[StandIn, StandIn, list[str]]:
    """The CPU order replaced by stand-ins fast / mid / dequant (a table of their own); returns them and the
    log of their calls."""
    log: list[str] = []
    fast, mid = StandIn("fast", ("fast",), log), StandIn("mid", ("mid",), log)
    monkeypatch.setitem(B.BACKENDS, "fast", fast)
    monkeypatch.setitem(B.BACKENDS, "mid", mid)
    monkeypatch.setitem(B.DISPATCH, "cpu", ("fast", "mid", "dequant"))
    monkeypatch.setitem(B.MAX_BATCH, "cpu", {"fast": {"mid": 3, "uncached": 8}, "mid": {"uncached": 5}})
    return fast, mid, log


@pytest.fixture
def stand_ins(monkeypatch):
    """The CPU order replaced by fast / mid / dequant stand-ins; "fast" is measured against "mid" and the
    reference, "mid" against the reference only."""
    fast, mid, log = install_stand_ins(monkeypatch)
    module = QuantLinear.from_result(rtn_quantize(torch.randn(16, 32), bits=4, group_size=32), None, torch.float32)
    return module, fast, mid, log


def _chosen(module, rows: int) -> str:
    backend, _ = B.choose(module, torch.randn(rows, 32), "auto")
    return backend.name


def test_walk_takes_the_first_backend_whose_range_covers_the_batch(stand_ins):
    module, _fast, _mid, log = stand_ins
    assert [_chosen(module, rows) for rows in (1, 3, 4, 5)] == ["fast", "fast", "mid", "mid"]
    assert _chosen(module, 6) == "dequant"
    assert log == ["mid", "fast"]  # each prepared once (the module caches), the alternative first


def test_walk_measures_against_the_first_alternative_that_serves(stand_ins):
    module, _fast, mid, log = stand_ins
    mid.serves = False  # "fast" is now measured against the reference: up to 8 rows
    assert [_chosen(module, rows) for rows in (4, 8, 9)] == ["fast", "fast", "dequant"]
    assert log == ["mid", "fast"]  # a failed preparation is cached like a layout


def test_a_min_batch_row_hands_the_smallest_batches_to_the_alternative(stand_ins, monkeypatch):
    module, _fast, mid, _log = stand_ins
    monkeypatch.setitem(B.MIN_BATCH, "cpu", {"fast": {"mid": 2}, "mid": {"uncached": 3}})
    assert [_chosen(module, rows) for rows in (1, 2, 3, 4, 5, 6)] == ["dequant", "fast", "fast", "mid", "mid",
                                                                    "dequant"]
    mid.serves = False  # "fast" against the reference, which has no floor in its row: from one row on
    module.clear_cache()
    assert _chosen(module, 1) == "fast"


def test_backends_the_row_does_not_name_are_not_prepared(stand_ins, monkeypatch):
    module, _fast, _mid, log = stand_ins
    monkeypatch.setitem(B.MAX_BATCH, "cpu", {"fast": {"uncached": 8}})
    assert _chosen(module, 2) == "fast" and log == ["fast"]
    assert _chosen(module, 9) == "mid" and log == ["fast", "mid"]  # "mid" has no row: every batch


def test_a_module_remembers_its_choice_until_what_it_depends_on_changes(stand_ins, monkeypatch):
    """A packed module walks the tables once per kind of input, and again when its buffers, a table, the
    dispatch mode, what the process has measured or the thread count change, or its backend stops serving."""
    from hf_vlm_gptq.ops.backends import measure as M

    module, fast, _mid, _log = stand_ins
    walks: list[int] = []
    real = B.choose
    monkeypatch.setattr(B, "choose", lambda m, x2, mode: walks.append(x2.shape[0]) or real(m, x2, mode))
    x1, x4 = torch.randn(1, 32), torch.randn(4, 32)

    def calls(x) -> int:
        before = len(walks)
        module(x)
        return len(walks) - before

    assert [calls(x1), calls(x1), calls(x4), calls(x4)] == [1, 0, 1, 0]  # once per kind of input
    assert module(x1).unique().tolist() == [4.0]  # "fast": its name's length
    module.qweight.add_(0)  # the buffers changed in place (their version moves)
    assert [calls(x1), calls(x1)] == [1, 0]
    monkeypatch.setitem(B.MAX_BATCH, "cpu", {"fast": {"uncached": 8, "cached": 8}})  # a table replaced
    assert [calls(x1), calls(x1)] == [1, 0]
    M.forget()  # what the process knows of the measurements
    assert [calls(x1), calls(x1)] == [1, 0]
    module.cache_dequantized = not module.cache_dequantized
    assert [calls(x1), calls(x1)] == [1, 0]
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
        try:
            assert [calls(x1), calls(x1)] == [1, 0]
        finally:
            torch.set_num_threads(threads)
    monkeypatch.setattr(fast, "unavailable_reason", lambda *args: "gone")  # the chosen backend no longer serves
    assert calls(x1) == 1 and module(x1).unique().tolist() == [3.0]  # "mid"
    monkeypatch.setenv(M.ENV_MODE, "measure")  # another dispatch mode
    assert calls(x1) == 1


def test_forcing_a_backend_skips_the_walk_and_names_the_reason(stand_ins):
    module, _fast, mid, _log = stand_ins
    module.kernel = "fast"
    assert module(torch.randn(100, 32)).unique().tolist() == [4.0]
    mid.serves = False
    module.kernel = "mid"
    with pytest.raises(ValueError, match="kernel='mid' is unavailable for this layer / input: mid"):
        module(torch.randn(1, 32))
    module.kernel = "nonsense"
    with pytest.raises(ValueError, match="kernel must be one of"):
        module(torch.randn(1, 32))


def test_other_devices_get_the_reference():
    module = QuantLinear.from_result(rtn_quantize(torch.randn(16, 32), bits=4, group_size=32), None,
                                     torch.bfloat16).to("meta")
    backend, _ = B.choose(module, torch.empty(2, 32, dtype=torch.bfloat16, device="meta"), "auto")
    assert backend.name == "dequant"


def test_self_check_reports_the_first_disagreement_and_logs_it(caplog):
    ran = []

    def probe(result):
        return lambda: ran.append(result) or result

    assert self_check("k", [probe(None), probe(None)], "fallback") is None and ran == [None, None]
    ran.clear()
    with caplog.at_level(logging.WARNING):
        reason = self_check("k", [probe(None), probe("off by one"), probe("never run")], "using the rest")
    assert reason == "k self-check failed (off by one)" and ran == [None, "off by one"]
    assert "k self-check failed (off by one); using the rest" in caplog.text


def test_self_check_counts_an_exception_as_a_failure():
    def broken():
        raise RuntimeError("launch failed")

    assert self_check("k", [broken], "fallback") == "k self-check failed (RuntimeError: launch failed)"


def test_matmul_probes_accept_rounding_and_refuse_a_wrong_kernel():
    weight = torch.randn(24, 40).to(torch.bfloat16)
    right = matmul_probes(lambda x: (x.float() @ weight.float().T).to(torch.bfloat16), weight, (1, 7))
    assert self_check("k", right, "fallback") is None
    wrong = matmul_probes(lambda x: (x @ weight.T) * 1.1, weight, (3,))
    assert "max err" in self_check("k", wrong, "fallback")
    nan = matmul_probes(lambda x: torch.full((x.shape[0], 24), float("nan")), weight, (2,))
    assert self_check("k", nan, "fallback") is not None
    rng = torch.get_rng_state()
    list(p() for p in matmul_probes(lambda x: x @ weight.T, weight, (2,)))
    assert torch.equal(rng, torch.get_rng_state())  # probes leave the caller's RNG alone

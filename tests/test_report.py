"""report.py: QuantRecord's honesty rules, its stats, the records rebuilt from a saved config, and the JSON and
table renderings, on hand-made records (no model)."""

from __future__ import annotations

import json
import math

import pytest

from hf_vlm_gptq.ops.gptq import NO_CALIBRATION
from hf_vlm_gptq.report import QuantRecord, records_from_config, records_to_json, records_to_table

LLM = "model.language_model.layers.0"


def _rec(path: str = f"{LLM}.mlp.down_proj", **kw) -> QuantRecord:
    fields = {"component": "llm", "kind": "linear", "method": "gptq", "bits": 4, "group_size": 32, "sym": True,
              "act_order": False, "in_features": 128, "out_features": 64, "samples": 6, "tokens": 300,
              "damp": 0.1, "loss": 2.5, "seconds": 0.123456}
    fields.update(kw)
    return QuantRecord(path, **fields)


def test_a_loss_needs_usable_input():
    assert _rec().loss == 2.5 and _rec().fallback is None
    zero_rows = _rec(fallback=NO_CALIBRATION)  # samples came, their rows were all zero
    assert zero_rows.fallback == "inputs all zero (6 samples, 300 rows)" and math.isnan(zero_rows.loss)
    empty = _rec(fallback=NO_CALIBRATION, tokens=0)
    assert empty.fallback == "no calibration rows (6 calls with empty inputs)" and math.isnan(empty.loss)
    unreached = _rec(fallback=NO_CALIBRATION, samples=0, tokens=0)
    assert unreached.fallback == NO_CALIBRATION and math.isnan(unreached.loss)
    assert math.isnan(_rec(samples=0, tokens=0).loss)  # nothing measured, whatever the solver said
    assert _rec(fallback="cholesky failed, damp raised").loss == 2.5  # another fallback keeps its loss


def test_note_and_stats():
    rec = _rec(fallback="rtn: tiny layer", extra={"scales_underflow": 3, "loss_image": 1.5})
    assert rec.note == "rtn: tiny layer; 3 scales underflow to 0 (fp16)"
    assert _rec().note == ""
    assert rec.stats() == {"component": "llm", "method": "gptq", "samples": 6, "tokens": 300, "damp": 0.1,
                           "loss": 2.5, "fallback": "rtn: tiny layer", "seconds": 0.1235, "scales_underflow": 3,
                           "loss_image": 1.5}
    stats = _rec(samples=0, tokens=0, damp=float("nan")).stats()
    assert stats["loss"] is None and stats["damp"] is None
    json.dumps(stats, allow_nan=False)  # JSON-able as config.json holds it


def test_records_rebuilt_from_a_saved_config():
    records = {
        "model.visual.patch_embed.proj": _rec("model.visual.patch_embed.proj", component="vision", kind="conv",
                                              method="rtn", bits=8, in_features=1176, out_features=32, loss=0.5),
        f"{LLM}.mlp.down_proj.L2": _rec(f"{LLM}.mlp.down_proj.L2", kind="split_linear", in_features=127,
                                        act_order=True, extra={"loss_text": 0.25}),
        f"{LLM}.self_attn.q_proj": _rec(f"{LLM}.self_attn.q_proj", samples=0, tokens=0, fallback=NO_CALIBRATION,
                                        method="rtn", damp=float("nan")),
    }
    modules = {
        "model.visual.patch_embed.proj": {"kind": "conv", "conv_kind": "conv3d", "in_channels": 3, "out_channels": 32,
                                          "kernel_size": [2, 14, 14], "stride": [2, 14, 14], "padding": [0, 0, 0],
                                          "bits": 8, "group_size": 32, "bias": False},
        f"{LLM}.mlp.down_proj": {"kind": "split_linear", "in_features": 128, "out_features": 64, "bits": 4,
                                 "group_size": 32, "bias": False},
        f"{LLM}.self_attn.q_proj": {"kind": "linear", "in_features": 128, "out_features": 64, "bits": 4,
                                    "group_size": 32, "bias": False},
    }
    stats = json.loads(json.dumps({path: rec.stats() for path, rec in records.items()}))
    rebuilt = records_from_config(modules, stats, sym=True, act_order=True)
    assert list(rebuilt) == list(records)
    for path, rec in records.items():
        got = rebuilt[path]
        assert got.stats() == rec.stats(), path
        assert (got.kind, got.bits, got.group_size, got.in_features, got.out_features, got.sym) == (
            rec.kind, rec.bits, rec.group_size, rec.in_features, rec.out_features, rec.sym), path
    assert rebuilt[f"{LLM}.mlp.down_proj.L2"].act_order  # GPTQ under act_order
    assert not rebuilt[f"{LLM}.self_attn.q_proj"].act_order  # RTN has no column order
    with pytest.raises(ValueError, match=r"modules\['bad'\]: field 'bits'"):
        records_from_config({"bad": {**modules[f"{LLM}.self_attn.q_proj"], "bits": 7}}, {}, True, False)


def test_json_rendering():
    records = {"a": _rec("a"), "b": _rec("b", samples=0, tokens=0, damp=float("nan"))}
    doc = json.loads(records_to_json(records))  # strict JSON: NaN written as null
    assert [row["path"] for row in doc["modules"]] == ["a", "b"]
    assert doc["modules"][0] == {**doc["modules"][0], "loss": 2.5, "damp": 0.1, "bits": 4, "component": "llm"}
    assert doc["modules"][1]["loss"] is None and doc["modules"][1]["damp"] is None
    assert "NaN" not in records_to_json(records)


def test_table_rendering():
    long_path = "model.visual.blocks.31.attn.qkv.with.a.long.tail"
    records = {
        long_path: _rec(long_path, component="vision", act_order=True, extra={"loss_image": 1.25}),
        "m.short": _rec("m.short", fallback=NO_CALIBRATION, seconds=2.0, extra={"scales_underflow": 2}),
    }
    lines = records_to_table(records).splitlines()
    header, rule, first, second = lines[:4]
    assert header.split() == ["module", "method", "bits", "group", "order", "shape", "samples", "damp", "loss",
                              "image", "sec", "note"]
    assert rule == "-" * len(header)
    assert first.split()[:11] == [long_path, "gptq", "4", "32", "act", "64x128", "6", "0.1", "2.5", "1.25", "0.12"]
    assert second.startswith("m.short" + " " * (len(long_path) - len("m.short") + 1) + "gptq")  # one column width
    assert second.split()[4:11] == ["-", "64x128", "6", "0.1", "-", "-", "2.00"]  # no loss, no image loss
    assert second.endswith("inputs all zero (6 samples, 300 rows); 2 scales underflow to 0 (fp16)")
    assert lines[4:] == ["", "vision: 1 modules, 0 fallbacks, 0.1 s", "llm: 1 modules, 1 fallbacks, 2.0 s"]
    plain = records_to_table({"m": _rec("m")}).splitlines()[0]
    assert "image" not in plain and "video" not in plain  # per-modality columns only when recorded

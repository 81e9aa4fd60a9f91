"""Dispatch rows of the ops benchmark (``python -m bench.ops --dispatch``; also part of its default run on
CPU). Writes dispatch_measured_<cpu|cuda>.{json,md} (bench.harness).

Per shape class (4096x4096 at 4 bits g128 with and without act-order, and at 2 bits): the batch ranges this
host's measurement gives each backend (``ops/backends/measure.py``, measured fresh into a temporary cache,
within :data:`BUDGET_S` per class unless ``$HF_VLM_GPTQ_DISPATCH_BUDGET_S`` says otherwise) next to the
fixed table's (``MAX_BATCH``), and at batch 1 / 4 / 16 / 64 / 256 the speedup over dense bf16
``nn.Linear`` of ``kernel="auto"`` with measuring on and off (one layer called repeatedly, the three
variants taken in turns, p10). The CPU's model and flags are in the environment section.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile

import torch
from torch import nn

from bench.harness import cpu_info, round_robin, write_results
from hf_vlm_gptq.ops import QuantLinear, rtn_quantize
from hf_vlm_gptq.ops import backends as B
from hf_vlm_gptq.ops.backends import measure as M

logger = logging.getLogger("bench.ops")
CLASSES = {"4-bit g128": (4, False), "4-bit g128 act-order": (4, True), "2-bit g128": (2, False)}
N, GROUP, MAX_ROWS = 4096, 128, 1024
BUDGET_S = 4.0  # per class: more than the library's default, to show the ranges a full measurement gives


def _module(bits: int, act_order: bool, n: int) -> QuantLinear:
    result = rtn_quantize(torch.randn(n, n, generator=torch.Generator().manual_seed(bits)), bits=bits,
                          group_size=GROUP)
    if act_order:  # groups of GROUP columns scattered over the input: what an act-order checkpoint holds
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
        result = dataclasses.replace(result, g_idx=result.g_idx[perm])
    return QuantLinear.from_result(result, None, torch.bfloat16)


def _ranges(module: QuantLinear, dispatch: str, max_rows: int) -> str:
    """Which backend ``auto`` takes for 1..max_rows rows under ``HF_VLM_GPTQ_DISPATCH=dispatch``."""
    os.environ[M.ENV_MODE] = dispatch
    spans: list[list] = []
    for rows in range(1, max_rows + 1):
        name = B.choose(module, torch.empty(rows, module.in_features, dtype=torch.bfloat16), "auto")[0].name
        if spans and spans[-1][0] == name:
            spans[-1][2] = rows
        else:
            spans.append([name, rows, rows])
    return "; ".join(f"{name} {lo}-{'' if hi == max_rows else hi}" for name, lo, hi in spans)


def _auto(module: QuantLinear, x: torch.Tensor, dispatch: str):
    def call():
        os.environ[M.ENV_MODE] = dispatch  # a dict write: noise far below a matmul's time
        return module(x)
    return call


def bench_dispatch(n: int = N, min_time: float = 0.5) -> list[dict]:
    """One row per class and batch (see the module's docstring); the measuring is fresh (temporary cache)."""
    saved = {k: os.environ.get(k) for k in (M.ENV_MODE, M.ENV_BUDGET, "HF_VLM_GPTQ_CACHE")}
    rows = []
    with tempfile.TemporaryDirectory() as cache, torch.inference_mode():
        os.environ["HF_VLM_GPTQ_CACHE"] = cache
        os.environ.setdefault(M.ENV_BUDGET, str(BUDGET_S))
        M.forget()
        try:
            for label, (bits, act_order) in CLASSES.items():
                module = _module(bits, act_order, n)
                dense = nn.Linear(n, n, bias=False, dtype=torch.bfloat16)
                dense.weight.copy_(module.dequantize_weight(torch.bfloat16))
                measured_ranges = _ranges(module, "measure", MAX_ROWS)  # measures at the first call
                table_ranges = _ranges(module, "table", MAX_ROWS)
                os.environ[M.ENV_MODE] = "measure"
                measured = M.measured_for(module, torch.empty(1, n, dtype=torch.bfloat16),
                                          [B.BACKENDS[name] for name in B.DISPATCH["cpu"]])
                ranking = "one backend serves: not measured" if measured is None else "; ".join(
                    f"{name} " + ",".join(f"{lo}-{'' if hi is None else hi}" for lo, hi in spans)
                    for name, spans in measured.ranges().items())
                if measured is not None and not measured.complete:
                    ranking += f" (batches past {measured.batches[-1]} not measured within the budget: table)"
                for batch in M.BATCHES:
                    x = torch.randn(batch, n, dtype=torch.bfloat16)
                    fns = {"dense": lambda x=x, d=dense: d(x), "table": _auto(module, x, "table"),
                           "measured": _auto(module, x, "measure")}
                    t = round_robin(fns, device="cpu", min_time=min_time, block=3, skip=1, warmup=1)
                    ms = {k: v.p10 * 1e3 for k, v in t.items()}
                    rows.append({"class": label, "batch": batch, "dense_bf16_ms": ms["dense"],
                                 "auto_table_ms": ms["table"], "auto_measured_ms": ms["measured"],
                                 "speedup_table": ms["dense"] / ms["table"],
                                 "speedup_measured": ms["dense"] / ms["measured"],
                                 "measured_ranking": ranking, "measured_ranges": measured_ranges,
                                 "table_ranges": table_ranges,
                                 "measured_ms": None if measured is None else {
                                     name: [t * 1e3 for t in ts] for name, ts in measured.times.items()}})
                    logger.info("%s batch %d: %s", label, batch, rows[-1])
        finally:
            M.forget()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return rows


def render_dispatch(rows: list[dict]) -> str:
    cpu = cpu_info()
    lines = [f"Measured CPU dispatch vs the fixed table on {cpu['model']} (flags: {' '.join(cpu['flags'])}), "
             f"QuantLinear {N}x{N}, bf16 activations, one layer (hot), ms per call (p10)", ""]
    for label in dict.fromkeys(r["class"] for r in rows):
        mine = [r for r in rows if r["class"] == label]
        lines += [f"### {label}", "", f"- fastest per the measurement (rows): {mine[0]['measured_ranking']}",
                  f"- auto, measuring on (rows): {mine[0]['measured_ranges']}",
                  f"- auto, table (MAX_BATCH) (rows): {mine[0]['table_ranges']}", "",
                  "| batch | dense bf16 | auto, table | auto, measured | speedup table | speedup measured |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['dense_bf16_ms']:.3f} | {r['auto_table_ms']:.3f} | "
                  f"{r['auto_measured_ms']:.3f} | {r['speedup_table']:.2f}x | {r['speedup_measured']:.2f}x |"
                  for r in mine]
        lines.append("")
    return "\n".join(lines)


def run_dispatch(n: int = N, min_time: float = 0.5) -> None:
    """Measure, render and write dispatch_measured_<device>.{json,md}."""
    rows = bench_dispatch(n, min_time)
    table = render_dispatch(rows)
    logger.info("%s", table)
    budget = os.environ.get(M.ENV_BUDGET) or BUDGET_S
    path = write_results("dispatch_measured", {"cpu": cpu_info(), "batches": list(M.BATCHES), "budget_s": budget,
                                               "rows": rows},
                         f"# Measured CPU dispatch\n\nMeasuring budget {budget} s per class (the library's "
                         f"default: {M.BUDGET_S} s).\n\n{table}\n")
    logger.info("wrote %s", path)

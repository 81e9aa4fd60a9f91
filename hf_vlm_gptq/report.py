"""Per-module quantization records: what was done to each layer, readable as a table or as JSON.

The record of one module is what the research code returned as its "quantizer" for that module path:
bits, group size, grid, method, plus what the solve saw and reported (samples, damping, proxy loss,
fallbacks). Records are keyed by the model's own module paths (`model.visual.blocks.0.attn.qkv`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .events import Event, ModuleSolved
from .ops.gptq import NO_CALIBRATION  # the solver's fallback when the Hessian holds nothing


@dataclass
class QuantRecord:
    """What happened to one quantized module.

    Honest by construction: a module whose Hessian held nothing (no rows reached it, or all of them were
    zero) has no proxy loss (NaN, `null` in JSON; a loss against a zero Hessian is 0 whatever the weights),
    and the solver's "no calibration input" fallback is reworded when samples did reach the layer: "inputs
    all zero (S samples, T rows)". `extra["scales_underflow"]`: groups whose float16 scale is 0.
    """

    path: str
    component: str
    kind: str  # "linear" | "conv" | "split_linear"
    method: str  # "gptq" | "rtn"
    bits: int
    group_size: int
    sym: bool
    act_order: bool
    in_features: int
    out_features: int
    samples: int = 0  # calibration inputs that reached the layer (vision parts: one per picture set or clip)
    tokens: int = 0  # rows behind its Hessian (tokens, patches, or unfolded conv windows)
    damp: float = float("nan")
    loss: float = float("nan")
    fallback: str | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.fallback == NO_CALIBRATION and self.samples > 0:  # samples came, but nothing usable
            self.fallback = (f"inputs all zero ({self.samples} samples, {self.tokens} rows)" if self.tokens
                             else f"no calibration rows ({self.samples} calls with empty inputs)")
        no_input = (self.fallback or "").startswith((NO_CALIBRATION, "inputs all zero", "no calibration rows"))
        if no_input or (self.samples == 0 and self.tokens == 0):
            self.loss = float("nan")  # measured against nothing

    @property
    def note(self) -> str:
        """The table's note: the fallback, and float16 scales that underflowed."""
        notes = [self.fallback] if self.fallback else []
        if self.extra.get("scales_underflow"):
            notes.append(f"{self.extra['scales_underflow']} scales underflow to 0 (fp16)")
        return "; ".join(notes)

    def stats(self) -> dict[str, Any]:
        """The JSON-able stats saved in `quantization_config.stats` (NaN becomes None)."""
        out = {
            "component": self.component,
            "method": self.method,
            "samples": self.samples,
            "tokens": self.tokens,
            "damp": _finite_or_none(self.damp),
            "loss": _finite_or_none(self.loss),
            "fallback": self.fallback,
            "seconds": round(self.seconds, 4),
        }
        out.update(self.extra)
        return out


_STAT_KEYS = frozenset(("component", "method", "samples", "tokens", "damp", "loss", "fallback", "seconds"))


class RunRecords:
    """Listener (events.py): a run's records (keyed by `record.path`) and `modules` entries (keyed by the
    swapped module's path), from its `ModuleSolved` events, in the order the modules were solved."""

    def __init__(self) -> None:
        self.records: dict[str, QuantRecord] = {}
        self.entries: dict[str, dict[str, Any]] = {}

    def __call__(self, event: Event) -> None:
        if isinstance(event, ModuleSolved):
            self.records[event.record.path] = event.record
            self.entries[event.module] = event.entry


def _finite_or_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def records_from_config(modules: dict[str, Any], stats: dict[str, dict[str, Any]], sym: bool,
                        act_order: bool) -> dict[str, QuantRecord]:
    """Rebuild the records of a loaded checkpoint from its `quantization_config` (`modules` + `stats`).

    `modules`: path -> `ModuleRecord` or its JSON object (checked; ValueError names a bad one).
    """
    from .records import parse_records

    module_records = parse_records(modules)
    records = {}
    for path, st in stats.items():
        mod = module_records.get(path) or module_records.get(path.removesuffix(".L2"))
        nan = float("nan")
        records[path] = QuantRecord(
            path=path, component=st.get("component", ""), kind=mod.kind if mod else "", method=st.get("method", ""),
            bits=mod.bits if mod else 0, group_size=mod.group_size if mod else 0, sym=sym,
            act_order=act_order and st.get("method") == "gptq", in_features=mod.packed_in_features if mod else 0,
            out_features=mod.packed_out_features if mod else 0, samples=st.get("samples", 0),
            tokens=st.get("tokens", 0), damp=nan if st.get("damp") is None else st["damp"],
            loss=nan if st.get("loss") is None else st["loss"], fallback=st.get("fallback"),
            seconds=st.get("seconds", 0.0), extra={k: v for k, v in st.items() if k not in _STAT_KEYS})
    return records


def records_to_json(records: dict[str, QuantRecord]) -> str:
    """All records as a JSON document (NaN as null)."""
    rows = []
    for rec in records.values():
        row = asdict(rec)
        row["damp"] = _finite_or_none(rec.damp)
        row["loss"] = _finite_or_none(rec.loss)
        rows.append(row)
    return json.dumps({"modules": rows}, indent=2)


def records_to_table(records: dict[str, QuantRecord]) -> str:
    """A fixed-width table, one line per module (full paths: the column is as wide as the longest), then a
    summary line per component. `order`: "act" for GPTQ with act-order columns, "-" otherwise."""
    width = max([len("module"), *(len(rec.path) for rec in records.values())])
    # per-modality proxy losses (modality.py), when the calibration rows held more than one modality
    kinds = [k for k in ("image", "video", "text") if any(f"loss_{k}" in rec.extra for rec in records.values())]
    header = f"{'module':<{width}} {'method':<6} {'bits':>4} {'group':>5} {'order':<5} {'shape':>11} {'samples':>7} " \
             f"{'damp':>8} {'loss':>10} " + "".join(f"{k:>10} " for k in kinds) + f"{'sec':>6}  note"
    lines = [header, "-" * len(header)]
    for rec in records.values():
        shape = f"{rec.out_features}x{rec.in_features}"
        damp = "-" if not math.isfinite(rec.damp) else f"{rec.damp:.3g}"
        loss = "-" if not math.isfinite(rec.loss) else f"{rec.loss:.4g}"
        order = "act" if rec.act_order else "-"
        per_kind = "".join(f"{rec.extra[f'loss_{k}']:>10.4g} " if f"loss_{k}" in rec.extra else f"{'-':>10} "
                           for k in kinds)
        lines.append(
            f"{rec.path:<{width}} {rec.method:<6} {rec.bits:>4} {rec.group_size:>5} {order:<5} {shape:>11} "
            f"{rec.samples:>7} {damp:>8} {loss:>10} {per_kind}{rec.seconds:>6.2f}  {rec.note}"
        )
    lines.append("")
    by_component: dict[str, list[QuantRecord]] = {}
    for rec in records.values():
        by_component.setdefault(rec.component, []).append(rec)
    for comp, recs in by_component.items():
        fallbacks = sum(1 for r in recs if r.fallback)
        seconds = sum(r.seconds for r in recs)
        lines.append(f"{comp}: {len(recs)} modules, {fallbacks} fallbacks, {seconds:.1f} s")
    return "\n".join(lines)


"""Per-block memory of our pipeline (for bench.memory), and its extrapolation to bigger models.

`BlockProbe` listens to the pipeline's events (hf_vlm_gptq.events: stem / block / capture steps) and records,
per step, the peak GPU memory (CUDA: `max_memory_allocated`, reset at each step) or the host RSS after it
(CPU), with the activations and block weights the step held. `extrapolate` turns the figures of a reduced-depth Qwen2-VL-7B run into
estimates for the whole 7B and for Qwen2-VL-72B.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from hf_vlm_gptq import events

MB = 2**20


def _tensor_bytes(obj: Any, seen: set[int]) -> int:
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(o, seen) for o in obj.values())
    return 0


class BlockProbe:
    """Context manager: per-step memory figures of a quantization run, from its events (hf_vlm_gptq.events).

    A block's row runs from its `BlockStart` to its `BlockEnd` (solve + the replay that feeds the next
    block); the stem's from its component's `ComponentStart` to its `ModuleSolved`; a capture's peak is
    read at `CaptureDone`, measured from the end of the step before it.
    """

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self.rows: list[dict] = []
        self.captures: list[dict] = []
        self._open: dict | None = None

    def _reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def _peak_mb(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / MB
        import psutil

        return psutil.Process().memory_info().rss / MB

    def _close(self) -> None:
        if self._open is not None:
            row = self._open
            row["seconds"] = time.perf_counter() - row.pop("_t0")
            row["peak_MB"] = self._peak_mb()
            self.rows.append(row)
            self._open = None
            self._reset()  # the next step (a capture, or a block) is measured from here

    def _start(self, row: dict) -> None:
        self._close()
        self._reset()
        self._open = {**row, "_t0": time.perf_counter()}

    def __call__(self, event: events.Event) -> None:
        if isinstance(event, events.ComponentStart):
            self._close()
            self._reset()  # the first capture is measured from here
            if event.stem:
                self._start({"component": event.component, "path": "stem", "block_weights_MB": 0.0,
                             "activations_MB": 0.0})
        elif isinstance(event, events.ModuleSolved) and event.record.kind == "conv":
            self._close()  # the stem is solved
        elif isinstance(event, events.CaptureDone):
            self.captures.append({"component": event.component, "seconds": event.seconds,
                                  "peak_MB": self._peak_mb(), "calls": len(event.calls),
                                  "activations_MB": _tensor_bytes(event.calls, set()) / MB})
        elif isinstance(event, events.BlockStart):
            block = event.block
            weights = sum(t.numel() * t.element_size() for t in list(block.parameters()) + list(block.buffers()))
            self._start({"component": event.component, "path": event.path, "block_weights_MB": weights / MB,
                         "activations_MB": _tensor_bytes(event.calls, set()) / MB})
        elif isinstance(event, events.BlockEnd):
            self._close()

    def __enter__(self) -> BlockProbe:
        self._listening = events.listen(self)
        self._listening.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._close()
        self._listening.__exit__(*exc)


def render_blocks(rows: list[dict], captures: list[dict], peak_name: str) -> str:
    lines = [f"| step | component | seconds | {peak_name} | activations MB | block weights MB |",
             "|---|---|---|---|---|---|"]
    lines += [f"| capture | {c['component']} | {c['seconds']:.2f} | {c['peak_MB']:.0f} | {c['activations_MB']:.0f} | - |"
              for c in captures]
    lines += [f"| {r['path']} | {r['component']} | {r['seconds']:.2f} | {r['peak_MB']:.0f} | {r['activations_MB']:.0f} | "
              f"{r['block_weights_MB']:.0f} |" for r in rows]
    return "\n".join(lines)


def _param_mb(size: str, **overrides: int) -> dict[str, float]:
    """MB of bf16 weights of a Qwen2-VL size: whole model, one LLM layer, one vision block, merger, embeddings."""
    from transformers import Qwen2VLForConditionalGeneration

    from bench._common import qwen2vl_config

    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(qwen2vl_config(size, **overrides))

    def mb(module) -> float:
        return sum(p.numel() * 2 for p in module.parameters()) / MB

    inner = model.model
    return {"model": mb(model), "llm_layer": mb(inner.language_model.layers[0]), "vision_block": mb(inner.visual.blocks[0]),
            "merger": mb(inner.visual.merger), "embed": mb(inner.language_model.embed_tokens),
            "vision_depth": len(inner.visual.blocks)}


def extrapolate(run: dict) -> dict:
    """Estimates for the whole 7B and for 72B from a reduced-depth 7B run (per-block figures).

    LLM block peak = activations + block weights + k * (largest Hessian, fp32 intermediate^2), k fitted on
    the measured 7B block (it covers the solve's working copies); activations scale with the hidden size.
    The LLM capture holds the modules that run before the first LLM layer (vision tower, merger, embeddings)
    plus the activations. Vision blocks are the same in both models.
    """
    from bench._common import QWEN2VL_SIZES

    src, dst = QWEN2VL_SIZES["7b"], QWEN2VL_SIZES["72b"]
    measured = _param_mb("7b", llm_layers=run["llm_layers"], vision_depth=run["vision_depth"])
    full7, full72 = _param_mb("7b"), _param_mb("72b")
    peak = {}
    for comp in ("vision", "merger", "llm"):
        rows = [r for r in run["blocks"] if r["component"] == comp]
        peak[comp] = max(rows, key=lambda r: r["peak_MB"]) if rows else None
    caps = {c["component"]: c for c in run["captures"]}
    llm = peak["llm"]
    hessian = lambda n: 4 * n * n / MB  # noqa: E731
    k = (llm["peak_MB"] - llm["activations_MB"] - llm["block_weights_MB"]) / hessian(src["intermediate_size"])
    act72 = llm["activations_MB"] * dst["hidden_size"] / src["hidden_size"]
    llm72 = act72 + full72["llm_layer"] + k * hessian(dst["intermediate_size"])
    extra_vision = (full7["vision_depth"] - run["vision_depth"]) * full7["vision_block"]
    cap7 = caps["llm"]["peak_MB"] + extra_vision
    cap72 = cap7 + (full72["embed"] - full7["embed"]) + (full72["merger"] - full7["merger"]) + \
        (act72 - llm["activations_MB"])
    merger7 = peak["merger"]["peak_MB"] if peak["merger"] else 0.0
    merger72 = merger7 + full72["merger"] - full7["merger"]
    vision = max(peak["vision"]["peak_MB"], caps.get("vision", {}).get("peak_MB", 0.0))
    host_over = run["peak_rss_MB"] - measured["model"]
    rows = [("vision block (solve + replay)", peak["vision"]["peak_MB"], peak["vision"]["peak_MB"],
             peak["vision"]["peak_MB"]),
            ("merger", merger7, merger7, merger72),
            ("LLM block (solve + replay)", llm["peak_MB"], llm["peak_MB"], llm72),
            ("LLM capture pass", caps["llm"]["peak_MB"], cap7, cap72)]
    overall = [max(vision, r) for r in (max(x[1] for x in rows), max(x[2] for x in rows), max(x[3] for x in rows))]
    lines = ["Estimates from the per-block figures (GPU MB; host = weights on the CPU + what the run added):", "",
             f"| step | measured ({run['llm_layers']} LLM layers, {run['vision_depth']} vision blocks) | "
             "Qwen2-VL-7B, all layers | Qwen2-VL-72B |", "|---|---|---|---|"]
    lines += [f"| {name} | {a:.0f} | {b:.0f} | {c:.0f} |" for name, a, b, c in rows]
    lines += [f"| **peak GPU** | **{overall[0]:.0f}** | **{overall[1]:.0f}** | **{overall[2]:.0f}** |",
              f"| host RSS | {run['peak_rss_MB']:.0f} | {full7['model'] + host_over:.0f} | "
              f"{full72['model'] + host_over:.0f} |", "",
              f"LLM-block model: activations + block weights + k x fp32 Hessian of the widest input, k = {k:.2f} "
              f"(fitted on the 7B block). The 72B's bf16 weights take {full72['model'] / 1024:.0f} GB of host "
              "memory (the H200 machine has 128 GB; disk offload of the weights is not supported by the pipeline "
              "yet)."]
    return {"k": k, "rows": rows, "overall_MB": overall, "params_MB": {"measured": measured, "7b": full7, "72b": full72},
            "markdown": "\n".join(lines)}

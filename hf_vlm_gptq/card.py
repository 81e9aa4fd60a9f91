"""The model card (README.md) and per-layer error plot (quantization_error.png) written with a checkpoint.

`attach(model, ...)` runs when a model is quantized or loaded (`VLMGPTQHfQuantizer`): its `save_pretrained`
then writes, beside the weights, a README.md giving the base model, the recipe (every option), the bits of
each part, a calibration summary, and how to load it (with the `import hf_vlm_gptq` line) and to serve it,
plus a small PNG of the per-layer proxy loss where matplotlib is installed (it is not a dependency).
`push_to_hub` uploads both: transformers writes its own template card into the upload folder after
`save_pretrained` (`create_and_tag_model_card`); for the length of our call that function returns our
card, with transformers' tags added. A README.md that this package did not write is never replaced by
`save_pretrained`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .config_fields import PART_SWITCHES

logger = logging.getLogger(__name__)

CARD = "README.md"
PLOT = "quantization_error.png"
MARK = "<!-- written by hf_vlm_gptq -->"
_NOT_RECIPE = ("modules", "stats", "quant_method", "dataset", "processor")


def base_model_of(model) -> str:
    """What the model was quantized from: the path or hub id it was loaded from, or, for a reloaded
    checkpoint, the `base_model` its own card names."""
    source = str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or "")
    card = Path(source) / CARD
    if source and card.is_file():
        for line in card.read_text(errors="replace").splitlines()[1:20]:
            if line.startswith("base_model:"):
                return line.split(":", 1)[1].strip()
            if line.strip() == "---":
                break
    return source or "unknown"


def describe_dataset(dataset: Any, num_samples: int, seed: int) -> str:
    if dataset is None:
        return f"the built-in synthetic set (pictures, charts, text, short clips), seed {seed}, {num_samples} asked"
    if isinstance(dataset, (str, os.PathLike)):
        return f"the images of the folder `{dataset}`, {num_samples} asked"
    return f"user samples ({type(dataset).__name__}), {num_samples} asked"


def model_card(model, records: dict[str, Any], config, base_model: str, calibration: str | None) -> str:
    """The README.md text of a quantized model (records: module path -> QuantRecord)."""
    from . import __version__

    by_part: dict[str, list] = {}
    for rec in records.values():
        by_part.setdefault(rec.component, []).append(rec)
    bits = sorted({r.bits for r in records.values()})
    groups = sorted({r.group_size for r in records.values()})
    name = Path(base_model).name or base_model
    scheme = f"W{'/'.join(map(str, bits))} g{'/'.join(map(str, groups))}"
    lines = ["---", f"base_model: {base_model}", "library_name: transformers", "pipeline_tag: image-text-to-text",
             "tags:", "- hf_vlm_gptq", "- gptq", *(f"- {b}-bit" for b in bits), "---", MARK, "",
             f"# {name} ({scheme}, hf_vlm_gptq)", "",
             f"`{base_model}` ({model.config.model_type}) quantized with GPTQ / RTN by hf_vlm_gptq {__version__}: "
             "a packed low-bit checkpoint (GPTQ layout: qweight, qzeros, scales, g_idx).", "",
             "## Parts", "", "| part | modules | method | bits | group size | act-order | samples | tokens | mean loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for part, recs in by_part.items():
        losses = [r.loss for r in recs if math.isfinite(r.loss)]
        mean = f"{sum(losses) / len(losses):.4g}" if losses else "-"
        lines.append(f"| {part} | {len(recs)} | {'/'.join(sorted({r.method for r in recs}))} | "
                     f"{'/'.join(str(b) for b in sorted({r.bits for r in recs}))} | "
                     f"{'/'.join(str(g) for g in sorted({r.group_size for r in recs}))} | "
                     f"{'yes' if any(r.act_order for r in recs) else 'no'} | {max(r.samples for r in recs)} | "
                     f"{sum(r.tokens for r in recs)} | {mean} |")
    off = [flag for flag in PART_SWITCHES if getattr(config, flag, True) is False]
    if off or config.modules_to_not_convert:
        lines += ["", "Kept in full precision: " + ", ".join(
            [f"`{flag}=False`" for flag in off] + [f"`{m}`" for m in config.modules_to_not_convert]) + "."]
    recipe = {k: v for k, v in config.to_dict().items() if k not in _NOT_RECIPE}
    lines += ["", "## Recipe", "", "| option | value |", "|---|---|",
              *(f"| `{k}` | `{json.dumps(v)}` |" for k, v in recipe.items())]
    fallbacks = sum(1 for r in records.values() if r.fallback)
    lines += ["", "## Calibration", ""]
    if calibration:
        lines.append(f"Data: {calibration}; at most {config.max_seq_len} tokens per sample.")
    lines += [f"Per part above: samples that reached the part, rows behind its Hessians, mean proxy loss "
              f"`tr((W-Q) H (W-Q)^T)`; {fallbacks} module(s) fell back (see `quantization_report.json` when "
              "present, or `hf_vlm_gptq.quantization_report(model)` after loading)."]
    if _can_plot():
        lines += ["", f"![per-layer proxy loss]({PLOT})"]
    lines += ["", "## Load", "", "```python",
              "import hf_vlm_gptq  # first: it teaches transformers quant_method \"vlm_gptq\"",
              "from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline",
              'model = AutoModelForImageTextToText.from_pretrained("THIS_REPO", dtype="bfloat16")',
              'processor = AutoProcessor.from_pretrained("THIS_REPO")',
              'pipe = pipeline("image-text-to-text", model="THIS_REPO")', "```", "",
              "Without `import hf_vlm_gptq` transformers refuses the checkpoint (a size-mismatch error): "
              "`pip install hf_vlm_gptq`.", "",
              "## Serve", "", "```bash",
              "hf-vlm-gptq export-vllm THIS_REPO out-vllm && vllm serve out-vllm        # vLLM, GPTQ layout",
              "hf-vlm-gptq export --format compressed-tensors THIS_REPO out-ct           # transformers without the "
              "plugin, or vLLM", "```", ""]
    return "\n".join(lines)


def _can_plot() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def error_plot(records: dict[str, Any], path: Path) -> bool:
    """A bar chart of each module's proxy loss (log scale, one colour per part); False without matplotlib."""
    if not _can_plot() or not records:
        return False
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    recs = list(records.values())
    parts = list(dict.fromkeys(r.component for r in recs))
    fig = Figure(figsize=(max(6.0, min(24.0, 0.08 * len(recs) + 4)), 3.2), dpi=100)
    ax = fig.add_subplot()
    for i, part in enumerate(parts):
        xs = [j for j, r in enumerate(recs) if r.component == part and math.isfinite(r.loss) and r.loss > 0]
        ax.bar(xs, [recs[j].loss for j in xs], width=0.9, color=f"C{i}", label=part)
    ax.set_yscale("log")
    ax.set_xlabel("module (execution order)")
    ax.set_ylabel("proxy loss tr((W-Q)H(W-Q)^T)")
    ax.set_title("per-layer quantization error")
    if parts:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    return True


@contextmanager
def _our_hub_card(text: str):
    """transformers' push paths save the card `create_and_tag_model_card` returns: ours, for this call."""
    import transformers.modeling_utils as modeling_utils
    import transformers.utils.hub as hub
    from huggingface_hub import ModelCard

    def ours(repo_id: str, tags: list[str] | None = None, token: str | None = None, **_kwargs: Any) -> ModelCard:
        card = ModelCard(text)
        for tag in tags or ():
            card.data.tags = [*(card.data.tags or []), *([tag] if tag not in (card.data.tags or []) else [])]
        return card

    saved = [(module, module.create_and_tag_model_card) for module in (modeling_utils, hub)]
    for module, _ in saved:
        module.create_and_tag_model_card = ours
    try:
        yield
    finally:
        for module, original in saved:
            module.create_and_tag_model_card = original


def write_card(model, folder: str | os.PathLike) -> None:
    """README.md (unless the folder holds a card this package did not write) and the plot into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    info = model._hf_vlm_gptq_card
    records = model.hf_quantizer.records
    card = folder / CARD
    if card.is_file() and MARK not in card.read_text(errors="replace"):
        logger.warning("%s holds a README.md that hf_vlm_gptq did not write: left as it is (no model card)", folder)
    else:
        card.write_text(model_card(model, records, model.hf_quantizer.quantization_config, info["base_model"],
                                   info["calibration"]))
    try:
        error_plot(records, folder / PLOT)
    except Exception as err:  # a plotting problem must never fail a save
        logger.warning("no error plot (%s: %s)", type(err).__name__, err)


def _save_pretrained(self, save_directory, *args: Any, **kwargs: Any):
    if kwargs.get("is_main_process", True):
        write_card(self, save_directory)
    text = (Path(save_directory) / CARD).read_text() if (Path(save_directory) / CARD).is_file() else None
    if text is None or MARK not in text:
        return type(self).save_pretrained(self, save_directory, *args, **kwargs)
    with _our_hub_card(text):  # save_pretrained(push_to_hub=True) uploads our card
        return type(self).save_pretrained(self, save_directory, *args, **kwargs)


def _push_to_hub(self, *args: Any, **kwargs: Any):
    info = self._hf_vlm_gptq_card
    text = model_card(self, self.hf_quantizer.records, self.hf_quantizer.quantization_config, info["base_model"],
                      info["calibration"])
    with _our_hub_card(text):  # its save_pretrained (ours, above) writes the plot into the upload folder
        return type(self).push_to_hub(self, *args, **kwargs)


_save_pretrained.__name__ = "save_pretrained"
_push_to_hub.__name__ = "push_to_hub"


def attach(model, base_model: str, calibration: str | None) -> None:
    """Make `model.save_pretrained` / `push_to_hub` write (and upload) the card and the plot."""
    model._hf_vlm_gptq_card = {"base_model": base_model, "calibration": calibration}
    model.save_pretrained = types.MethodType(_save_pretrained, model)
    model.push_to_hub = types.MethodType(_push_to_hub, model)

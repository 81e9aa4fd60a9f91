"""Reading a saved hf_vlm_gptq checkpoint and writing a converted copy: what every export shares.

`export_vllm` (vLLM's GPTQ layout) and `export_ct` (compressed-tensors) both:

* check that SRC is a checkpoint this package saved (`read_source`) and list its weight files, reading
  only files inside SRC (`inside`: index entries with absolute paths or `..`, and symlinks out of SRC, are
  refused, except a Hugging Face cache snapshot's links into its own `blobs/`);
* find each quantized module's checkpoint key (`source_modules`) and every Linear the model has that is
  not quantized (`dense_linears`: `modules_to_not_convert`, parts switched off, `lm_head`), from the model
  class built on the meta device;
* dequantize the modules they write dense (`dense_tensors`: the conv stem as its 4-D / 5-D weight, split
  layers merged back into one weight) and write the source's shards under the same names (`write_shards`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .arch import ArchSpec, spec_for_model_type
from .config import QUANT_METHOD, VLMGPTQConfig
from .ops.packing import dequantize_packed
from .outdir import MARKER
from .records import PACKED_BUFFERS, ModuleRecord, parse_records

logger = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CARD_FILES = ("README.md", "quantization_error.png")
"""The source's model card and error plot: an export writes its own card instead."""


@dataclass
class SourceModule:
    """One quantized module of the source: its record, checkpoint key and what the export does with it."""

    path: str  # module path in quantization_config.modules
    record: ModuleRecord
    key: str  # checkpoint key prefix (split layers: the SplitLinear itself)
    name: str = ""  # the reader's name for it (vLLM's module name, ...)
    dense: str | None = None  # why it is written dense; None: written packed

    @property
    def packed_prefix(self) -> str:
        return self.record.packed_prefix(self.key)

    @property
    def scheme(self) -> tuple[int, int]:
        return self.record.bits, self.record.group_size


def inside(src: Path, name: str, what: str, command: str = "the export") -> Path:
    """`src / name`, refused unless it names a file inside SRC: no absolute path, no `..`, no symlink whose
    target lies outside (except a Hugging Face cache snapshot's links into its own `blobs/`)."""
    rel = Path(name)
    if not name or rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"{what} names {name!r}, which is not a file inside {src}; {command} reads only SRC's "
                         "own files (the index or the folder was edited).")
    root = src.resolve()
    repo = root.parent.parent  # a cache snapshot: <cache>/models--<org>--<name>/snapshots/<commit>
    hf_snapshot = root.parent.name == "snapshots" and repo.name.partition("--")[0] in ("models", "datasets")
    roots = [root] + ([repo / "blobs"] if hf_snapshot else [])
    target = (src / rel).resolve()
    if not any(target == r or r in target.parents for r in roots):
        raise ValueError(f"{what} {name!r} is a symbolic link to {target}, outside {src}; {command} reads only "
                         "files inside SRC. Copy the real file into SRC.")
    return src / rel


def weight_files(src: Path, command: str = "the export") -> tuple[dict[str, str], dict[str, Any] | None]:
    """Checkpoint key -> file name (each checked to lie inside SRC), and the safetensors index (None for a
    single file)."""
    if (src / INDEX).is_file():
        index = json.loads(inside(src, INDEX, "the safetensors index", command).read_text())
        files = dict(index["weight_map"])
        for name in sorted(set(files.values())):
            if not isinstance(name, str) or not inside(src, name, f"{INDEX}'s weight_map", command).is_file():
                raise ValueError(f"{INDEX} names the weight file {name!r}, which {src} does not have.")
        return files, index
    if (src / "model.safetensors").is_file():
        with safe_open(str(inside(src, "model.safetensors", "the weight file", command)), framework="pt") as handle:
            return {key: "model.safetensors" for key in handle.keys()}, None
    raise ValueError(f"{src} has no model.safetensors or {INDEX}; {command} reads safetensors checkpoints "
                     "(re-save with save_pretrained).")


def other_files(src: Path, command: str = "the export") -> list[Path]:
    """SRC's files that travel unchanged (tokenizer, processor, generation config, report), each inside SRC;
    not the model card and plot (the export writes its own card)."""
    skip = ("config.json", INDEX, MARKER, *CARD_FILES)
    return [inside(src, item.name, "the file", command) for item in sorted(src.iterdir())
            if item.is_file() and item.name not in skip and item.suffix != ".safetensors"]


def read_tensor(src: Path, files: dict[str, str], key: str) -> torch.Tensor:
    with safe_open(str(src / files[key]), framework="pt") as handle:  # names checked by weight_files
        return handle.get_tensor(key)


def read_source(src: Path, command: str) -> tuple[dict[str, Any], ArchSpec]:
    """SRC's config.json (inside SRC, a checkpoint this package saved: checked) and its family."""
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} has no config.json: not a saved checkpoint.")
    config = json.loads(inside(src, "config.json", "the config", command).read_text())
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD:
        raise ValueError(
            f"{src} is not a checkpoint written by hf_vlm_gptq: its config.json has quantization_config "
            f"quant_method {qc.get('quant_method')!r}, expected {QUANT_METHOD!r}. {command} converts only "
            "checkpoints this package saved.")
    try:
        spec = spec_for_model_type(config.get("model_type"))
    except ValueError as err:
        raise ValueError(f"{src}: {err}") from None
    VLMGPTQConfig.from_dict(qc)  # format version and options, with the package's own messages
    return config, spec


def model_dtype(config: dict[str, Any]) -> torch.dtype:
    """The dtype dense weights are written in: the checkpoint's own (float32 when it names none)."""
    return DTYPES.get(str(config.get("dtype") or config.get("torch_dtype")).removeprefix("torch."), torch.float32)


def source_modules(config: dict[str, Any], spec: ArchSpec, files: dict[str, str]) -> list[SourceModule]:
    """Every quantized module of the source with the checkpoint key its tensors are stored under."""
    modules = []
    for path, record in parse_records(config["quantization_config"]["modules"]).items():
        suffix = ".L2.qweight" if record.kind == "split_linear" else ".qweight"
        key = next((n for n in spec.checkpoint_names(path) if n + suffix in files), None)
        if key is None:
            raise ValueError(f"checkpoint is missing the quantized tensor {path + suffix!r} (looked for "
                             f"{[n + suffix for n in spec.checkpoint_names(path)]}); the files are incomplete.")
        modules.append(SourceModule(path, record, key))
    return modules


def dense_linears(src: Path, config: dict[str, Any], spec: ArchSpec, files: dict[str, str]) -> dict[str, str]:
    """module path -> checkpoint key of every `nn.Linear` of the model that the source keeps in full
    precision (`modules_to_not_convert`, parts switched off, `lm_head`), read from the model class built on
    the meta device (no weights are read)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    hf_config = AutoConfig.from_pretrained(src)
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config  # the plain model: its Linears, not our packed twins
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(hf_config)
    quantized = set(config["quantization_config"]["modules"])
    out = {}
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or path in quantized:
            continue
        key = next((n for n in spec.checkpoint_names(path) if f"{n}.weight" in files), None)
        if key is not None:  # a tied lm_head has no tensor of its own: nothing to rule on
            out[path] = key
    return out


def dense_tensors(src: Path, files: dict[str, str], mod: SourceModule, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The dense `weight` (and `bias`) replacing a packed / split / conv module; dequantized with the
    project's reference (float32 math, one rounding to `dtype`)."""
    rec, prefix = mod.record, mod.packed_prefix
    kind, fin, fout = rec.kind, rec.packed_in_features, rec.packed_out_features
    packed = {name: read_tensor(src, files, f"{prefix}.{name}") for name in PACKED_BUFFERS}
    weight = dequantize_packed(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"],
                               bits=rec.bits, in_features=fin, out_features=fout,
                               group_size=rec.group_size, dtype=torch.float32)
    out: dict[str, torch.Tensor] = {}
    if kind == "conv":
        shape = (fout, rec.in_channels, *rec.kernel_size)
        out[f"{mod.key}.weight"] = weight.reshape(shape).to(dtype)
    elif kind == "split_linear":
        l1 = read_tensor(src, files, f"{mod.key}.L1.weight")
        out[f"{mod.key}.weight"] = torch.cat([l1.float(), weight], dim=1).to(l1.dtype)
        if f"{prefix}.bias" in files:
            out[f"{mod.key}.bias"] = read_tensor(src, files, f"{prefix}.bias")
    else:
        out[f"{mod.key}.weight"] = weight.to(dtype)
    return out


def packed_keys(mod: SourceModule, files: dict[str, str]) -> list[str]:
    """The source keys a module written in another form replaces (packed buffers; a split layer's L1 / bias)."""
    keys = [f"{mod.packed_prefix}.{name}" for name in PACKED_BUFFERS]
    if mod.record.kind == "split_linear":
        keys += [k for k in (f"{mod.key}.L1.weight", f"{mod.key}.L2.bias") if k in files]
    return keys


def guard_keys(modules: Iterable[SourceModule], files: dict[str, str]) -> set[str]:
    """The plugin's guard tensor (modules_swap.GUARD_TEXT) sits at a packed module's `weight` key: no other
    reader wants it."""
    return {f"{m.key}.weight" for m in modules if f"{m.key}.weight" in files}


def write_shards(src: Path, tmp: Path, files: dict[str, str], index: dict[str, Any] | None, consumed: set[str],
                 replacements: Iterable[tuple[str, Callable[[], dict[str, torch.Tensor]]]],
                 save_file: Callable[..., None]) -> None:
    """Write the source's shards under the same names: `consumed` keys dropped, and each replacement
    `(home file, make tensors)` added to its home file; a new index when the source had one."""
    by_file: dict[str, list[Callable[[], dict[str, torch.Tensor]]]] = {}
    for home, make in replacements:
        by_file.setdefault(home, []).append(make)
    weight_map, total = {}, 0
    for file in sorted(set(files.values())):
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(src / file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            for key in handle.keys():
                if key not in consumed:
                    tensors[key] = handle.get_tensor(key)
        for make in by_file.get(file, ()):
            tensors.update(make())
        (tmp / file).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp / file), metadata={**metadata, "format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if index is not None:
        meta = {**index.get("metadata", {}), "total_size": total}
        (tmp / INDEX).write_text(json.dumps({"metadata": meta, "weight_map": dict(sorted(weight_map.items()))},
                                            indent=2) + "\n")


def export_card(title: str, src: Path, body: list[str], dense: list[SourceModule]) -> str:
    """The README.md of an export: what it is, how to use it, and every module written dense with why."""
    lines = [f"# {title}", "", f"Converted by `hf_vlm_gptq` from `{src.name}` (a `vlm_gptq` checkpoint).", "", *body]
    if dense:
        lines += ["", f"## Modules written dense ({len(dense)})", "", "| module | why |", "|---|---|"]
        lines += [f"| `{m.key}` | {m.dense} |" for m in dense]
    return "\n".join(lines) + "\n"

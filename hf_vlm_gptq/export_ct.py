r"""Export a checkpoint saved by hf_vlm_gptq as a compressed-tensors checkpoint (``pack-quantized``, weight-only
integer: W4A16 / W8A16 ...), which transformers loads WITHOUT this package (through its compressed-tensors
quantizer; `pip install compressed-tensors`) and vLLM serves:
hf-vlm-gptq export --format compressed-tensors SRC OUT

Per packed Linear the GPTQ tensors are rewritten, not re-quantized (the same integers and scales):

* ``weight_packed`` int32 ``[out, ceil(in * bits / 32)]``: our ``qweight`` transposed. Both are one
  little-endian bit stream of the codes along the input dim (compressed-tensors' dense packing,
  `compressed_tensors/compressors/pack_quantized/helpers.py::pack_to_int32`, stores ``code = q + 2**(bits-1)``
  for the signed value ``q``; our symmetric grid's zero point is ``2**(bits-1)``, so the bits are the same);
* ``weight_scale`` ``[out, groups]``: our ``scales`` transposed (float16 as stored; readers cast them to the
  model's dtype), ``weight_shape`` int64 ``[out, in]``;
* ``quantization_config``: ``quant_method: "compressed-tensors"``, ``format: "pack-quantized"``, one config
  group per (bits, group size, sym) whose ``targets`` are ``re:`` patterns of the module names both readers
  use (transformers' ``model.language_model.layers.N...``, vLLM's ``language_model.model.layers.N...`` before
  it fuses q/k/v and gate/up), and ``ignore`` listing every Linear that stays dense (``lm_head`` included).

Written dense, dequantized exactly and listed in ``ignore`` and the export's README (the format cannot
express them): the conv patch embedding (compressed-tensors packs Linear / Embedding only,
`compressed_tensors/compressors/base.py::COMPRESSIBLE_MODULE_TYPES`), split layers (L1 + L2 merged back), a
partial last group (a group size that does not divide ``in_features``: the format has ``in // group``
groups), act-order groups (a permuted ``g_idx``: compressed-tensors 0.20 removed ``actorder: "group"``,
`compressed_tensors/quantization/quant_args.py::validate_actorder`), and every module of an asymmetric
(``sym=False``) checkpoint: transformers builds ``weight_zero_point`` unpacked ``[out, groups]`` (the meta
branch of `compressed_tensors/compressors/pack_quantized/base.py::PackedQuantizationCompressor.compress`)
while vLLM reads it packed ``[out * bits / 32, groups]``, so no file satisfies both. Every other module kept in full
precision by the source (``modules_to_not_convert``, a part switched off) is copied and listed in ``ignore``.

vLLM (0.33 source: `vllm/model_executor/layers/quantization/compressed_tensors/schemes/
compressed_tensors_wNa16.py`) reads this layout for every family it has a class for; its kernels run 4 and
8 bits (CPU: 4-bit, widths multiples of 32, `.../kernels/linear/mixed_precision/cpu.py`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from . import export_io as io
from .export_io import SourceModule
from .ops.packing import contiguous_groups, unpack_zeros
from .outdir import OutputDir

logger = logging.getLogger(__name__)

COMMAND = "export --format compressed-tensors"
FORMAT = "pack-quantized"


def dense_reason(mod: SourceModule, contiguous: bool, sym: bool) -> str | None:
    """Why the compressed-tensors format cannot hold this quantized module packed (for both readers), or None."""
    rec = mod.record
    if not sym:
        return ("asymmetric grid: transformers (compressed-tensors 0.20, loading on the meta device) expects "
                "weight_zero_point unpacked [out, groups], vLLM packed [out * bits / 32, groups]")
    if rec.kind == "conv":
        return "conv patch embedding (compressed-tensors packs Linear layers only)"
    if rec.kind == "split_linear":
        return "split layer (.L1 + .L2) merged back (the format has no split linear)"
    if rec.group_size != -1 and rec.in_features % rec.group_size:
        return (f"in_features {rec.in_features} not divisible by group size {rec.group_size} (partial last "
                "group; the format stores in // group groups)")
    if not contiguous:
        return "act-order groups (permuted g_idx; compressed-tensors 0.20 has no actorder 'group')"
    return None


def _alternatives(names: list[str]) -> str:
    names = list(dict.fromkeys(names))
    escaped = [re.escape(n) for n in names]
    return escaped[0] if len(escaped) == 1 else "(?:" + "|".join(escaped) + ")"


def name_patterns(variants: list[tuple[str, ...]]) -> list[str]:
    """`re:` patterns matching exactly the given modules, each known under one or more names (transformers',
    vLLM's). Modules that differ only in their block index share one pattern: `head.(0|1|...).tail$`."""
    grouped: dict[tuple[tuple[str, ...], str], list[str]] = defaultdict(list)
    singles: list[tuple[str, ...]] = []
    for names in variants:
        parts = [re.match(r"^(.*?)\.(\d+)\.(.*)$", n) for n in names]
        if all(parts) and len({(p.group(2), p.group(3)) for p in parts}) == 1:
            heads = tuple(dict.fromkeys(p.group(1) for p in parts))
            grouped[(heads, parts[0].group(3))].append(parts[0].group(2))
        else:
            singles.append(names)
    out = [f"re:^{_alternatives(list(heads))}\\.{_alternatives(idx)}\\.{re.escape(tail)}$"
           for (heads, tail), idx in grouped.items()]
    return out + [f"re:^{_alternatives(list(names))}$" for names in singles]


def _names(spec, path: str, key: str) -> tuple[str, ...]:
    """The names both readers give the module at `path` (checkpoint key `key`): transformers' own, and
    vLLM's before it fuses shards (its `hf_to_vllm_mapper` prefixes)."""
    if spec.vllm is None:
        return (path,)
    vllm = key
    for old, new in spec.vllm.prefixes:
        if vllm.startswith(old):
            vllm = new + vllm[len(old):]
    return tuple(dict.fromkeys((path, vllm)))


def _weights_args(bits: int, group: int, sym: bool) -> dict[str, Any]:
    """compressed-tensors' QuantizationArgs (only fields every release since 0.10 knows: vLLM pins older ones)."""
    strategy = "channel" if group == -1 else "group"
    return {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": strategy,
            "group_size": None if group == -1 else group, "dynamic": False}


def ct_tensors(src: Path, files: dict[str, str], mod: SourceModule) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one packed symmetric Linear (bias travels under its own key)."""
    rec, key = mod.record, mod.key
    t = {name: io.read_tensor(src, files, f"{key}.{name}") for name in ("qweight", "qzeros", "scales")}
    words = -(-rec.in_features * rec.bits // 32)
    out = {f"{key}.weight_packed": t["qweight"][:words].t().contiguous(),
           f"{key}.weight_scale": t["scales"].t().contiguous(),
           f"{key}.weight_shape": torch.tensor([rec.out_features, rec.in_features], dtype=torch.int64)}
    zeros = unpack_zeros(t["qzeros"], rec.bits, rec.out_features)
    if not torch.all(zeros == 2 ** (rec.bits - 1)):  # the symmetric grid's zero point: codes are q + 2**(bits-1)
        raise ValueError(f"{key}: a symmetric checkpoint with zero points other than {2 ** (rec.bits - 1)}; "
                         "the files were edited.")
    return out


def _plan(src: Path, config: dict[str, Any], spec, files: dict[str, str], sym: bool) -> list[SourceModule]:
    modules = io.source_modules(config, spec, files)
    for mod in modules:
        contiguous = True
        if mod.record.kind == "linear":
            contiguous = contiguous_groups(io.read_tensor(src, files, f"{mod.key}.g_idx"), mod.record.group_size)
        mod.dense = dense_reason(mod, contiguous, sym)
        mod.name = mod.path
    if spec.vllm is not None:
        _fused_alike(modules, spec.vllm)
    return modules


def _fused_alike(modules: list[SourceModule], layout) -> None:
    """vLLM runs q/k/v and gate/up shards as one layer and refuses shards quantized differently
    (`compressed_tensors/utils.py::should_ignore_layer`, `find_matched_target`): when the shards are not all
    packed with one scheme, the packed ones are written dense too (exactly: the same weights, bigger)."""
    groups: dict[str, list[SourceModule]] = defaultdict(list)
    for mod in modules:
        name = layout.module_name(mod.key)
        if mod.record.kind == "linear" and not name.endswith("." + mod.key.rpartition(".")[2]):
            groups[name].append(mod)
    for name, members in groups.items():
        packed = [m for m in members if not m.dense]
        shards = layout.shards_of(name.rpartition(".")[2], name)
        if packed and (len(packed) < max(len(shards), len(members)) or len({m.scheme for m in packed}) > 1):
            for mod in packed:
                mod.dense = (f"vLLM fuses it into {name}, whose shards are not all packed with one scheme (vLLM "
                             "refuses mixed shards)")


def quantization_config(spec, modules: list[SourceModule], floats: dict[str, str], sym: bool) -> dict[str, Any]:
    """The compressed-tensors `quantization_config`: one group per scheme, `ignore` for every dense Linear."""
    by_scheme: dict[tuple[int, int], list[tuple[str, ...]]] = defaultdict(list)
    for mod in modules:
        if not mod.dense:
            by_scheme[mod.scheme].append(_names(spec, mod.path, mod.key))
    groups = {f"group_{i}": {"targets": name_patterns(names), "weights": _weights_args(bits, group, sym),
                             "input_activations": None, "output_activations": None}
              for i, ((bits, group), names) in enumerate(sorted(by_scheme.items()))}
    dense_linears = [_names(spec, m.path, m.key) for m in modules if m.dense and m.record.kind != "conv"]
    dense_linears += [_names(spec, path, key) for path, key in floats.items()]
    return {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
            "config_groups": groups, "ignore": list(dict.fromkeys([*name_patterns(dense_linears), "lm_head"])),
            "kv_cache_scheme": None, "global_compression_ratio": None}


def export_compressed_tensors(src_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write a compressed-tensors (pack-quantized) copy of the hf_vlm_gptq checkpoint `src_dir` into `out_dir`.

    transformers loads it without `import hf_vlm_gptq` (with `compressed-tensors` installed), vLLM serves
    it. Modules the format cannot express are written dense and listed (logged, and in OUT's README.md).
    Raises ValueError (nothing written) for a checkpoint that is not ours, an index or symlink naming a
    file outside SRC, or an OUT that is SRC, holds SRC, is a file or a folder we did not write;
    FileExistsError when `out_dir` exists (without `overwrite`); `outdir.OutputError` when the disk refuses
    the writes.
    """
    src, out = Path(src_dir), Path(out_dir)
    config, spec = io.read_source(src, COMMAND)
    sym = bool(config["quantization_config"]["sym"])
    with OutputDir(out, overwrite=overwrite, protect=[src], command="export-compressed-tensors") as dest:
        files, index = io.weight_files(src, COMMAND)
        others = io.other_files(src, COMMAND)
        modules = _plan(src, config, spec, files, sym)
        floats = io.dense_linears(src, config, spec, files)
        quant = quantization_config(spec, modules, floats, sym)
        new_config = {k: v for k, v in config.items() if k != "quantization_config"}
        if quant["config_groups"]:
            new_config["quantization_config"] = quant
        else:
            logger.warning("no module can stay packed in compressed-tensors: writing a dense checkpoint")
        dtype = io.model_dtype(config)
        consumed = {k for m in modules for k in io.packed_keys(m, files)} | io.guard_keys(modules, files)
        home = {m.path: files[f"{m.packed_prefix}.qweight"] for m in modules}
        replacements = [(home[m.path], (lambda m=m: io.dense_tensors(src, files, m, dtype)) if m.dense
                         else (lambda m=m: ct_tensors(src, files, m))) for m in modules]
        with dest.writing() as tmp:
            io.write_shards(src, tmp, files, index, consumed, replacements, lambda *a, **k: save_file(*a, **k))
            (tmp / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
            for item in others:
                shutil.copy2(item, tmp / item.name)
            dense = [m for m in modules if m.dense]
            (tmp / "README.md").write_text(_card(src, modules, floats, dense))
        dest.commit()
    for mod in dense:
        logger.info("dense: %s: %s", mod.path, mod.dense)
    odd = sorted({m.record.bits for m in modules if not m.dense} - {4, 8})
    if odd:
        logger.info("%s-bit modules: transformers reads them; vLLM's kernels run 4/8-bit only (CPU: 4-bit)",
                    "/".join(map(str, odd)))
    logger.info("exported %s as compressed-tensors (%s): %d module(s) packed, %d written dense, %d Linear(s) kept "
                "in full precision by the source", out, FORMAT, len(modules) - len(dense), len(dense), len(floats))
    return out


def _card(src: Path, modules: list[SourceModule], floats: dict[str, str], dense: list[SourceModule]) -> str:
    schemes = sorted({m.scheme for m in modules if not m.dense})
    what = ", ".join(f"{b}-bit group {g}" for b, g in schemes) or "none"
    body = [f"compressed-tensors `{FORMAT}` checkpoint (weight-only int; packed schemes: {what}). No "
            "`import hf_vlm_gptq` needed:", "", "```python", "# pip install compressed-tensors",
            "from transformers import AutoModelForImageTextToText",
            'model = AutoModelForImageTextToText.from_pretrained("THIS_FOLDER")', "```", "",
            "```bash", "vllm serve THIS_FOLDER", "```", "",
            f"Linears the source kept in full precision (in `ignore`): {len(floats)}."]
    return io.export_card("compressed-tensors export", src, body, dense)

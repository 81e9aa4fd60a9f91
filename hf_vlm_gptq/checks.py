"""Model-level checks of a quantization run: what can be known before calibration is checked before it.

`run_model_checks(model, spec, config, select)` runs at the start of `pipeline.quantize_model`, before any
forward pass:

* `modules_to_not_convert` prefixes that match no module of the model get one warning naming them (a
  typo there would otherwise quantize the very layer that was meant to stay in full precision);
* the weights of every layer this run will quantize are scanned: non-finite values (inf / nan) are an
  error naming the layers, and so is a weight whose quantization scale cannot be stored in float16 (the
  checkpoint's `scales` dtype; max 65504), since either would spoil every layer calibrated after it;
* it returns a `RunChecks` that, while the run lasts, checks the calibration input of each of those layers
  when it reaches them: a non-finite input (an fp16 overflow in the forward pass, typically) is an error
  naming the layer, raised before its Hessian is accumulated.

`RunChecks.finish(records)` (at the end of `quantize_model`) reads the float16 scales of the packed modules:
scales that underflowed to 0 (their groups dequantize to 0) are recorded in the module's stats
(`scales_underflow`, shown in the report) with a warning naming the layer; an inf / nan scale is an error.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Iterable
from functools import partial

import torch
from torch import nn

from .arch import ArchSpec, find_module
from .config import VLMGPTQConfig
from .config_fields import DEFAULTS, PART_SWITCHES
from .ops.result import all_finite
from .report import QuantRecord

logger = logging.getLogger(__name__)

FP16_MAX = float(torch.finfo(torch.float16).max)
_QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LISTED = 8  # layers named in one message; the rest are counted


def is_kept(path: str, prefixes: list[str]) -> bool:
    """Whether `path` is kept in full precision by `modules_to_not_convert` (a path or a parent's path)."""
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def planned_layers(model: nn.Module, spec: ArchSpec, config: VLMGPTQConfig,
                   select: dict[str, str] | None = None) -> list[tuple[str, nn.Module, int, bool]]:
    """(path, module, bits, split) of every Linear / Conv this run will quantize, in the pipeline's order.

    `split`: the layer becomes a split linear (input channel 0 stays in full precision)."""
    layers = []
    keep = config.modules_to_not_convert
    for comp in spec.components:
        if not getattr(config, comp.flag) or (select is not None and comp.name not in select):
            continue
        which = "all" if select is None else select[comp.name]
        opts = config.part_options(comp.part)
        if comp.stem and which in ("all", "stem"):
            found = find_module(model, comp.stem)
            if found is not None and isinstance(found[1], _QUANTIZABLE) and not is_kept(found[0], keep):
                layers.append((found[0], found[1], opts.bits, False))
        if which not in ("all", "blocks"):
            continue
        found = find_module(model, comp.blocks)
        if found is None:
            continue  # the pipeline says which paths it looked for
        path, container = found
        blocks = [(path, container)] if comp.single else [(f"{path}.{i}", b) for i, b in enumerate(container)]
        for block_path, block in blocks:
            for group in comp.sequential:
                for name in group:
                    try:
                        module = block.get_submodule(name)
                    except AttributeError:
                        continue
                    full = f"{block_path}.{name}"
                    if isinstance(module, _QUANTIZABLE) and not is_kept(full, keep):
                        layers.append((full, module, opts.bits, opts.split and name == comp.split_target))
    return layers


def unmatched_prefixes(model: nn.Module, prefixes: list[str]) -> list[str]:
    """The `modules_to_not_convert` entries that name no module of `model` (nor a parent of one)."""
    names = [name for name, _ in model.named_modules()]
    return [p for p in prefixes if not any(is_kept(name, [p]) for name in names)]


def _warn_unmatched(model: nn.Module, spec: ArchSpec, config: VLMGPTQConfig) -> None:
    unmatched = unmatched_prefixes(model, config.modules_to_not_convert)
    if not unmatched:
        return
    hints = []
    for prefix in unmatched:  # a checkpoint key (legacy layout) instead of the module's own path?
        for runtime, saved in spec.saved_prefixes:
            if prefix.startswith(saved) and not unmatched_prefixes(model, [runtime + prefix[len(saved):]]):
                hints.append(f"{prefix!r} -> {runtime + prefix[len(saved):]!r}")
                break
    logger.warning(
        "modules_to_not_convert: %s match%s no module of this model, so %s nothing in full precision; give "
        "the model's own module paths (model.named_modules(), e.g. %r)%s",
        ", ".join(repr(p) for p in unmatched), "es" if len(unmatched) == 1 else "",
        "it keeps" if len(unmatched) == 1 else "they keep",
        next((name for name, m in model.named_modules() if isinstance(m, nn.Linear)), ""),
        f"; did you mean {', '.join(hints)}?" if hints else "")


def _listing(items: list[str]) -> str:
    more = len(items) - _LISTED
    return "; ".join(items[:_LISTED]) + (f"; and {more} more" if more > 0 else "")


def _max_scale(lo: float, hi: float, bits: int, sym: bool) -> float:
    """The largest grid scale a row / group with values in [lo, hi] can need (the whole range, unclipped)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if sym:
        return max(-lo, hi) / (2 ** (bits - 1) - 1)
    return (hi - lo) / (2**bits - 1)


def scan_weights(layers: list[tuple[str, nn.Module, int, bool]], sym: bool) -> None:
    """Raise ValueError naming every layer whose weight is not finite, or whose scale overflows float16.

    One min / max pass per weight (two for a split layer, whose channel 0 stays in full precision)."""
    broken, too_large = [], []
    for path, module, bits, split in layers:
        weight = module.weight.detach()
        if weight.is_meta or weight.numel() == 0:
            continue
        lo, hi = (float(v) for v in torch.aminmax(weight))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            bad = int((~torch.isfinite(weight)).sum())
            broken.append(f"{path} ({bad} of {weight.numel()} values)")
            continue
        if split and weight.flatten(1).shape[1] > 1:
            lo, hi = (float(v) for v in torch.aminmax(weight.flatten(1)[:, 1:]))
        scale = _max_scale(lo, hi, bits, sym)
        if scale > FP16_MAX:
            too_large.append(f"{path} (largest weight {max(-lo, hi):.4g} needs a {bits}-bit scale of {scale:.4g})")
    if broken:
        raise ValueError(
            f"non-finite weights (inf or nan) in {len(broken)} layer(s) that would be quantized: {_listing(broken)}. "
            "The checkpoint is damaged or was saved after an overflow; repair it, or list those layers in "
            "VLMGPTQConfig.modules_to_not_convert. Nothing was quantized."
        )
    if too_large:
        raise ValueError(
            f"{len(too_large)} layer(s) have weights too large for float16 scales (the checkpoint stores scales "
            f"in float16, max {FP16_MAX:.0f}): {_listing(too_large)}. List them in "
            "VLMGPTQConfig.modules_to_not_convert, or use more bits. Nothing was quantized."
        )


def _input_problem(x: object) -> str | None:
    """Why a layer's calibration input cannot be used (None when it can)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or all_finite(x):
        return None
    if x.dtype == torch.float16:
        return (f"the float16 forward pass overflowed before it (float16 stops at {FP16_MAX:.0f}); calibrate in "
                "bfloat16 or float32 (from_pretrained(..., dtype=torch.bfloat16))")
    return f"the {x.dtype} forward pass before it produced them (the weights were checked: finite)"


class RunChecks:
    """The checks that last as long as one quantization run (see the module docstring).

    The input checks are forward pre-hooks on the layers of the run (a quantized layer is swapped out, and
    its hook with it). They hold this object weakly, so they go when it does (the run is over) even if the
    run raised; the first bad input removes them all before raising."""

    def __init__(self, model: nn.Module, layers: list[tuple[str, nn.Module, int, bool]]) -> None:
        self.model = model
        me = weakref.ref(self)
        self.handles = [module.register_forward_pre_hook(partial(_check_input, me, path))
                        for path, module, _, _ in layers]

    def close(self) -> None:
        """Remove the input checks from the layers that are still float (the quantized ones are gone)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __del__(self) -> None:
        self.close()

    def finish(self, records: dict[str, QuantRecord]) -> None:
        """Stop the input checks; record float16 scales that underflowed to 0, refuse inf / nan ones."""
        self.close()
        broken = []
        for path, record in records.items():
            try:
                scales = self.model.get_submodule(path).scales
            except AttributeError:
                continue
            if not isinstance(scales, torch.Tensor) or scales.is_meta:
                continue
            if not all_finite(scales):
                broken.append(path)
                continue
            zero = int((scales == 0).sum())  # the grid never makes a scale of 0: an fp16 zero is an underflow
            if zero:
                record.extra["scales_underflow"] = zero
                logger.warning(
                    "%s: %d of %d scales underflow to 0 in float16 (groups of weights below ~6e-8 in size); those "
                    "weights dequantize to 0", path, zero, scales.numel())
        if broken:
            raise ValueError(f"non-finite float16 scales (overflow) in {_listing(broken)}: their weights became too "
                             "large during GPTQ; list them in VLMGPTQConfig.modules_to_not_convert.")


def _check_input(checks: weakref.ref, path: str, module: nn.Module, args: tuple) -> None:
    run = checks()
    if run is None:  # the run is over
        return
    problem = _input_problem(args[0] if args else None)
    if problem is not None:
        run.close()
        raise ValueError(f"{path}: its calibration input holds inf or nan values: {problem}. Nothing was saved.")


def run_model_checks(model: nn.Module, spec: ArchSpec, config: VLMGPTQConfig,
                     select: dict[str, str] | None = None) -> RunChecks:
    """The checks before calibration (see the module docstring); returns the checks of the run itself."""
    _warn_unmatched(model, spec, config)
    layers = planned_layers(model, spec, config, select)
    scan_weights(layers, config.sym)
    return RunChecks(model, layers)


def check_part_flags(spec: ArchSpec, config: VLMGPTQConfig) -> None:
    """Fail before any work when none of the parts this architecture has is switched on."""
    if not any(getattr(config, flag) for flag in sorted(spec.flags())):
        others = [f for f in PART_SWITCHES if f not in spec.flags()]
        raise ValueError(
            f"nothing to quantize: {spec.name}'s parts are switched by {', '.join(sorted(spec.flags()))}, and all "
            f"are False ({', '.join(others)} do not apply to {spec.name}); switch one of its parts on."
        )


def log_ignored_flags(spec: ArchSpec, config: VLMGPTQConfig, flags: Iterable[str] = PART_SWITCHES) -> None:
    """One log line for part flags that do not apply to this architecture.

    INFO when the user changed such a flag from its default (they meant something by it), DEBUG otherwise:
    `quant_cross_attention` / `quant_visual_projector` both default to True, so each architecture has one.
    """
    ignored = [f for f in flags if f not in spec.flags()]
    if not ignored:
        return
    changed = any(getattr(config, f) != DEFAULTS[f] for f in ignored)
    logger.log(logging.INFO if changed else logging.DEBUG, "%s has no part behind %s; ignored", spec.name,
               ", ".join(f"{f}={getattr(config, f)}" for f in ignored))

"""`VLMGPTQConfig`: every option of the research code's GPTQ/RTN pipeline, validated up front.

The options are declared once, in `config_fields.FIELDS`; this class takes them as keyword arguments (or
positionally, in that order), checks them, and reads / writes `config.json`'s `quantization_config`.
The config travels two ways: from the user into `from_pretrained(..., quantization_config=cfg)` (with
calibration data and maybe a processor), and from `config.json` back into a loader, where it also carries
the checkpoint's `manifest` (quantized modules, their stats, format version; `manifest.py`). `to_dict` is
what lands in `config.json`: the options, the manifest's flat keys, never calibration data or the processor.
Quantizing never changes the user's config object: the quantized model gets a copy with its manifest
(`with_manifest`).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from typing import Any

import torch
from transformers.utils.quantization_config import QuantizationConfigMixin

from .config_fields import (
    BY_NAME,
    FIELDS,
    GPTQ_ALIASES,
    GPTQ_WITHOUT_COUNTERPART,
    HESSIAN_WEIGHTINGS,
    MODALITIES,
    PART_SWITCHES,
    PARTS,
    SUPPORTED_BITS,
    Field,
    PartOptions,
    args_doc,
)
from .manifest import FORMAT_VERSION, MANIFEST_KEYS, CheckpointManifest

__all__ = ["FORMAT_VERSION", "GPTQ_ALIASES", "HESSIAN_WEIGHTINGS", "MODALITIES", "QUANT_METHOD", "SUPPORTED_BITS",
           "PartOptions", "VLMGPTQConfig"]

QUANT_METHOD = "vlm_gptq"
SUMMARY_KEYS = ("bits", "group_size", "desc_act")
"""GPTQConfig-style keys `to_dict` adds for other readers (each only when its fields agree); derived, so
`from_dict` drops them."""


def _apply_gptq_names(given: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, str]:
    """Move GPTQConfig's names (`GPTQ_ALIASES`) in `kwargs` onto our field(s) of the same meaning.

    `given`: every value passed (positional ones included). ``bits`` sets both ``visual_w_bits`` and
    ``llm_w_bits``, except one passed explicitly (so ``bits=4, visual_w_bits=8`` is a 4-bit LLM with an
    8-bit vision part); any other alias given together with its field must agree with it. GPTQConfig
    options without a counterpart are refused with a hint. Returns our field -> "alias=value"."""
    used: dict[str, str] = {}
    for alias, fields in GPTQ_ALIASES.items():
        if alias not in kwargs:
            continue
        value = kwargs.pop(alias)
        if len(fields) > 1 and all(f in given for f in fields) and value not in [given[f] for f in fields]:
            raise ValueError(f"VLMGPTQConfig got {alias}={value!r} (GPTQConfig's name for {' and '.join(fields)}) "
                             f"and {', '.join(f'{f}={given[f]!r}' for f in fields)}; pass one or the other.")
        for name in fields:
            if name not in given:
                kwargs[name] = value
                used[name] = f"{alias}={value!r}"
            elif len(fields) == 1 and given[name] != value:
                raise ValueError(f"VLMGPTQConfig got {alias}={value!r} (GPTQConfig's name for {name}) and "
                                 f"{name}={given[name]!r}; pass one of them.")
    refused = sorted(set(kwargs) & set(GPTQ_WITHOUT_COUNTERPART))
    if refused:
        raise ValueError("VLMGPTQConfig has no counterpart of GPTQConfig's " + "; ".join(
            f"{name} ({GPTQ_WITHOUT_COUNTERPART[name]})" for name in refused) + ".")
    return used


def _signature() -> inspect.Signature:
    """`VLMGPTQConfig(...)`'s parameters as declared (help() and IDEs show them)."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter("self", kind)]
    params += [inspect.Parameter(f.name, kind, default=f.default, annotation=f.type | None if f.nullable else f.type)
               for f in FIELDS]
    return inspect.Signature([*params, inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])


class VLMGPTQConfig(QuantizationConfigMixin):
    """Options for GPTQ / RTN quantization of a whole vision-language model.

    Parts (each behind its switch): the vision encoder with its conv patch embedding (`quant_visual_clip`),
    the bridge to the language model — the Qwen families' `visual.merger` (`quant_cross_attention`) or
    VideoLLaMA3's projector (`quant_visual_projector`) — and the language model (`quant_llm`). The vision
    parts share one set of per-part options (`visual_*`), the language model has its own (`llm_*`):
    `part_options("visual" | "llm")` gives them as a `PartOptions`.

    Also accepted: transformers' GPTQConfig names (`bits`, `group_size`, `desc_act`, ...; README
    "Options"), and a saved checkpoint's `modules`, `stats` and `format_version` (its manifest).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if len(args) > len(FIELDS):
            raise TypeError(f"VLMGPTQConfig takes at most {len(FIELDS)} positional arguments, got {len(args)}")
        given = dict(zip((f.name for f in FIELDS), args))
        twice = sorted(set(given) & set(kwargs))
        if twice:
            raise TypeError(f"VLMGPTQConfig got multiple values for {', '.join(twice)}")
        used = _apply_gptq_names({**given, **kwargs}, kwargs)
        given.update(kwargs)
        manifest = CheckpointManifest.from_values(**{k: given.pop(k) for k in MANIFEST_KEYS if k in given})
        given.pop("quant_method", None)
        unknown = sorted(set(given) - set(BY_NAME))
        if unknown:
            raise ValueError(
                f"VLMGPTQConfig got unknown option(s) {unknown}; "
                "see help(hf_vlm_gptq.VLMGPTQConfig) for the accepted fields (GPTQConfig's bits, group_size, "
                "desc_act, damp_percent, model_seqlen and format are accepted too)."
            )
        self.quant_method = QUANT_METHOD
        parts: dict[str, dict[str, Any]] = {part: {} for part in PARTS}
        for f in FIELDS:
            value = given.get(f.name, f.default)
            value = f.normalize(value) if f.normalize else value
            if f.part:
                parts[f.part][f.option] = value
            else:
                setattr(self, f.name, value)
        self._parts = {part: PartOptions(**options) for part, options in parts.items()}
        self.manifest = manifest
        try:
            self.post_init()
        except ValueError as err:
            name = next((f for f in used if f"VLMGPTQConfig.{f} " in str(err)), None)
            if name is None:
                raise
            raise ValueError(f"{err} (set by GPTQConfig's name {used[name]})") from None

    def post_init(self) -> None:
        """Check every field; raise ValueError naming the field, the bad value and what to pass instead."""
        for f in FIELDS:
            message = f.error(getattr(self, f.name))
            if message:
                raise ValueError(message)
        self._check_gptq_options()
        self._check_calibration_device()
        self._check_modules_to_not_convert()
        if self.processor is not None and not callable(getattr(self.processor, "apply_chat_template", None)):
            hint = (" (a path or Hub name: pass AutoProcessor.from_pretrained(...) instead)"
                    if isinstance(self.processor, str) else "")
            raise ValueError(
                "VLMGPTQConfig.processor must be None (the model's own processor) or a processor object with "
                f"apply_chat_template, got {type(self.processor).__name__} {self.processor!r}{hint}."
            )
        if not any(getattr(self, name) for name in PART_SWITCHES):
            raise ValueError(f"VLMGPTQConfig: every part is switched off ({', '.join(PART_SWITCHES)} are all "
                             "False); switch at least one on.")

    # --- the checkpoint's manifest (read-only views of the flat keys older code used) -------------
    @property
    def modules(self) -> dict[str, dict[str, Any]]:
        """The checkpoint's quantized modules (`manifest.modules`); empty before quantizing."""
        return self.manifest.modules

    @property
    def stats(self) -> dict[str, dict[str, Any]]:
        """The checkpoint's per-module stats (`manifest.stats`)."""
        return self.manifest.stats

    @property
    def format_version(self) -> int:
        return self.manifest.format_version

    def with_manifest(self, manifest: CheckpointManifest) -> VLMGPTQConfig:
        """A copy of these options carrying `manifest` (what a quantized model stores), without the
        runtime objects (`dataset`, `processor`); this config is left as it is."""
        out = copy.copy(self)
        out.__dict__.update({f.name: copy.deepcopy(getattr(self, f.name)) if f.serialized else None
                             for f in FIELDS if not f.part})
        out._parts = dict(self._parts)
        out.manifest = manifest
        return out

    @property
    def _for_quantization(self) -> bool:
        """True for a config that will quantize (a loaded checkpoint's config lists its modules): checks that
        depend on this machine or on calibration data apply only then."""
        return self.manifest.is_empty

    def _check_calibration_device(self) -> None:
        value = self.calibration_device
        if value is None:
            return
        field = "VLMGPTQConfig.calibration_device"
        try:
            device = torch.device(value)
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"{field}={value!r} is not a device: {err}") from None
        if device.type == "meta":
            raise ValueError(f"{field}='meta' holds no data; use 'cuda' or 'cpu'.")
        if device.type == "cpu" or not self._for_quantization:
            return
        backend = getattr(torch, device.type, None)
        is_available = getattr(backend, "is_available", None)
        if callable(is_available) and not is_available():
            raise ValueError(f"{field}={value!r}, but this machine has no {device.type} device "
                             f"(torch.{device.type}.is_available() is False); use 'cpu' or None.")
        count = getattr(backend, "device_count", None)
        if device.index is not None and callable(count) and device.index >= count():
            raise ValueError(f"{field}={value!r}, but this machine has {count()} {device.type} device(s) "
                             f"(indices 0..{count() - 1}).")

    def _check_modules_to_not_convert(self) -> None:
        value = self.modules_to_not_convert
        field = "VLMGPTQConfig.modules_to_not_convert"
        if isinstance(value, str):
            raise ValueError(f"{field} must be a list of module paths, got the string {value!r}; "
                             f"pass [{value!r}] for one path.")
        if not isinstance(value, list) or not all(isinstance(m, str) and m for m in value):
            raise ValueError(f"{field} must be a list of module paths (non-empty strings), got {value!r}.")

    def _check_gptq_options(self) -> None:
        if self.act_order and self.group_order:
            raise ValueError("VLMGPTQConfig.group_order and VLMGPTQConfig.act_order are two column orders; "
                             "set one of them (group_order keeps the checkpoint servable by vLLM).")
        weights = self.modality_weights
        if weights is not None:
            ok = isinstance(weights, dict) and set(weights) <= set(MODALITIES) and all(
                not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
                for v in weights.values())
            if not ok:
                raise ValueError(f"VLMGPTQConfig.modality_weights must be a dict with keys among {MODALITIES} "
                                 f"and numbers >= 0, got {weights!r}.")
            if self.hessian_weighting != "modality":
                raise ValueError("VLMGPTQConfig.modality_weights is only used with hessian_weighting='modality', "
                                 f"got hessian_weighting={self.hessian_weighting!r}.")

    # --- per-part views -------------------------------------------------------------------------
    def part_options(self, part: str) -> PartOptions:
        """Bits, RTN switch, clip and split of a part kind: "visual" (encoder and bridge) or "llm"."""
        if part not in self._parts:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        return self._parts[part]

    # --- serialization --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """`quantization_config` as `config.json` stores it: `quant_method`, every serialized option, the
        manifest's flat keys and the GPTQ-style summary keys (`bits` only when both parts have the same
        bits); never calibration data or the processor."""
        out: dict[str, Any] = {"quant_method": self.quant_method}
        out.update({f.name: copy.deepcopy(getattr(self, f.name)) for f in FIELDS if f.serialized})
        out.update(self.manifest.to_dict())
        for alias in SUMMARY_KEYS:
            values = {repr(out[name]) for name in GPTQ_ALIASES[alias]}
            if len(values) == 1:
                out[alias] = out[GPTQ_ALIASES[alias][0]]
        return out

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Rebuild from `config.json`'s `quantization_config`, in the flat layout every version wrote
        (summary keys are derived, so dropped)."""
        clean = {k: v for k, v in config_dict.items() if k not in SUMMARY_KEYS}
        return super().from_dict(clean, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def __iter__(self):
        yield from self.to_dict().items()

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


def _part_property(f: Field) -> property:
    """The flat name of a per-part option (`visual_w_bits`, ...) as an attribute of the config."""

    def get(self: VLMGPTQConfig) -> Any:
        return getattr(self._parts[f.part], f.option)

    def set_(self: VLMGPTQConfig, value: Any) -> None:
        self._parts[f.part] = dataclasses.replace(self._parts[f.part], **{f.option: value})

    return property(get, set_, doc=f.help)


for _field in FIELDS:
    if _field.part:
        setattr(VLMGPTQConfig, _field.name, _part_property(_field))
VLMGPTQConfig.__init__.__signature__ = _signature()
VLMGPTQConfig.__doc__ = f"{VLMGPTQConfig.__doc__.rstrip()}\n\n    " + args_doc().replace("\n", "\n    ") + "\n"

"""`VLMGPTQConfig`: every option of the research code's GPTQ/RTN pipeline, validated up front.

The config travels two ways: from the user into `from_pretrained(..., quantization_config=cfg)` (with
calibration data and maybe a processor), and from `config.json` back into a loader (with the list of
quantized modules and their stats). `to_dict` is what lands in `config.json`: it never contains the
calibration data or the processor.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import numbers
from typing import Any

import torch
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "vlm_gptq"
FORMAT_VERSION = 1
SUPPORTED_BITS = (2, 3, 4, 8)

# Fields that are runtime-only: never serialized.
_RUNTIME_FIELDS = ("dataset", "processor")

_BOOL_FIELDS = (
    "quant_visual_clip",
    "quant_cross_attention",
    "quant_visual_projector",
    "quant_llm",
    "visual_w_rtn",
    "llm_w_rtn",
    "act_order",
    "visual_w_clip",
    "llm_w_clip",
    "visual_split",
    "llm_split",
    "sym",
    "true_sequential",
    "group_order",
    "sym_full_range",
    "gptaq",
)
HESSIAN_WEIGHTINGS = ("none", "modality", "balanced", "gradient")
MODALITIES = ("image", "video", "text")

# transformers' GPTQConfig names accepted as aliases of ours (README, "Options"): alias -> our field(s)
GPTQ_ALIASES = {
    "bits": ("visual_w_bits", "llm_w_bits"),
    "group_size": ("w_groupsize",),
    "desc_act": ("act_order",),
    "act_group_aware": ("group_order",),
    "damp_percent": ("percdamp",),
    "model_seqlen": ("max_seq_len",),
    "format": ("checkpoint_format",),
}
_KERNELS = "the kernel is chosen per layer when it runs (README: Performance; QuantLinear.kernel)"
_BLOCKS = ("the blocks, their order and their inputs come from the architecture definitions (hf_vlm_gptq/arch); "
           "switch parts with quant_visual_clip / quant_cross_attention / quant_visual_projector / quant_llm and "
           "keep modules in full precision with modules_to_not_convert")
# GPTQConfig options with no counterpart here: why, or what to pass instead
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


def _accept_gptq_names(init):
    """Let ``__init__`` take GPTQConfig's names (:data:`GPTQ_ALIASES`): each fills our field(s) of the same
    meaning. ``bits`` sets both ``visual_w_bits`` and ``llm_w_bits``, except one passed explicitly (so
    ``bits=4, visual_w_bits=8`` is a 4-bit LLM with an 8-bit vision part); any other alias given together
    with its field must agree with it. GPTQConfig options without a counterpart are refused with a hint."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args: Any, **kwargs: Any) -> None:
        given = {**signature.bind_partial(self, *args).arguments, **kwargs}
        used: dict[str, str] = {}  # our field -> "alias=value", for error messages
        for alias, fields in GPTQ_ALIASES.items():
            if alias not in kwargs:
                continue
            value = kwargs.pop(alias)
            if len(fields) > 1 and all(f in given for f in fields) and value not in [given[f] for f in fields]:
                raise ValueError(f"VLMGPTQConfig got {alias}={value!r} (GPTQConfig's name for {' and '.join(fields)}) "
                                 f"and {', '.join(f'{f}={given[f]!r}' for f in fields)}; pass one or the other.")
            for field in fields:
                if field not in given:
                    kwargs[field] = value
                    used[field] = f"{alias}={value!r}"
                elif len(fields) == 1 and given[field] != value:
                    raise ValueError(f"VLMGPTQConfig got {alias}={value!r} (GPTQConfig's name for {field}) and "
                                     f"{field}={given[field]!r}; pass one of them.")
        refused = sorted(set(kwargs) & set(GPTQ_WITHOUT_COUNTERPART))
        if refused:
            raise ValueError("VLMGPTQConfig has no counterpart of GPTQConfig's " + "; ".join(
                f"{name} ({GPTQ_WITHOUT_COUNTERPART[name]})" for name in refused) + ".")
        try:
            init(self, *args, **kwargs)
        except ValueError as err:
            field = next((f for f in used if f"VLMGPTQConfig.{f} " in str(err)), None)
            if field is None:
                raise
            raise ValueError(f"{err} (set by GPTQConfig's name {used[field]})") from None

    return wrapper


class VLMGPTQConfig(QuantizationConfigMixin):
    """Options for GPTQ / RTN quantization of a whole vision-language model.

    Parts (each behind its flag): the vision encoder with its conv patch embedding (`quant_visual_clip`),
    the bridge to the language model — Qwen2-VL's `visual.merger` (`quant_cross_attention`) or
    VideoLLaMA3's projector (`quant_visual_projector`) — and the language model (`quant_llm`).

    Args:
        quant_visual_clip: quantize the vision encoder and its patch embedding.
        quant_cross_attention: quantize Qwen2-VL's `visual.merger` (ignored on other architectures).
        quant_visual_projector: quantize VideoLLaMA3's projector (ignored on other architectures).
        quant_llm: quantize the language model's decoder layers.
        visual_w_rtn / llm_w_rtn: round-to-nearest instead of GPTQ for the vision parts / the LLM.
        visual_w_bits / llm_w_bits: weight bits, one of 2, 3, 4, 8.
        w_groupsize: input columns per quantization group; -1 means one group per output channel.
        percdamp: GPTQ damping, as a fraction of the mean Hessian diagonal (default 0.1: measured on task
            accuracy, README "Quality"; 0.01 is the GPTQ paper's).
        act_order: solve columns in order of decreasing Hessian diagonal (stored with `g_idx`).
        group_order: group-aware reordering: columns by decreasing Hessian diagonal inside each group, groups
            by their largest diagonal, each group kept contiguous, so `g_idx` stays `col // w_groupsize`
            (vLLM serves it; act_order cannot be exported). Exclusive with act_order.
        sym_full_range: with `sym`, the grid that uses all 2**bits codes (scale = 2 * absmax / (2**bits - 1),
            zero 2**(bits-1); AutoGPTQ's), instead of scale = absmax / (2**(bits-1) - 1), which never uses
            code 0 unless clipping.
        gptaq: GPTAQ asymmetric calibration: fit each layer to the float model's outputs while it sees the
            quantized model's inputs (a float copy of each block runs next to it; within each part, i.e.
            the float inputs of a part's first block are those the quantized earlier parts give it).
        gptaq_alpha: scale of GPTAQ's asymmetry term (0.25, the published default).
        hessian_weighting: per-token weights in the Hessians: "none"; "modality" (each image / video / text
            token weighted by `modality_weights`); "balanced" (each modality present in a part's
            calibration tokens gets the same total weight); "gradient" (each row of a block weighted by
            ``||dL/dy||^2`` of the block's output, from one backward pass of the float model's next-token
            loss per calibration batch, before quantizing; needs the whole model on the calibration device).
        modality_weights: {"image": w, "video": w, "text": w} for hessian_weighting="modality" (missing
            keys are 1.0; weights >= 0).
        visual_w_clip / llm_w_clip: MSE search of the clipping range per row/group.
        visual_split / llm_split: keep input channel 0 of `mlp.fc2` / `mlp.down_proj` in full precision
            and quantize the other channels (the research code's ".L2" modules).
        sym: symmetric grid (zero point 2**(bits-1)); False gives an asymmetric grid.
        dataset: calibration samples (list of dicts, a `datasets.Dataset`, a folder of images);
            None means the built-in synthetic set. Never serialized.
        num_samples: how many calibration samples to use (at most 1024 with the built-in set, which is
            drawn before the model loads).
        max_seq_len: longest calibration sequence in tokens.
        processor: the processor object to turn samples into model inputs (it needs `apply_chat_template`,
            e.g. `AutoProcessor.from_pretrained(path)`); None loads the model's own.
        block_size: GPTQ lazy-update block width.
        true_sequential: solve the groups of a block one after the other, each on the outputs of the
            already quantized groups before it (False: all groups of a block see float inputs).
        calibration_device: device that runs one block at a time ("cuda", "cuda:1", "cpu"); it must exist
            on this machine. None picks CUDA when present, else the model's device.
        calibration_offload: run the calibration forward passes on `calibration_device` one module at a
            time, leaving the weights where they are (for models larger than the GPU); None does so when
            the weights are on another device than `calibration_device`.
        modules_to_not_convert: a list of module paths (or path prefixes, "model.visual" keeps every module
            under it) to keep in full precision. A single string is an error (pass a one-item list);
            prefixes that match no module of the model get a warning naming them when quantizing starts.
        seed: seed of the built-in calibration set (an int >= 0).
    """

    @_accept_gptq_names
    def __init__(
        self,
        quant_visual_clip: bool = True,
        quant_cross_attention: bool = True,
        quant_visual_projector: bool = True,
        quant_llm: bool = True,
        visual_w_rtn: bool = False,
        llm_w_rtn: bool = False,
        visual_w_bits: int = 4,
        llm_w_bits: int = 4,
        w_groupsize: int = 128,
        percdamp: float = 0.1,
        act_order: bool = False,
        group_order: bool = False,
        sym_full_range: bool = True,
        gptaq: bool = True,
        gptaq_alpha: float = 0.25,
        hessian_weighting: str = "none",
        modality_weights: dict[str, float] | None = None,
        visual_w_clip: bool = True,
        llm_w_clip: bool = True,
        visual_split: bool = False,
        llm_split: bool = False,
        sym: bool = True,
        dataset: Any = None,
        num_samples: int = 128,
        max_seq_len: int = 2048,
        processor: Any = None,
        block_size: int = 128,
        true_sequential: bool = True,
        calibration_device: str | None = None,
        calibration_offload: bool | None = None,
        modules_to_not_convert: list[str] | None = None,
        seed: int = 0,
        modules: dict[str, dict[str, Any]] | None = None,
        stats: dict[str, dict[str, Any]] | None = None,
        format_version: int = FORMAT_VERSION,
        checkpoint_format: str = "gptq",
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.quant_visual_clip = quant_visual_clip
        self.quant_cross_attention = quant_cross_attention
        self.quant_visual_projector = quant_visual_projector
        self.quant_llm = quant_llm
        self.visual_w_rtn = visual_w_rtn
        self.llm_w_rtn = llm_w_rtn
        self.visual_w_bits = visual_w_bits
        self.llm_w_bits = llm_w_bits
        self.w_groupsize = w_groupsize
        self.percdamp = percdamp
        self.act_order = act_order
        self.group_order = group_order
        self.sym_full_range = sym_full_range
        self.gptaq = gptaq
        self.gptaq_alpha = gptaq_alpha
        self.hessian_weighting = hessian_weighting
        self.modality_weights = dict(modality_weights) if isinstance(modality_weights, dict) else modality_weights
        self.visual_w_clip = visual_w_clip
        self.llm_w_clip = llm_w_clip
        self.visual_split = visual_split
        self.llm_split = llm_split
        self.sym = sym
        self.dataset = dataset
        self.num_samples = num_samples
        self.max_seq_len = max_seq_len
        self.processor = processor
        self.block_size = block_size
        self.true_sequential = true_sequential
        self.calibration_device = str(calibration_device) if isinstance(calibration_device, torch.device) \
            else calibration_device
        self.calibration_offload = calibration_offload
        # a string stays a string here, so that post_init refuses it (list("abc") would be 3 prefixes)
        self.modules_to_not_convert = ([] if modules_to_not_convert is None else list(modules_to_not_convert)
                                       if isinstance(modules_to_not_convert, (list, tuple)) else modules_to_not_convert)
        self.seed = int(seed) if isinstance(seed, numbers.Integral) and not isinstance(seed, bool) else seed
        # Filled by quantization; read back by the loader.
        self.modules = dict(modules or {})
        self.stats = dict(stats or {})
        self.format_version = format_version
        self.checkpoint_format = checkpoint_format
        kwargs.pop("quant_method", None)
        if kwargs:
            raise ValueError(
                f"VLMGPTQConfig got unknown option(s) {sorted(kwargs)}; "
                "see help(hf_vlm_gptq.VLMGPTQConfig) for the accepted fields (GPTQConfig's bits, group_size, "
                "desc_act, damp_percent, model_seqlen and format are accepted too)."
            )
        self.post_init()

    def post_init(self) -> None:
        """Check every field; raise ValueError naming the field, the bad value and what to pass instead."""
        for name in _BOOL_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"VLMGPTQConfig.{name} must be True or False, got {value!r}.")
        for name in ("visual_w_bits", "llm_w_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value not in SUPPORTED_BITS:
                raise ValueError(f"VLMGPTQConfig.{name} must be one of {SUPPORTED_BITS}, got {value!r}.")
        gs = self.w_groupsize
        if isinstance(gs, bool) or not isinstance(gs, int) or (gs <= 0 and gs != -1):
            raise ValueError(
                f"VLMGPTQConfig.w_groupsize must be a positive int or -1 (per output channel), got {gs!r}."
            )
        pd = self.percdamp
        if isinstance(pd, bool) or not isinstance(pd, (int, float)) or not 0 <= pd < 1:
            raise ValueError(f"VLMGPTQConfig.percdamp must be a number in [0, 1), got {pd!r}; 0.1 is the default.")
        self._check_gptq_options()
        for name, low in (("num_samples", 1), ("max_seq_len", 16), ("block_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"VLMGPTQConfig.{name} must be an int >= {low}, got {value!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"VLMGPTQConfig.seed must be an int >= 0, got {self.seed!r}.")
        self._check_calibration_device()
        if self.calibration_offload is not None and not isinstance(self.calibration_offload, bool):
            raise ValueError(f"VLMGPTQConfig.calibration_offload must be True, False or None (automatic), "
                             f"got {self.calibration_offload!r}.")
        self._check_modules_to_not_convert()
        if self.processor is not None and not callable(getattr(self.processor, "apply_chat_template", None)):
            hint = (" (a path or Hub name: pass AutoProcessor.from_pretrained(...) instead)"
                    if isinstance(self.processor, str) else "")
            raise ValueError(
                "VLMGPTQConfig.processor must be None (the model's own processor) or a processor object with "
                f"apply_chat_template, got {type(self.processor).__name__} {self.processor!r}{hint}."
            )
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"This checkpoint's quantization_config has format_version {self.format_version!r}; this "
                f"hf_vlm_gptq reads format_version {FORMAT_VERSION}. Install the hf_vlm_gptq release that wrote it."
            )
        if self.checkpoint_format != "gptq":
            raise ValueError(
                f"VLMGPTQConfig.checkpoint_format must be 'gptq', got {self.checkpoint_format!r}."
            )
        if not (self.quant_visual_clip or self.quant_cross_attention or self.quant_visual_projector
                or self.quant_llm):
            raise ValueError(
                "VLMGPTQConfig: every part is switched off (quant_visual_clip, quant_cross_attention, "
                "quant_visual_projector, quant_llm are all False); switch at least one on."
            )

    @property
    def _for_quantization(self) -> bool:
        """True for a config that will quantize (a loaded checkpoint's config lists its modules): checks that
        depend on this machine or on calibration data apply only then."""
        return not self.modules

    def _check_calibration_device(self) -> None:
        value = self.calibration_device
        if value is None:
            return
        field = "VLMGPTQConfig.calibration_device"
        if not isinstance(value, str):
            raise ValueError(f"{field} must be a device string such as 'cuda' or 'cpu', got {value!r}.")
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
        alpha = self.gptaq_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"VLMGPTQConfig.gptaq_alpha must be a finite number >= 0, got {alpha!r}; 0.25 is usual.")
        if self.hessian_weighting not in HESSIAN_WEIGHTINGS:
            raise ValueError(f"VLMGPTQConfig.hessian_weighting must be one of {HESSIAN_WEIGHTINGS}, "
                             f"got {self.hessian_weighting!r}.")
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
    def part_options(self, part: str) -> dict[str, Any]:
        """Bits, RTN switch, clip and split for a part kind: "visual" (encoder and bridge) or "llm"."""
        if part not in ("visual", "llm"):
            raise ValueError(f"part must be 'visual' or 'llm', got {part!r}")
        return {
            "bits": getattr(self, f"{part}_w_bits"),
            "rtn": getattr(self, f"{part}_w_rtn"),
            "clip": getattr(self, f"{part}_w_clip"),
            "split": getattr(self, f"{part}_split"),
        }

    # --- serialization --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON-able options, quantized-module list and stats; never calibration data."""
        out = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k not in _RUNTIME_FIELDS}
        # GPTQ-style summary keys that other readers look for.
        out["bits"] = self.llm_w_bits
        out["group_size"] = self.w_groupsize
        out["desc_act"] = self.act_order
        return out

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Rebuild from `config.json`'s `quantization_config` (summary keys are derived, so dropped)."""
        clean = {k: v for k, v in config_dict.items() if k not in ("bits", "group_size", "desc_act")}
        return super().from_dict(clean, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def __iter__(self):
        yield from self.to_dict().items()

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

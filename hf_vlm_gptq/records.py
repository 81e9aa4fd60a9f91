"""`ModuleRecord`: the typed record of one quantized module, as `quantization_config.modules` stores it.

The checkpoint's config maps each quantized module path to a JSON object (kind, shapes, bits, group size,
bias, conv geometry). Loading, the report and the vLLM export all read it through this one type:
`ModuleRecord.from_dict(path, d)` checks every field and raises ValueError naming the module and the
field, so a corrupt or hand-edited config fails by name instead of with a KeyError deep inside loading.
`to_dict()` writes the same JSON layout older checkpoints have (no key was added or renamed).

The record also says which tensors a checkpoint must hold for the module (`tensors`): the packed buffers
(`PACKED_BUFFERS`), the bias when it has one, and a split layer's full-precision `L1.weight`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .ops.grid import num_groups
from .ops.packing import PACKED_BUFFERS, packed_rows

__all__ = ["KINDS", "PACKED_BUFFERS", "PACKED_DTYPES", "ModuleRecord", "parse_records"]

KINDS = ("linear", "conv", "split_linear")
CONV_KINDS = {"conv2d": 2, "conv3d": 3}
SUPPORTED_BITS = (2, 3, 4, 8)
PACKED_DTYPES = {"qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16, "g_idx": torch.int32}
"""The dtype every packed buffer is stored in."""

_WHERE = "quantization_config.modules"


@dataclass(frozen=True)
class ModuleRecord:
    """One quantized module. Widths are the module's own: `in_features` of a split layer counts input
    channel 0 (kept in full precision); a conv has `in_channels` / `out_channels` and its geometry."""

    kind: str  # "linear" | "conv" | "split_linear"
    bits: int
    group_size: int  # -1: one group per output row
    bias: bool
    in_features: int | None = None  # linear, split_linear
    out_features: int | None = None
    conv_kind: str | None = None  # conv: "conv2d" | "conv3d"
    in_channels: int | None = None
    out_channels: int | None = None
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: str | tuple[int, ...] = ()  # "valid" / "same" stay strings (VideoLLaMA3's stem)

    # --- the packed weight ------------------------------------------------------------------------
    @property
    def packed_in_features(self) -> int:
        """Input width of the packed weight: a conv's flattened `in * prod(kernel)`, a split layer's `in - 1`."""
        if self.kind == "conv":
            return self.in_channels * math.prod(self.kernel_size)
        return self.in_features - (1 if self.kind == "split_linear" else 0)

    @property
    def packed_out_features(self) -> int:
        return self.out_channels if self.kind == "conv" else self.out_features

    @property
    def n_groups(self) -> int:
        return num_groups(self.packed_in_features, self.group_size)

    def packed_prefix(self, path: str) -> str:
        """Where the packed buffers live: the module itself, or a split layer's `.L2`."""
        return f"{path}.L2" if self.kind == "split_linear" else path

    def tensors(self, path: str) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
        """Every tensor the checkpoint must hold for this module: full name -> (shape, dtype); dtype None
        means "any floating dtype" (bias and `L1.weight` follow the model's dtype)."""
        fin, fout, prefix = self.packed_in_features, self.packed_out_features, self.packed_prefix(path)
        shapes = {"qweight": (packed_rows(fin, self.bits), fout), "qzeros": (self.n_groups, packed_rows(fout, self.bits)),
                  "scales": (self.n_groups, fout), "g_idx": (fin,)}
        out: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {
            f"{prefix}.{name}": (shapes[name], PACKED_DTYPES[name]) for name in PACKED_BUFFERS}
        if self.bias:
            out[f"{prefix}.bias"] = ((fout,), None)
        if self.kind == "split_linear":
            out[f"{path}.L1.weight"] = ((fout, 1), None)
        return out

    # --- JSON -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON object stored in `quantization_config.modules` (the layout every version wrote)."""
        common = {"bits": self.bits, "group_size": self.group_size, "bias": self.bias}
        if self.kind == "conv":
            padding = self.padding if isinstance(self.padding, str) else list(self.padding)
            return {"kind": "conv", "conv_kind": self.conv_kind, "in_channels": self.in_channels,
                    "out_channels": self.out_channels, "kernel_size": list(self.kernel_size),
                    "stride": list(self.stride), "padding": padding, **common}
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features, **common}

    @classmethod
    def from_dict(cls, path: str, d: Any) -> ModuleRecord:
        """Read and check one record; ValueError names the module path and the field."""
        if isinstance(d, ModuleRecord):
            return d
        if not isinstance(d, Mapping):
            raise ValueError(f"{_WHERE}[{path!r}] must be a JSON object (kind, bits, group_size, ...), got "
                             f"{type(d).__name__} {d!r}; the checkpoint's config.json is corrupt or was edited.")
        field = _Fields(path, d)
        kind = field.get("kind")
        if kind not in KINDS:
            raise field.bad("kind", f"must be one of {list(KINDS)}")
        bits = field.int("bits")
        if bits not in SUPPORTED_BITS:
            raise field.bad("bits", f"must be one of {list(SUPPORTED_BITS)}")
        group = field.int("group_size", low=-1)
        if group == 0:
            raise field.bad("group_size", "must be a positive int or -1")
        bias = field.get("bias")
        if not isinstance(bias, bool):
            raise field.bad("bias", "must be true or false")
        if kind != "conv":
            fin = field.int("in_features", low=2 if kind == "split_linear" else 1)
            return cls(kind, bits, group, bias, in_features=fin, out_features=field.int("out_features"))
        conv_kind = field.get("conv_kind")
        if conv_kind not in CONV_KINDS:
            raise field.bad("conv_kind", f"must be one of {sorted(CONV_KINDS)}")
        dims = CONV_KINDS[conv_kind]
        padding = field.get("padding")
        if not (isinstance(padding, str) and padding in ("valid", "same")):
            padding = field.ints("padding", dims, low=0)
        return cls(kind, bits, group, bias, conv_kind=conv_kind, in_channels=field.int("in_channels"),
                   out_channels=field.int("out_channels"), kernel_size=field.ints("kernel_size", dims),
                   stride=field.ints("stride", dims), padding=padding)

    @classmethod
    def from_module(cls, module) -> ModuleRecord:
        """The record of a packed module (QuantLinear, QuantConv or SplitLinear) to store in the config."""
        from .modules_swap import SplitLinear
        from .ops import QuantConv, QuantLinear

        if isinstance(module, SplitLinear):
            inner = cls.from_module(module.L2)
            return cls("split_linear", inner.bits, inner.group_size, inner.bias, in_features=module.in_features,
                       out_features=module.out_features)
        if not isinstance(module, (QuantConv, QuantLinear)):
            raise TypeError(f"no module record for a {type(module).__name__}")
        common = {"bits": module.bits, "group_size": module.group_size, "bias": module.bias is not None}
        if isinstance(module, QuantConv):
            padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
            return cls("conv", conv_kind=module.conv_kind, in_channels=module.in_channels,
                       out_channels=module.out_channels, kernel_size=tuple(module.kernel_size),
                       stride=tuple(module.stride), padding=padding, **common)
        return cls("linear", in_features=module.in_features, out_features=module.out_features, **common)


def parse_records(modules: Any) -> dict[str, ModuleRecord]:
    """`quantization_config.modules` (path -> JSON object, or already records) as checked records."""
    if not isinstance(modules, Mapping):
        raise ValueError(f"{_WHERE} must map module paths to records, got {type(modules).__name__}; the "
                         "checkpoint's config.json is corrupt or was edited.")
    return {path: ModuleRecord.from_dict(path, d) for path, d in modules.items()}


class _Fields:
    """Field access for one record with errors that name the module and the field."""

    def __init__(self, path: str, d: Mapping) -> None:
        self.path, self.d = path, d

    def bad(self, name: str, rule: str) -> ValueError:
        got = f"got {self.d[name]!r}" if name in self.d else "it is missing"
        return ValueError(f"{_WHERE}[{self.path!r}]: field {name!r} {rule}, {got}; the checkpoint's config.json "
                          "is corrupt or was edited. Re-save the quantized model.")

    def get(self, name: str) -> Any:
        if name not in self.d:
            raise self.bad(name, "is required")
        return self.d[name]

    def int(self, name: str, low: int = 1) -> int:
        value = self.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise self.bad(name, f"must be an int >= {low}")
        return value

    def ints(self, name: str, n: int, low: int = 1) -> tuple[int, ...]:
        value = self.get(name)
        if (not isinstance(value, (list, tuple)) or len(value) != n
                or any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in value)):
            raise self.bad(name, f"must be a list of {n} ints >= {low}")
        return tuple(value)

"""Swapping float modules for packed ones, describing them for the checkpoint, and rebuilding them on load.

The checkpoint's `quantization_config.modules` maps each quantized module path to an entry: its kind
("linear", "conv", "split_linear"), shapes, bits and group size. The loader rebuilds exactly those modules
on the meta device before transformers fills their buffers from safetensors, then `verify_loaded` checks
that every packed tensor was really read and is sane, so a broken checkpoint fails by name instead of
running on random weights.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .ops import QuantConv, QuantLinear, QuantResult

PACKED_BUFFERS = ("qweight", "qzeros", "scales", "g_idx")


class SplitLinear(nn.Module):
    """The research code's ".L2" split: input channel 0 in full precision (L1), the rest packed (L2).

    y = L1(x[..., :1]) + L2(x[..., 1:]); the bias, if any, lives in L2.
    """

    def __init__(self, l1: nn.Linear, l2: QuantLinear) -> None:
        super().__init__()
        self.L1 = l1
        self.L2 = l2
        self.in_features = l1.in_features + l2.in_features
        self.out_features = l2.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.L1(x[..., :1]) + self.L2(x[..., 1:])


def set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at dotted `path` (relative to `root`) with `new`."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def make_quant_module(module: nn.Module, result: QuantResult) -> nn.Module:
    """The packed twin of a float Linear / Conv2d / Conv3d from its solve result."""
    if isinstance(module, nn.Linear):
        q = QuantLinear.from_result(result, bias=module.bias, dtype=module.weight.dtype)
    elif isinstance(module, (nn.Conv2d, nn.Conv3d)):
        q = QuantConv.from_result(result, module)
    else:
        raise TypeError(f"cannot quantize a {type(module).__name__}; expected nn.Linear, nn.Conv2d or nn.Conv3d")
    return q.to(module.weight.device)


def build_split_linear(module: nn.Linear, result: QuantResult) -> SplitLinear:
    """Split a Linear: channel 0 kept as a float L1, channels 1: packed from `result` as L2."""
    weight = module.weight.detach()
    l1 = nn.Linear(1, module.out_features, bias=False, device=weight.device, dtype=weight.dtype)
    l1.weight.data.copy_(weight[:, :1])
    l2 = QuantLinear.from_result(result, bias=module.bias, dtype=weight.dtype).to(weight.device)
    return SplitLinear(l1, l2)


def module_entry(module: nn.Module) -> dict[str, Any]:
    """The JSON entry that lets the loader rebuild `module` (a QuantLinear, QuantConv or SplitLinear)."""
    if isinstance(module, SplitLinear):
        entry = module_entry(module.L2)
        entry.update(kind="split_linear", in_features=module.in_features)
        return entry
    common = {"bits": module.bits, "group_size": module.group_size, "bias": module.bias is not None}
    if isinstance(module, QuantConv):
        return {"kind": "conv", "conv_kind": module.conv_kind, "in_channels": module.in_channels,
                "out_channels": module.out_channels, "kernel_size": list(module.kernel_size),
                "stride": list(module.stride), "padding": _padding_entry(module.padding), **common}
    if isinstance(module, QuantLinear):
        return {"kind": "linear", "in_features": module.in_features, "out_features": module.out_features,
                **common}
    raise TypeError(f"no checkpoint entry for a {type(module).__name__}")


def _padding_entry(padding: Any, kind: type = list) -> Any:
    """Conv padding as stored: "valid" / "same" stay strings (VideoLLaMA3's stem), numbers become a list."""
    return padding if isinstance(padding, str) else kind(padding)


def build_from_entry(entry: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """An empty packed module shaped as `entry` says (buffers are filled by the loader)."""
    kind = entry.get("kind")
    bits, group, bias = entry["bits"], entry["group_size"], entry["bias"]
    if kind == "linear":
        return QuantLinear(entry["in_features"], entry["out_features"], bits, group, bias=bias, dtype=dtype)
    if kind == "conv":
        return QuantConv(entry["conv_kind"], entry["in_channels"], entry["out_channels"],
                         tuple(entry["kernel_size"]), tuple(entry["stride"]), _padding_entry(entry["padding"], tuple),
                         bits, group, bias=bias, dtype=dtype)
    if kind == "split_linear":
        l1 = nn.Linear(1, entry["out_features"], bias=False, dtype=dtype)
        l2 = QuantLinear(entry["in_features"] - 1, entry["out_features"], bits, group, bias=bias, dtype=dtype)
        return SplitLinear(l1, l2)
    raise ValueError(f"unknown quantized module kind {kind!r} in quantization_config.modules")


def replace_with_quant_modules(model: nn.Module, modules: dict[str, dict[str, Any]], dtype: torch.dtype) -> None:
    """Swap every module listed in `modules` for its empty packed twin (run on the meta device)."""
    for path, entry in modules.items():
        try:
            model.get_submodule(path)
        except AttributeError:
            raise ValueError(
                f"quantization_config.modules lists {path!r}, which this model does not have; the checkpoint "
                "was written for another architecture or the transformers layout changed."
            ) from None
        with torch.device("meta"):
            new = build_from_entry(entry, dtype)
        set_submodule(model, path, new)


def _packed_parts(module: nn.Module, path: str) -> list[tuple[str, QuantLinear | QuantConv]]:
    if isinstance(module, SplitLinear):
        return [(f"{path}.L2", module.L2)]
    return [(path, module)]


def _packed_tensors(module: nn.Module, path: str) -> dict[str, torch.Tensor]:
    """Full name -> (meta) tensor of every packed buffer of a rebuilt module."""
    return {f"{part_path}.{name}": getattr(part, name)
            for part_path, part in _packed_parts(module, path) for name in PACKED_BUFFERS}


def check_checkpoint_files(model: nn.Module, modules: dict[str, dict[str, Any]], checkpoint_files: list[str],
                           checkpoint_names) -> None:
    """Before loading: every packed tensor the config lists is in the files with the right shape and dtype.

    `checkpoint_names(name)` gives the keys a tensor may be saved under (transformers' legacy layouts).
    Only safetensors headers are read, so this costs milliseconds and fails before any weight is loaded.
    """
    from safetensors import safe_open

    found: dict[str, tuple[list[int], str]] = {}
    for file in checkpoint_files or []:
        if not str(file).endswith(".safetensors"):
            return  # pickle checkpoints: left to the post-load verification
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key.rpartition(".")[2] in PACKED_BUFFERS:
                    sl = handle.get_slice(key)
                    found[key] = (list(sl.get_shape()), sl.get_dtype())
    expected_dtype = {"qweight": "I32", "qzeros": "I32", "g_idx": "I32"}
    for path in modules:
        for name, tensor in _packed_tensors(model.get_submodule(path), path).items():
            key = next((k for k in checkpoint_names(name) if k in found), None)
            if key is None:
                raise ValueError(
                    f"checkpoint is missing the quantized tensor {name!r} (looked for "
                    f"{checkpoint_names(name)}); the files are incomplete. Re-save the quantized model."
                )
            shape, dtype = found[key]
            if shape != list(tensor.shape):
                raise ValueError(
                    f"quantized tensor {key!r} has shape {shape} in the checkpoint but the config's module "
                    f"entry needs {list(tensor.shape)}; the checkpoint is corrupt or its config was edited."
                )
            want = expected_dtype.get(name.rpartition(".")[2])
            if want is not None and dtype != want:
                raise ValueError(f"quantized tensor {key!r} is stored as {dtype}, expected int32 ({want}).")


def check_packed(module: QuantLinear | QuantConv, path: str) -> None:
    """Sanity of loaded packed tensors: g_idx names existing groups, scales are finite."""
    groups = module.scales.shape[0]
    g_idx = module.g_idx
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise ValueError(
            f"corrupt quantized tensor '{path}.g_idx': group indices must lie in [0, {groups}), found "
            f"[{int(g_idx.min())}, {int(g_idx.max())}]. Re-save the quantized model."
        )
    if not torch.isfinite(module.scales).all():
        raise ValueError(f"corrupt quantized tensor '{path}.scales': it holds NaN or inf values.")


def verify_loaded(model: nn.Module, modules: dict[str, dict[str, Any]]) -> None:
    """Fail, naming the tensor, when a packed tensor was not read from the checkpoint or is corrupt."""
    for path, _entry in modules.items():
        module = model.get_submodule(path)
        for part_path, part in _packed_parts(module, path):
            for name in PACKED_BUFFERS:
                tensor = getattr(part, name)
                full = f"{part_path}.{name}"
                if tensor.device.type == "meta" or not getattr(tensor, "_is_hf_initialized", False):
                    raise ValueError(
                        f"checkpoint is missing the quantized tensor {full!r}; the files are incomplete or "
                        "were not written by hf_vlm_gptq. Re-save the quantized model."
                    )
            check_packed(part, part_path)
        if isinstance(module, SplitLinear) and not getattr(module.L1.weight, "_is_hf_initialized", False):
            raise ValueError(f"checkpoint is missing the full-precision tensor '{path}.L1.weight'.")

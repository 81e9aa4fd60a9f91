"""Swapping float modules for packed ones, describing them for the checkpoint, and rebuilding them on load.

The checkpoint's `quantization_config.modules` maps each quantized module path to a record
(`records.ModuleRecord`: kind "linear" / "conv" / "split_linear", shapes, bits, group size, bias). The loader
rebuilds exactly those modules on the meta device before transformers fills their buffers from safetensors,
having checked the safetensors headers (`check_checkpoint_files`); then `verify_loaded` checks that every
tensor a record implies was really read and is sane, so a broken checkpoint fails by name instead of running
on random weights. The guard tensor (`GUARD_TEXT`) makes plain transformers refuse a packed checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .ops import QuantConv, QuantLinear, QuantResult
from .records import PACKED_BUFFERS, ModuleRecord


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


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight a packed Linear (or a split one) computes with."""
    if isinstance(module, SplitLinear):
        return torch.cat([module.L1.weight.detach(), module.L2.dequantize_weight()], dim=1)
    if isinstance(module, QuantLinear):
        return module.dequantize_weight()
    raise TypeError(f"no dense weight for a {type(module).__name__}")


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
    return ModuleRecord.from_module(module).to_dict()


def build_from_record(record: ModuleRecord, dtype: torch.dtype) -> nn.Module:
    """An empty packed module shaped as `record` says (buffers are filled by the loader)."""
    r = record
    if r.kind == "linear":
        return QuantLinear(r.in_features, r.out_features, r.bits, r.group_size, bias=r.bias, dtype=dtype)
    if r.kind == "conv":
        return QuantConv(r.conv_kind, r.in_channels, r.out_channels, r.kernel_size, r.stride, r.padding,
                         r.bits, r.group_size, bias=r.bias, dtype=dtype)
    l1 = nn.Linear(1, r.out_features, bias=False, dtype=dtype)
    l2 = QuantLinear(r.in_features - 1, r.out_features, r.bits, r.group_size, bias=r.bias, dtype=dtype)
    return SplitLinear(l1, l2)


def replace_with_quant_modules(model: nn.Module, records: dict[str, ModuleRecord], dtype: torch.dtype) -> None:
    """Swap every module listed in `records` for its empty packed twin (run on the meta device)."""
    for path, record in records.items():
        try:
            model.get_submodule(path)
        except AttributeError:
            raise ValueError(
                f"quantization_config.modules lists {path!r}, which this model does not have; the checkpoint "
                "was written for another architecture or the transformers layout changed."
            ) from None
        with torch.device("meta"):
            new = build_from_record(record, dtype)
        set_submodule(model, path, new)


# --- the guard tensor: plain transformers must refuse a packed checkpoint --------------------------------
GUARD_TEXT = ("hf_vlm_gptq packed checkpoint: `import hf_vlm_gptq` before from_pretrained; without it "
              "transformers would run the quantized layers on random weights")
"""Stored as uint8 bytes under `<guard module>.weight`. Without the plugin that key names the float weight of
an nn.Linear, and its shape [len(GUARD_TEXT)] never matches, so transformers stops with a size-mismatch
error (unless the caller passes ignore_mismatched_sizes=True). With the plugin the module is packed and
the key is an ignored extra."""


def guard_module(records: dict[str, ModuleRecord]) -> str | None:
    """The module whose `weight` key holds the guard: the last packed Linear by path (None: no module)."""
    linear = sorted(p for p, r in records.items() if r.kind == "linear")
    return linear[-1] if linear else max(records, default=None)


def guard_tensor() -> torch.Tensor:
    return torch.tensor(list(GUARD_TEXT.encode()), dtype=torch.uint8)


# --- checks around loading ---------------------------------------------------------------------------
def _checkpoint_dtype(dtype: torch.dtype | None) -> tuple[str, ...]:
    """safetensors dtype names accepted for an expected torch dtype (None: any floating dtype)."""
    if dtype is None:
        return ("F16", "BF16", "F32", "F64")
    return {torch.int32: ("I32",), torch.float16: ("F16",)}[dtype]


_SAFETENSORS_DTYPES = {torch.int32: "I32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
                       torch.float64: "F64"}


def _tensor_headers(files: list[str]) -> dict[str, tuple[list[int], str]]:
    """key -> (shape, safetensors dtype name) of every tensor in the checkpoint files, without reading data
    (safetensors: its header; a pickle `.bin`: memory-mapped, only the tensors' metadata looked at)."""
    from safetensors import safe_open

    found: dict[str, tuple[list[int], str]] = {}
    for file in files:
        if str(file).endswith(".safetensors"):
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    sl = handle.get_slice(key)
                    found[key] = (list(sl.get_shape()), sl.get_dtype())
            continue
        try:
            state = torch.load(str(file), map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # a legacy (pre-zip) pickle cannot be memory-mapped: read it whole
            state = torch.load(str(file), map_location="cpu", weights_only=True)
        for key, tensor in state.items():
            if isinstance(tensor, torch.Tensor):
                found[key] = (list(tensor.shape), _SAFETENSORS_DTYPES.get(tensor.dtype, str(tensor.dtype)))
    return found


def check_checkpoint_files(records: dict[str, ModuleRecord], checkpoint_files: list[str] | None,
                           checkpoint_names) -> None:
    """Before loading: the files hold every tensor each record implies (packed buffers, bias, split L1) with
    the right shape and dtype, and no packed tensors of a module the records do not list.

    `checkpoint_names(name)` gives the keys a tensor may be saved under (transformers' legacy layouts).
    Only headers are read (safetensors headers; a pickle file memory-mapped, no tensor data touched), so
    this costs milliseconds and fails before any weight is loaded.
    """
    found = _tensor_headers(checkpoint_files or [])
    claimed: set[str] = set()
    for path, record in records.items():
        for name, (shape, dtype) in record.tensors(path).items():
            names = checkpoint_names(name)
            claimed.update(names)
            key = next((k for k in names if k in found), None)
            if key is None:
                raise ValueError(
                    f"checkpoint is missing the tensor {name!r} of quantized module {path!r} (looked for "
                    f"{names}); the files are incomplete. Re-save the quantized model."
                )
            got_shape, got_dtype = found[key]
            if got_shape != list(shape):
                raise ValueError(
                    f"tensor {key!r} has shape {got_shape} in the checkpoint but the config's module record "
                    f"needs {list(shape)}; the checkpoint is corrupt or its config was edited."
                )
            if got_dtype not in _checkpoint_dtype(dtype):
                want = "a floating dtype" if dtype is None else str(dtype).removeprefix("torch.")
                raise ValueError(f"tensor {key!r} is stored as {got_dtype}, expected {want}; the checkpoint is "
                                 "corrupt or was not written by hf_vlm_gptq.")
    leftover = sorted({k.rpartition(".")[0] for k in found
                       if k.rpartition(".")[2] in PACKED_BUFFERS and k not in claimed})
    if leftover:
        shown = ", ".join(repr(p) for p in leftover[:5]) + (f" and {len(leftover) - 5} more" if len(leftover) > 5 else "")
        raise ValueError(
            f"checkpoint holds packed tensors ({'/'.join(PACKED_BUFFERS)}) for module(s) {shown} that "
            "quantization_config.modules does not list; they would be built as float layers on random "
            "weights. The config.json does not belong to these weights or was edited."
        )


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


def verify_loaded(model: nn.Module, records: dict[str, ModuleRecord]) -> None:
    """Fail, naming the tensor, when a tensor a record implies was not read from the checkpoint (bias and
    a split layer's L1 included), has the wrong shape or dtype, or holds corrupt values."""
    for path, record in records.items():
        for name, (shape, dtype) in record.tensors(path).items():
            owner, _, leaf = name.rpartition(".")
            tensor = getattr(model.get_submodule(owner), leaf, None)
            if (tensor is None or tensor.device.type == "meta"
                    or not getattr(tensor, "_is_hf_initialized", False)):
                raise ValueError(
                    f"checkpoint is missing the tensor {name!r} of quantized module {path!r}; the files are "
                    "incomplete or were not written by hf_vlm_gptq. Re-save the quantized model."
                )
            bad_dtype = tensor.dtype != dtype if dtype is not None else not tensor.dtype.is_floating_point
            if tuple(tensor.shape) != shape or bad_dtype:
                raise ValueError(f"tensor {name!r} was loaded as {tensor.dtype} {list(tensor.shape)}, expected "
                                 f"{dtype or 'floating'} {list(shape)}; the checkpoint is corrupt.")
        prefix = record.packed_prefix(path)
        check_packed(model.get_submodule(prefix), prefix)

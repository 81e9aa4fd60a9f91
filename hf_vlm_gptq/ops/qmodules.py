"""``QuantLinear`` / ``QuantConv``: modules holding a GPTQ-packed weight (see ``packing.py`` for the layout).

The buffers ``qweight``, ``qzeros``, ``scales``, ``g_idx`` (and ``bias``) carry the checkpoint names and
shapes, so transformers can fill them from safetensors on a module built on the meta device.

Derived data is built lazily and cached per module, keyed on the buffers' identity and version (a reload,
``copy_`` or device move invalidates it):

* int4 kernel weights (+ act-order permutation): built on first use of the kernel path. Cost: one extra
  copy of the 4-bit weight (+ a bf16 scale/zero table), worth it for the batch-1 speed.
* the dequantized weight: cached only when ``cache_dequantized`` is True. Default **off for QuantLinear**:
  keeping a dense copy of every layer would cost more memory than the unquantized model, which defeats the
  point of a 4-bit checkpoint; large batches then pay one dequantization per call. Turn it on (per module
  or with :func:`set_dequant_cache`) when speed at large batches matters more than memory. Default **on for
  QuantConv**: VLM patch embeddings are small, and Qwen2-VL reads ``proj.weight`` on every forward.

Paths (``kernel`` attribute: "auto", "int4" to force the kernel, "dequant" to force the reference): see
``kernels.py``. ``scales`` keeps its dtype (float16) through ``module.to(dtype)`` / ``.half()`` so a saved
model stays in the checkpoint format; the compute dtype (``weight_dtype``) follows such casts.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from .grid import check_bits, check_group_size, num_groups
from .hessian import _pad_input
from .kernels import (
    Int4Weights,
    build_int4,
    dequantize_packed,
    group_permutation,
    int4_matmul,
    int4_max_batch,
    int4_unavailable_reason,
    unpack_codes,
    unpack_zeros,
)
from .packing import pack_gptq, packed_rows
from .result import QuantResult

logger = logging.getLogger(__name__)

KERNEL_MODES = ("auto", "int4", "dequant")
_BUFFERS = ("qweight", "qzeros", "scales", "g_idx")
_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _check_positive_int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {name}={v!r}")
    return v


class _PackedWeight(nn.Module):
    """Shared buffer set, caches and matmul path selection for QuantLinear / QuantConv."""

    cache_dequantized: bool = False

    def _init_packed(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        self.in_features = _check_positive_int("in_features", in_features)
        self.out_features = _check_positive_int("out_features", out_features)
        self.bits = check_bits(bits)
        self.group_size = check_group_size(group_size)
        if not isinstance(bias, bool):
            raise ValueError(f"bias must be a bool, got bias={bias!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got dtype={dtype!r}")
        self.weight_dtype = dtype
        self.kernel = "auto"
        self._cache: dict = {}
        n_groups = num_groups(in_features, group_size)
        cols = torch.arange(in_features, dtype=torch.int32, device=device)
        i32 = {"dtype": torch.int32, "device": device}
        self.register_buffer("qweight", torch.zeros(packed_rows(in_features, bits), out_features, **i32))
        self.register_buffer("qzeros", torch.zeros(n_groups, packed_rows(out_features, bits), **i32))
        self.register_buffer(
            "scales", torch.zeros(n_groups, out_features, dtype=torch.float16, device=device)
        )
        self.register_buffer("g_idx", torch.zeros_like(cols) if group_size == -1 else cols // group_size)
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[0])

    def _load_result(self, result: QuantResult, bias: torch.Tensor | None) -> None:
        if result.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"result shape {result.shape} does not match ({self.out_features}, {self.in_features})"
            )
        for name, tensor in pack_gptq(
            result.codes, result.scales, result.zeros, result.g_idx, result.bits
        ).items():
            getattr(self, name).copy_(tensor)
        if bias is not None:
            if self.bias is None or tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias must be [{self.out_features}], got {tuple(bias.shape)}")
            self.bias.data.copy_(bias.detach())

    # -- caches ---------------------------------------------------------------------------------------
    def _stamp(self) -> tuple:
        return tuple((t.data_ptr(), t._version, t.device) for t in (getattr(self, n) for n in _BUFFERS))

    def _cached(self, key: tuple, build):
        stamp = self._stamp()
        hit = self._cache.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        value = build()
        self._cache[key] = (stamp, value)
        return value

    def clear_cache(self) -> None:
        """Drop derived weights (kernel formats, dequantized copies)."""
        self._cache = {}

    def _apply(self, fn, recurse: bool = True):
        self.clear_cache()
        probe = fn(torch.empty(0, dtype=self.weight_dtype, device=self.qweight.device))
        scales = self._buffers.get("scales")
        keep = scales is not None and scales.is_floating_point() and scales.element_size() in _INT_VIEW
        if keep:  # a bit-cast integer view is moved by fn but never cast
            self._buffers["scales"] = scales.view(_INT_VIEW[scales.element_size()])
        try:
            super()._apply(fn, recurse)
        finally:
            if keep:
                self._buffers["scales"] = self._buffers["scales"].view(scales.dtype)
        if probe.dtype.is_floating_point:
            self.weight_dtype = probe.dtype
        return self

    # -- weights --------------------------------------------------------------------------------------
    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ``[out, in]`` as ``scale * (code - zero)`` in ``dtype`` (default ``weight_dtype``)."""
        dtype = dtype or self.weight_dtype
        if self.qweight.is_meta:
            return torch.empty(self.out_features, self.in_features, dtype=dtype, device="meta")
        if not self.cache_dequantized:
            return self._dequantize(dtype)
        return self._cached(("dense", dtype), lambda: self._dequantize(dtype))

    def _dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_packed(
            self.qweight,
            self.qzeros,
            self.scales,
            self.g_idx,
            bits=self.bits,
            in_features=self.in_features,
            out_features=self.out_features,
            group_size=self.group_size,
            dtype=dtype,
        )

    def _int4(self, x2: torch.Tensor) -> Int4Weights | str:
        """Kernel-format weights for inputs like ``x2``, or why the kernel cannot be used."""
        reason = int4_unavailable_reason(
            self.bits, self.group_size, self.in_features, self.out_features, x2.dtype, x2.device
        )
        if reason is not None:
            return reason
        return self._cached(("int4", x2.device, x2.dtype), lambda: self._build_int4(x2))

    def _build_int4(self, x2: torch.Tensor) -> Int4Weights | str:
        perm, ok = group_permutation(self.g_idx, self.group_size)
        if not ok:
            return "g_idx groups are not equal-sized blocks of group_size columns"
        codes = unpack_codes(self.qweight, self.bits, self.in_features)
        zeros = unpack_zeros(self.qzeros, self.bits, self.out_features)
        w = build_int4(codes, zeros, self.scales, perm, self.group_size, x2.device)
        if x2.device.type != "cpu":  # the CUDA layout is not testable on CPU hosts: verify once per module
            probe = torch.randn(4, self.in_features, dtype=x2.dtype, device=x2.device)
            ref = F.linear(probe, self._dequantize(x2.dtype)).float()
            err = (int4_matmul(probe, w).float() - ref).abs().max()
            if not bool(err <= 0.02 * ref.abs().max() + 1e-3):
                logger.warning("int4 kernel self-check failed (max err %.3g); using dequantize + matmul", err)
                return "int4 kernel self-check failed"
        return w

    def _matmul(self, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x2[M, in] @ W^T + bias`` through the chosen path."""
        if self.kernel not in KERNEL_MODES:
            raise ValueError(f"kernel must be one of {KERNEL_MODES}, got kernel={self.kernel!r}")
        if bias is not None:
            bias = bias.to(x2.dtype)
        if self.kernel != "dequant":
            w = self._int4(x2)
            if isinstance(w, Int4Weights):
                if self.kernel == "int4" or x2.shape[0] <= int4_max_batch(
                    x2.device.type, self.cache_dequantized
                ):
                    y = int4_matmul(x2, w)
                    return y if bias is None else y.add_(bias)
            elif self.kernel == "int4":
                raise ValueError(f"kernel='int4' is unavailable for this layer / input: {w}")
        return F.linear(x2, self.dequantize_weight(x2.dtype), bias)

    def forward_reference(self, x2: torch.Tensor) -> torch.Tensor:
        """Reference ``x2 @ dequantize(W)^T + bias`` in x's dtype (what every path must match)."""
        bias = None if self.bias is None else self.bias.to(x2.dtype)
        return F.linear(x2, self._dequantize(x2.dtype), bias)


class QuantLinear(_PackedWeight):
    """A Linear layer with a GPTQ-packed weight; ``forward`` picks the int4 kernel or dequantize + matmul."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self._init_packed(in_features, out_features, bits, group_size, bias, dtype, device)

    @classmethod
    def from_result(
        cls, result: QuantResult, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float16
    ) -> QuantLinear:
        """Build from a solve; ``bias`` (if any) is copied in ``dtype``."""
        out_f, in_f = result.shape
        module = cls(
            in_f, out_f, result.bits, result.group_size, bias is not None, dtype, result.codes.device
        )
        module._load_result(result, bias)
        return module

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized weight in ``weight_dtype`` (for code that reads ``.weight.dtype`` / ``.device``)."""
        return self.dequantize_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input must end in {self.in_features} features, got shape {tuple(x.shape)}")
        y = self._matmul(x.reshape(-1, self.in_features), self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


def _tuple(v: object, n: int, name: str) -> tuple[int, ...]:
    t = (v,) * n if isinstance(v, int) and not isinstance(v, bool) else v
    if not isinstance(t, (tuple, list)) or len(t) != n or not all(isinstance(i, int) and i >= 0 for i in t):
        raise ValueError(f"{name} must be an int or {n} ints, got {name}={v!r}")
    return tuple(t)


class QuantConv(_PackedWeight):
    """A Conv2d / Conv3d with a GPTQ-packed weight flattened to ``(out, in * prod(kernel))``.

    ``forward``: when stride == kernel, no padding and no dilation (patch embeddings), input patches are
    cut by reshaping and sent through the same matmul paths as QuantLinear; otherwise the weight is
    dequantized and ``F.conv2d`` / ``F.conv3d`` runs. A 2-D input of ready-made patch rows
    ``[N, in * prod(kernel)]`` gives ``[N, out]``.
    """

    cache_dequantized = True

    def __init__(
        self,
        conv_kind: str,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride,
        padding,
        bits: int,
        group_size: int,
        bias: bool,
        dtype: torch.dtype = torch.float16,
        *,
        dilation=1,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if conv_kind not in ("conv2d", "conv3d"):
            raise ValueError(f"conv_kind must be 'conv2d' or 'conv3d', got conv_kind={conv_kind!r}")
        nd = 2 if conv_kind == "conv2d" else 3
        self.conv_kind = conv_kind
        self.in_channels = _check_positive_int("in_channels", in_channels)
        self.out_channels = _check_positive_int("out_channels", out_channels)
        self.kernel_size = _tuple(kernel_size, nd, "kernel_size")
        if min(self.kernel_size) < 1:
            raise ValueError(f"kernel_size must be positive, got kernel_size={kernel_size!r}")
        self.stride = _tuple(stride, nd, "stride")
        if min(self.stride) < 1:
            raise ValueError(f"stride must be positive, got stride={stride!r}")
        self.padding = padding if padding in ("same", "valid") else _tuple(padding, nd, "padding")
        self.dilation = _tuple(dilation, nd, "dilation")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"padding_mode must be zeros/reflect/replicate/circular, got {padding_mode!r}")
        self.padding_mode = padding_mode
        width = in_channels * math.prod(self.kernel_size)
        self._init_packed(width, out_channels, bits, group_size, bias, dtype, device)

    @classmethod
    def from_result(
        cls, result: QuantResult, conv_module: nn.Module, dtype: torch.dtype | None = None
    ) -> QuantConv:
        """Build from a solve of ``conv_module.weight.reshape(out, -1)``; geometry and bias come from the conv."""
        if isinstance(conv_module, nn.Conv3d):
            kind = "conv3d"
        elif isinstance(conv_module, nn.Conv2d):
            kind = "conv2d"
        else:
            raise ValueError(f"conv_module must be a Conv2d or Conv3d, got {type(conv_module).__name__}")
        if conv_module.groups != 1:
            raise ValueError(f"grouped convolutions are not supported, got groups={conv_module.groups}")
        bias = conv_module.bias
        module = cls(
            kind,
            conv_module.in_channels,
            conv_module.out_channels,
            tuple(conv_module.kernel_size),
            tuple(conv_module.stride),
            conv_module.padding if isinstance(conv_module.padding, str) else tuple(conv_module.padding),
            result.bits,
            result.group_size,
            bias is not None,
            dtype or conv_module.weight.dtype,
            dilation=tuple(conv_module.dilation),
            padding_mode=conv_module.padding_mode,
            device=result.codes.device,
        )
        module._load_result(result, None if bias is None else bias.detach())
        return module

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized weight ``[out, in, *kernel]`` in ``weight_dtype``."""
        return self.dequantize_weight().view(self.out_channels, self.in_channels, *self.kernel_size)

    def _is_patchify(self) -> bool:
        no_pad = self.padding == "valid" or (self.padding != "same" and not any(self.padding))
        return self.stride == self.kernel_size and no_pad and all(d == 1 for d in self.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nd = len(self.kernel_size)
        if x.dim() == 2:
            if x.shape[1] != self.in_features:
                raise ValueError(f"2-D input must have {self.in_features} columns, got {tuple(x.shape)}")
            return self._matmul(x, self.bias)
        unbatched = x.dim() == nd + 1
        if unbatched:
            x = x.unsqueeze(0)
        if x.dim() != nd + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"input must be [batch, {self.in_channels}, *{nd} dims], got {tuple(x.shape)}")
        if self._is_patchify():
            y = self._patch_forward(x)
        else:
            w = self.dequantize_weight(x.dtype).view(self.out_channels, self.in_channels, *self.kernel_size)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            conv = F.conv2d if nd == 2 else F.conv3d
            if self.padding_mode != "zeros":
                x = _pad_input(x, self, self.kernel_size, self.dilation)
                y = conv(x, w, bias, self.stride, 0, self.dilation)
            else:
                y = conv(x, w, bias, self.stride, self.padding, self.dilation)
        return y.squeeze(0) if unbatched else y

    def _patch_forward(self, x: torch.Tensor) -> torch.Tensor:
        nd, k = len(self.kernel_size), self.kernel_size
        b, c, *spatial = x.shape
        outs = [s // kk for s, kk in zip(spatial, k)]
        if any(o == 0 for o in outs):
            raise ValueError(f"input spatial size {tuple(spatial)} is smaller than the kernel {k}")
        x = x[(..., *[slice(0, o * kk) for o, kk in zip(outs, k)])]
        split = [b, c] + [v for o, kk in zip(outs, k) for v in (o, kk)]
        perm = [0, *[2 + 2 * i for i in range(nd)], 1, *[3 + 2 * i for i in range(nd)]]
        patches = x.reshape(split).permute(perm).reshape(-1, self.in_features)
        y = self._matmul(patches, self.bias).view(b, *outs, self.out_channels)
        return y.permute(0, nd + 1, *range(1, nd + 1)).contiguous()

    def extra_repr(self) -> str:
        return (
            f"{self.conv_kind}, {self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, bits={self.bits}, group_size={self.group_size}, "
            f"bias={self.bias is not None}"
        )


def set_dequant_cache(module: nn.Module, enabled: bool) -> int:
    """Turn the dequantized-weight cache on / off for every Quant* module under ``module``; returns how many."""
    count = 0
    for m in module.modules():
        if isinstance(m, _PackedWeight):
            m.cache_dequantized = bool(enabled)
            m.clear_cache()
            count += 1
    return count

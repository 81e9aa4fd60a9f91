"""``QuantLinear`` / ``QuantConv``: modules holding a GPTQ-packed weight (see ``packing.py`` for the layout).

The buffers ``qweight``, ``qzeros``, ``scales``, ``g_idx`` (and ``bias``) carry the checkpoint names and
shapes, so transformers can fill them from safetensors on a module built on the meta device.

Derived data is built lazily and cached per module, keyed on the buffers' identity and version (a reload,
``copy_`` or device move invalidates it):

* each kernel backend's weight layout (``backends/``), built the first time that backend serves the module:
  torch's int4 kernels keep one extra copy of the 4-bit weight (+ a bf16 scale/zero table); the fused CPU
  kernel only uint8 zero points (it reads ``qweight`` / ``scales`` as stored); the Triton kernel nothing;
* the dequantized weight: cached only when ``cache_dequantized`` is True. Default **off for QuantLinear**:
  a dense copy of every layer would cost more memory than the unquantized model. Where no fused kernel
  serves a layer (CPUs without AVX512-BF16, bits / dtypes it does not take), large batches then pay one
  dequantization per call; turn the cache on (per module, with :func:`set_dequant_cache`, or for every
  instance with ``QuantLinear.cache_dequantized = True``) when speed at large batches matters more than
  memory. Default **on for QuantConv**: VLM patch embeddings are small, and Qwen2-VL reads ``proj.weight``
  on every forward.

Kernel (``kernel`` attribute): "auto" (the per-device order and batch ranges of ``backends/__init__.py``),
"int4" / "fused" / "triton" to force a kernel (``ValueError`` with the reason where it cannot serve), or
"dequant" to force the reference. ``scales`` keeps its dtype (float16) through ``module.to(dtype)`` /
``.half()`` so a saved model stays in the checkpoint format; the compute dtype (``weight_dtype``) follows
such casts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .backends import KERNEL_MODES
from .conv_rows import pad_conv_input
from .dense import conv_by_patches, is_patch_conv
from .qbase import PackedWeightModule, check_positive_int
from .result import QuantResult

__all__ = ["KERNEL_MODES", "QuantConv", "QuantLinear", "set_dequant_cache"]


class QuantLinear(PackedWeightModule):
    """A Linear layer with a GPTQ-packed weight; ``forward`` runs the kernel backend ``kernel`` selects."""

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

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weight (and the bias) in ``dtype`` (default
        ``weight_dtype``), on this module's device."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        return _fill_dense(dense, self, dtype or self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input must end in {self.in_features} features, got shape {tuple(x.shape)}")
        y = self._linear(x.reshape(-1, self.in_features), self.bias)
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


class QuantConv(PackedWeightModule):
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
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.out_channels = check_positive_int("out_channels", out_channels)
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

    def to_conv(self, dtype: torch.dtype | None = None) -> nn.Conv2d | nn.Conv3d:
        """A plain ``nn.Conv2d`` / ``nn.Conv3d`` with this geometry, holding the dequantized weight (and the
        bias) in ``dtype`` (default ``weight_dtype``), on this module's device."""
        cls = nn.Conv2d if self.conv_kind == "conv2d" else nn.Conv3d
        dense = cls(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride, padding=self.padding,
                    dilation=self.dilation, bias=self.bias is not None, padding_mode=self.padding_mode, device="meta")
        return _fill_dense(dense, self, dtype or self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nd = len(self.kernel_size)
        if x.dim() == 2:
            if x.shape[1] != self.in_features:
                raise ValueError(f"2-D input must have {self.in_features} columns, got {tuple(x.shape)}")
            return self._linear(x, self.bias)
        unbatched = x.dim() == nd + 1
        if unbatched:
            x = x.unsqueeze(0)
        if x.dim() != nd + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"input must be [batch, {self.in_channels}, *{nd} dims], got {tuple(x.shape)}")
        if is_patch_conv(self.kernel_size, self.stride, self.padding, self.dilation):
            y = conv_by_patches(x, self.kernel_size, lambda rows: self._linear(rows, self.bias))
        else:
            w = self.dequantize_weight(x.dtype).view(self.out_channels, self.in_channels, *self.kernel_size)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            conv = F.conv2d if nd == 2 else F.conv3d
            if self.padding_mode != "zeros":
                x = pad_conv_input(x, self, self.kernel_size, self.dilation)
                y = conv(x, w, bias, self.stride, 0, self.dilation)
            else:
                y = conv(x, w, bias, self.stride, self.padding, self.dilation)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        return (
            f"{self.conv_kind}, {self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, bits={self.bits}, group_size={self.group_size}, "
            f"bias={self.bias is not None}"
        )


def _fill_dense(dense: nn.Module, packed: PackedWeightModule, dtype: torch.dtype) -> nn.Module:
    """Give ``dense`` (built on the meta device: no random init) the dequantized weight and the bias."""
    with torch.no_grad():
        weight = packed._dequantize(dtype).view(dense.weight.shape)
        dense.weight = nn.Parameter(weight)
        if packed.bias is not None:
            dense.bias = nn.Parameter(packed.bias.detach().to(dtype).clone())
    return dense


def set_dequant_cache(module: nn.Module, enabled: bool) -> int:
    """Turn the dequantized-weight cache on / off for every Quant* module under ``module``; returns how many."""
    count = 0
    for m in module.modules():
        if isinstance(m, PackedWeightModule):
            m.cache_dequantized = bool(enabled)
            m.clear_cache()
            count += 1
    return count

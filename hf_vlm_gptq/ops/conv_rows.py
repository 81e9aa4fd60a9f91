"""The rows a conv layer's Hessian sees: a Conv2d / Conv3d input cut into patch rows in the column order of
``conv.weight.reshape(out, -1)`` (:func:`unfold_conv_input`), after the conv's own padding
(:func:`pad_conv_input`, also what ``QuantConv`` applies before a non-zero padding mode)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _as_tuple(v: int | tuple[int, ...], n: int, name: str) -> tuple[int, ...]:
    t = (v,) * n if isinstance(v, int) else tuple(v)
    if len(t) != n:
        raise ValueError(f"{name} must have {n} entries, got {name}={v!r}")
    return t


def _conv_geometry(conv: nn.Module) -> tuple[int, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(spatial dims, kernel, stride, dilation) of a Conv2d / Conv3d, rejecting grouped convs."""
    if isinstance(conv, nn.Conv3d):
        nd = 3
    elif isinstance(conv, nn.Conv2d):
        nd = 2
    else:
        nd = len(getattr(conv, "kernel_size", ()))
        if nd not in (2, 3):
            raise ValueError(f"conv must be a Conv2d or Conv3d, got {type(conv).__name__}")
    if getattr(conv, "groups", 1) != 1:
        raise ValueError(f"grouped convolutions are not supported, got groups={conv.groups}")
    return (
        nd,
        _as_tuple(conv.kernel_size, nd, "kernel_size"),
        _as_tuple(conv.stride, nd, "stride"),
        _as_tuple(getattr(conv, "dilation", 1), nd, "dilation"),
    )


def pad_conv_input(
    x: torch.Tensor, conv: nn.Module, kernel: tuple[int, ...], dilation: tuple[int, ...]
) -> torch.Tensor:
    """Apply the conv's padding (numeric, 'valid' or 'same'; any padding_mode) explicitly."""
    nd = len(kernel)
    padding = getattr(conv, "padding", 0)
    if padding == "valid":
        pads = [(0, 0)] * nd
    elif padding == "same":
        pads = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
    else:
        pads = [(p, p) for p in _as_tuple(padding, nd, "padding")]
    if not any(a or b for a, b in pads):
        return x
    flat = [v for pair in reversed(pads) for v in pair]  # F.pad wants the last dim first
    mode = getattr(conv, "padding_mode", "zeros")
    return F.pad(x, flat, mode="constant" if mode == "zeros" else mode)


def unfold_conv_input(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """Input patches of a Conv2d / Conv3d as rows ``[N, in_channels * prod(kernel)]``.

    Column order matches ``conv.weight.reshape(out, -1)`` (channel, then kernel positions row-major), so
    ``patches @ weight.reshape(out, -1).T`` equals the conv output. A 2-D input whose width already equals
    ``in_channels * prod(kernel)`` is taken as ready-made patch rows (Qwen2-VL's patch embedding).
    """
    nd, kernel, stride, dilation = _conv_geometry(conv)
    width = conv.in_channels * math.prod(kernel)
    if x.dim() == 2:
        if x.shape[1] != width:
            raise ValueError(
                f"2-D conv input must have width in_channels*prod(kernel)={width}, got {tuple(x.shape)}"
            )
        return x
    if x.dim() == nd + 1:
        x = x.unsqueeze(0)
    if x.dim() != nd + 2 or x.shape[1] != conv.in_channels:
        raise ValueError(
            f"conv input must be [batch, {conv.in_channels}, *{nd} spatial dims], got shape {tuple(x.shape)}"
        )
    x = pad_conv_input(x, conv, kernel, dilation)
    spatial = x.shape[2:]
    # one patch per sample (Qwen2-VL reshapes its pixels into patches before the conv)
    if tuple(spatial) == kernel and all(d == 1 for d in dilation):
        return x.reshape(x.shape[0], width)
    for dim, (k, s, d) in enumerate(zip(kernel, stride, dilation)):
        span = d * (k - 1) + 1
        x = x.unfold(2 + dim, span, s)  # appends a window dim of size `span`
        if d > 1:
            x = x[..., ::d]
    # x: [B, C, *out_spatial, *kernel] -> [B, *out_spatial, C, *kernel]
    perm = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    return x.permute(perm).reshape(-1, width)

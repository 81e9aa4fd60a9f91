"""Round-to-nearest quantization on the same grids and groups as GPTQ (no error feedback)."""

from __future__ import annotations

import torch

from .grid import check_full_range, find_params, quantize_codes
from .result import QuantResult, check_common, check_hessian, check_weight, compute_dtype, proxy_loss


def group_params(
    w: torch.Tensor, bits: int, group_size: int, sym: bool, clip: bool, full_range: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid parameters of every column group of ``w[out, in]``: ``(scale, zero)`` each ``[out, n_groups]``.

    Full groups are solved as one batch of rows; a partial last group separately.
    """
    out_f, in_f = w.shape
    if group_size == -1 or group_size >= in_f:
        s, z = find_params(w, bits, sym, clip, full_range)
        return s.unsqueeze(1), z.unsqueeze(1)
    full = in_f // group_size
    s, z = find_params(w[:, : full * group_size].reshape(out_f * full, group_size), bits, sym, clip, full_range)
    s, z = s.view(out_f, full), z.view(out_f, full)
    if full * group_size < in_f:
        s2, z2 = find_params(w[:, full * group_size :], bits, sym, clip, full_range)
        s, z = torch.cat([s, s2.unsqueeze(1)], 1), torch.cat([z, z2.unsqueeze(1)], 1)
    return s, z


def default_g_idx(in_features: int, group_size: int, device: torch.device | None = None) -> torch.Tensor:
    """``col // group_size`` (all zeros for per-channel), int32."""
    cols = torch.arange(in_features, dtype=torch.int32, device=device)
    return torch.zeros_like(cols) if group_size == -1 else cols // group_size


def rtn_core(
    w: torch.Tensor, bits: int, group_size: int, sym: bool, clip: bool, full_range: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RTN of ``w`` (float, not modified): codes uint8, scales, zeros (float, w's dtype), g_idx int32."""
    scale, zero = group_params(w, bits, group_size, sym, clip, full_range)
    g_idx = default_g_idx(w.shape[1], group_size, w.device)
    g = g_idx.long()
    codes = quantize_codes(w, scale[:, g], zero[:, g], bits)
    return codes, scale, zero, g_idx


def rtn_quantize(
    weight: torch.Tensor,
    *,
    bits: int,
    group_size: int = -1,
    sym: bool = True,
    clip: bool = False,
    hessian: torch.Tensor | None = None,
    full_range: bool = False,
) -> QuantResult:
    """Round-to-nearest quantization of ``weight[out, in]``; the loss is computed when ``hessian`` is given.
    ``full_range``: the symmetric grid with all ``2**bits`` codes (see ``grid.py``)."""
    check_common(bits, group_size, sym, clip)
    check_full_range(full_range)
    check_weight(weight)
    if hessian is not None:
        check_hessian(hessian, weight.shape[1])
    dtype = compute_dtype(weight, *([hessian] if hessian is not None else []))
    w = weight.detach().to(dtype)
    codes, scale, zero, g_idx = rtn_core(w, bits, group_size, sym, clip, full_range)
    result = QuantResult(
        codes=codes,
        scales=scale.float(),
        zeros=zero.to(torch.int32),
        g_idx=g_idx,
        bits=bits,
        group_size=group_size,
        sym=sym,
        loss=float("nan"),
        damp=0.0,
        method="rtn",
        fallback=None,
        nsamples=0,
    )
    if hessian is not None:
        g = g_idx.long()
        result.loss = proxy_loss(w, scale[:, g] * (codes.to(dtype) - zero[:, g]), hessian)
    return result

"""``QuantResult`` (what a solve returns), the argument checks of the solvers, the split of a stacked solve
into per-layer results, and the proxy loss.

Re-exported by ``ops/gptq.py`` (where the contract names it) and ``ops/rtn.py``; it lives here so the two
solvers can share it without importing each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import dense
from .grid import check_bits, check_full_range, check_group_size, dequantize


@dataclass
class QuantResult:
    """One quantized weight: codes and grid per group, plus how it was obtained.

    ``codes`` uint8 [out, in]; ``scales`` fp32 [out, n_groups]; ``zeros`` int32 [out, n_groups];
    ``g_idx`` int32 [in] (group of each original column); ``loss`` is ``tr((W-Q) H (W-Q)^T)`` against the
    caller's Hessian (NaN without one); ``damp`` the relative damping actually used; ``fallback`` says why
    GPTQ was not used (None when it was); ``nsamples`` the Hessian's sample rows (0 when unknown).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    sym: bool
    loss: float
    damp: float
    method: str
    fallback: str | None
    nsamples: int

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    def dequantize(self) -> torch.Tensor:
        """The quantized weight ``scale * (code - zero)`` as float32 [out, in]. Consecutive groups (no
        act-order permutation) broadcast each group's scale and zero over its columns, bit for bit the gather
        by ``g_idx`` at a small fraction of its time."""
        out_f, n = self.shape
        size = n if self.group_size == -1 else self.group_size
        if (n % size == 0 and self.scales.shape[1] == n // size
                and torch.equal(self.g_idx, torch.arange(n, device=self.g_idx.device, dtype=self.g_idx.dtype) // size)):
            codes = self.codes.reshape(out_f, n // size, size).float()
            return codes.sub_(self.zeros.float()[..., None]).mul_(self.scales.float()[..., None]).view(out_f, n)
        g = self.g_idx.long()
        return dequantize(self.codes, self.scales[:, g].float(), self.zeros[:, g].float())


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` holds no inf / nan (one fused min/max pass; much cheaper than ``isfinite().all()``)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.detach())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64 (exact tests), float32 otherwise."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_weight(weight: object, name: str = "weight") -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.numel() == 0:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{name} must be a non-empty 2-D tensor [out, in], got {shape}")
    if not weight.is_floating_point():
        raise ValueError(f"{name} must be floating point, got dtype {weight.dtype}")
    if not all_finite(weight):
        raise ValueError(f"{name} contains non-finite values (inf or nan)")
    return weight


def check_hessian(hessian: object, columns: int) -> torch.Tensor:
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (columns, columns):
        shape = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
        raise ValueError(f"hessian must be [{columns}, {columns}] to match the weight, got {shape}")
    if not hessian.is_floating_point():
        raise ValueError(f"hessian must be floating point, got dtype {hessian.dtype}")
    if not all_finite(hessian):
        raise ValueError("hessian contains non-finite values (inf or nan)")
    return hessian


def check_common(bits: object, group_size: object, sym: object, clip: object) -> None:
    check_bits(bits)
    check_group_size(group_size)
    for name, v in (("sym", sym), ("clip", clip)):
        if not isinstance(v, bool):
            raise ValueError(f"{name} must be a bool, got {name}={v!r}")


def proxy_loss(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor | None) -> float:
    """``tr((W - Q) H (W - Q)^T)`` in the wider of the inputs' dtypes; NaN without a Hessian, or with an
    all-zero one (no usable input: the trace would be 0 whatever the weights)."""
    if hessian is None or not bool((hessian != 0).any()):
        return math.nan
    dtype = compute_dtype(weight, hessian)
    d = weight.to(dtype) - quantized.to(device=weight.device, dtype=dtype)
    h = hessian.to(device=weight.device, dtype=dtype)
    return float((dense.linear(d, h) * d).sum())  # d H^T d^T: the same trace


def check_gptq_options(group_order: object, act_order: object, full_range: object, gptaq_cross: object,
                       gptaq_alpha: object, columns: int) -> None:
    """GPTQ's column-order, grid and GPTAQ options (``gptq.py``), checked against a weight of ``columns`` inputs."""
    if not isinstance(group_order, bool):
        raise ValueError(f"group_order must be a bool, got group_order={group_order!r}")
    if group_order and act_order:
        raise ValueError("act_order and group_order are two column orders; pick one")
    check_full_range(full_range)
    if gptaq_cross is not None:
        if not isinstance(gptaq_cross, torch.Tensor) or tuple(gptaq_cross.shape) != (columns, columns):
            shape = tuple(gptaq_cross.shape) if isinstance(gptaq_cross, torch.Tensor) else type(gptaq_cross).__name__
            raise ValueError(f"gptaq_cross must be [{columns}, {columns}] to match the weight, got {shape}")
        if not gptaq_cross.is_floating_point() or not all_finite(gptaq_cross):
            raise ValueError("gptaq_cross must be a finite floating-point tensor")
    if (isinstance(gptaq_alpha, bool) or not isinstance(gptaq_alpha, (int, float))
            or not math.isfinite(gptaq_alpha) or gptaq_alpha < 0):
        raise ValueError(f"gptaq_alpha must be a finite number >= 0, got gptaq_alpha={gptaq_alpha!r}")


def check_solver_args(percdamp: object, block_size: object, act_order: object, nsamples: object) -> None:
    """GPTQ's damping, block size, act-order and sample-count arguments."""
    if (
        isinstance(percdamp, bool)
        or not isinstance(percdamp, (int, float))
        or not math.isfinite(percdamp)
        or percdamp < 0
    ):
        raise ValueError(f"percdamp must be a finite number >= 0, got percdamp={percdamp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got block_size={block_size!r}")
    if not isinstance(act_order, bool):
        raise ValueError(f"act_order must be a bool, got act_order={act_order!r}")
    if nsamples is not None and (isinstance(nsamples, bool) or not isinstance(nsamples, int) or nsamples < 0):
        raise ValueError(f"nsamples must be an int >= 0 or None, got nsamples={nsamples!r}")


def split_results(
    weights: list[torch.Tensor], solved: tuple, bits: int, group_size: int, sym: bool, nsamples: int | None
) -> list[QuantResult]:
    """Split the stacked solution back into one result per layer."""
    codes, scales, zeros, g_idx, row_losses, damp, method, fallback = solved
    results, row = [], 0
    for weight in weights:
        rows = slice(row, row + weight.shape[0])
        row += weight.shape[0]
        results.append(
            QuantResult(
                codes=codes[rows].contiguous(),
                scales=scales[rows].float().contiguous(),
                zeros=zeros[rows].to(torch.int32).contiguous(),
                g_idx=g_idx.clone(),
                bits=bits,
                group_size=group_size,
                sym=sym,
                loss=float(row_losses[rows].sum()),
                damp=float(damp),
                method=method,
                fallback=fallback,
                nsamples=int(nsamples or 0),
            )
        )
    return results

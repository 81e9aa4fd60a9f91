"""GPTQ: quantize a weight column by column, feeding each column's error forward through the inverse Hessian.

Standard algorithm (Frantar et al.; IST-DASLab reference): dead columns (``diag(H) == 0``) get ``H_ii = 1``
and weight 0; optional act-order permutes columns by ``diag(H)`` descending; damping
``percdamp * mean(diag H)``; ``U`` = upper Cholesky factor of ``H^-1``; blocks of ``block_size`` columns with
lazy updates of the rest of the matrix. Group parameters are computed from the (already error-updated)
columns of a group when its first column is reached.

Implementation notes (same math, less work):

* ``U`` comes from one Cholesky of the index-reversed ``H`` and one triangular inverse: if
  ``J H J = L L^T`` (``J`` reverses indices) then ``H^-1 = U^T U`` with ``U = J L^-1 J`` upper triangular.
* The weight is kept transposed (``[in, out]``) so that a column is a contiguous row.
* Blocks hold whole groups, and inside a block columns go in sub-blocks (cut at group starts) with their
  own lazy update, so rank-1 updates only touch a few columns.

On CUDA the column sweep runs as a fused Triton kernel (``triton_gptq.py``: one launch per block instead
of a few launches per column) when it applies (float32, Triton importable); on CPUs with AVX2 + FMA each
group's columns go through one call of a C kernel (``cpu_gptq.py``; float32); otherwise the torch loop
(``gptq_sweep.py``, which also holds the column loop both CPU paths share).

Options (each off by default; each reduces to the plain algorithm when it has nothing to do):

* ``group_order`` (group-aware reordering, as GPTQModel's default): the columns of each group of
  ``group_size`` are solved in order of decreasing ``diag(H)``, and the groups in order of their largest
  ``diag(H)`` (a partial last group stays last), so every group stays contiguous and the checkpoint keeps
  ``g_idx = col // group_size`` (no act-order permutation for the kernels or vLLM). With one group it is
  act-order.
* ``gptaq_cross`` (GPTAQ, "GPTQ v2", Li et al., ICML'25; asymmetric calibration): the layer is fitted to
  the float model's outputs ``W X`` while it sees the quantized model's inputs ``X~``. The caller passes
  ``dXXT = 2/n * sum (x - x~) x~^T`` next to ``H = 2/n * sum x~ x~^T``; with ``U`` the upper Cholesky factor
  of ``H^-1``, ``P = alpha * triu(dXXT U^T, 1) U`` and quantizing column ``j`` also moves every later
  column ``k`` by ``+ w_j P[j, k]`` (``w_j`` the column before rounding), next to the usual error
  feedback. (The published code uses the rounded columns for the updates between blocks of
  ``block_size``; here the unrounded ones are used everywhere, so the result does not depend on the block
  size.) ``dXXT = 0`` is plain GPTQ.
* ``full_range``: the symmetric grid with all ``2**bits`` codes (``grid.py``).

Faults: a failed Cholesky is retried with damping x10 (up to ``MAX_REL_DAMP``); if it still fails, or the
Hessian carries no samples, the result is RTN with ``fallback`` saying why. Non-finite inputs raise.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from . import dense
from .gptq_matrices import (
    GPTAQ_ALPHA,
    gptaq_correction,
    group_aware_order,
    symmetric_copy,
    upper_inverse_cholesky,
)
from .gptq_sweep import _cpu_kernel, _gptq_columns
from .result import (
    QuantResult,
    all_finite,
    check_common,
    check_gptq_options,
    check_hessian,
    check_solver_args,
    check_weight,
    compute_dtype,
    split_results,
)
from .rtn import rtn_core
from .scratch import MatrixPool
from .selfcheck import self_check

__all__ = ["GPTAQ_ALPHA", "MAX_REL_DAMP", "QuantResult", "gptaq_correction", "gptq_quantize", "gptq_quantize_shared",
           "group_aware_order", "upper_inverse_cholesky"]

logger = logging.getLogger(__name__)

# relative damping limit: at damping = mean(diag H) any PSD Hessian factors; past it the input is no Hessian
MAX_REL_DAMP = 1.0
NO_CALIBRATION = "no calibration input"


def _damping_steps(percdamp: float) -> list[float]:
    steps = [percdamp]
    d = max(percdamp, 1e-5) * 10
    while d <= MAX_REL_DAMP * (1 + 1e-9):
        steps.append(d)
        d *= 10
    return steps


def _use_triton_sweep(w: torch.Tensor) -> bool:
    """Whether the fused Triton sweep takes ``w`` (CUDA only; why not is logged at debug level)."""
    if not w.is_cuda:
        return False
    from .triton_gptq import columns_unavailable_reason  # imports triton: CUDA only

    reason = columns_unavailable_reason(w)
    if reason is not None:
        logger.debug("GPTQ column sweep stays in torch: %s", reason)
    return reason is None


# device -> whether the fused sweep agreed with the torch loop on its first layer there (checked once)
_sweep_verified: dict[str, bool] = {}
SWEEP_AGREEMENT = 0.999  # share of identical codes (rounding ties may flip a few)


def _column_sweep(
    w: torch.Tensor, u: torch.Tensor, bits: int, group_size: int, sym: bool, clip: bool, block_size: int,
    full_range: bool = False, p: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`_gptq_columns`, or its fused Triton twin where that applies (same contract; the plain grid
    without GPTAQ only), plus each row's sum of squared scaled errors (float64) when the torch / CPU sweep
    ran without GPTAQ, else None. The first layer solved on a device runs both and compares the codes: a
    kernel that disagrees (it was only tested in Triton's interpreter before release) is logged and not used
    again in this process."""
    if (full_range or p is not None or not _use_triton_sweep(w)
            or _sweep_verified.get(str(w.device)) is False):
        energy = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if p is None else None
        return (*_gptq_columns(w, u, bits, group_size, sym, clip, block_size, full_range, p, _cpu_kernel(w),
                               energy), energy)
    from .triton_gptq import gptq_columns_triton

    fused = gptq_columns_triton(w, u, bits, group_size, sym, clip, block_size)
    if str(w.device) in _sweep_verified:
        return (*fused, None)
    torch_loop = _gptq_columns(w, u, bits, group_size, sym, clip, block_size)

    def agrees() -> str | None:
        agreement = float((fused[0] == torch_loop[0]).float().mean())
        if agreement >= SWEEP_AGREEMENT and all_finite(fused[3]):
            return None
        return f"it disagrees with the torch loop on {w.device}: {agreement:.4f} of codes equal" + (
            "" if all_finite(fused[3]) else ", non-finite weights")

    ok = self_check("fused Triton GPTQ sweep", [agrees], "using the torch loop", logger) is None
    _sweep_verified[str(w.device)] = ok
    return (*(fused if ok else torch_loop), None)


_DISTANCE_CHUNK_ELEMS = 1 << 17  # values per chunk of _row_distances (cache-sized; no full-size temporary)


def _row_distances(w: torch.Tensor, q_t: torch.Tensor) -> torch.Tensor:
    """Per row, ``||w - q_t^T||^2`` in float64; on CPU a chunk of rows at a time: the chunk's slice of ``q_t``
    read transposed stays in cache, and no ``w``-sized difference is allocated."""
    if w.device.type != "cpu":
        return (w - q_t.t()).square().sum(1, dtype=torch.float64)
    out = torch.empty(w.shape[0], dtype=torch.float64, device=w.device)
    rows = max(1, _DISTANCE_CHUNK_ELEMS // max(1, w.shape[1]))
    for r0 in range(0, w.shape[0], rows):
        d = w[r0 : r0 + rows] - q_t[:, r0 : r0 + rows].t()
        out[r0 : r0 + rows] = d.square_().sum(1, dtype=torch.float64)
    return out


def _nonzero(h: torch.Tensor) -> bool:
    """Whether ``h`` has a nonzero entry: its diagonal first (a nonzero positive semi-definite matrix has a
    nonzero diagonal), the whole matrix only when that is all zero."""
    return bool(h.diagonal().ne(0).any()) or bool(h.ne(0).any())


def _row_losses(w: torch.Tensor, q_t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per-row ``d H d^T`` for ``D = w - q_t^T``; summing rows gives the proxy loss."""
    d = w - q_t.t()
    return dense.linear(d, h).mul_(d).sum(1)  # d H^T d^T: the same quadratic form


def _permuted(m: torch.Tensor, perm: torch.Tensor, pool: MatrixPool) -> torch.Tensor:
    """``m[perm][:, perm]`` written back into ``m`` (contiguous, square), through one matrix from ``pool``."""
    rows = torch.index_select(m, 0, perm, out=pool.take(m.shape, m.dtype, m.device))
    torch.index_select(rows, 1, perm, out=m)
    pool.give(rows)
    return m


def _solve(
    w: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    act_order: bool,
    percdamp: float,
    block_size: int,
    clip: bool,
    nsamples: int | None,
    group_order: bool = False,
    full_range: bool = False,
    gptaq_cross: torch.Tensor | None = None,
    gptaq_alpha: float = GPTAQ_ALPHA,
    pool: MatrixPool | None = None,
) -> tuple:
    """Solve the stacked problem ``w[out, n]`` (compute dtype; not modified).

    Returns ``codes, scales, zeros, g_idx, row_losses, damp, method, fallback``; ``row_losses[out]`` are
    measured against the caller's (undamped) Hessian. The ``[n, n]`` work matrices come from ``pool`` and go
    back to it.
    """
    n = w.shape[1]
    pool = pool if pool is not None else MatrixPool()
    square = (n, n), w.dtype, w.device
    h = symmetric_copy(hessian.to(device=w.device), w.dtype, out=pool.take(*square))

    def rtn(reason: str, damp: float) -> tuple:
        logger.warning("GPTQ falls back to RTN: %s", reason)
        codes, scale, zero, g_idx = rtn_core(w, bits, group_size, sym, clip, full_range)
        g = g_idx.long()
        q_t = (scale[:, g] * (codes.to(w.dtype) - zero[:, g])).t()
        h_orig = symmetric_copy(hessian.to(device=w.device), w.dtype)
        return codes, scale, zero, g_idx, _row_losses(w, q_t, h_orig), damp, "rtn", reason

    if nsamples == 0 or not _nonzero(h):
        pool.give(h)
        return rtn(NO_CALIBRATION, 0.0)
    diag = h.diagonal()
    dead = diag == 0
    diag[dead] = 1
    perm = group_perm = None
    if act_order:
        perm = torch.argsort(diag, descending=True, stable=True)
    elif group_order:
        perm, group_perm = group_aware_order(diag, group_size)
    cross = None
    if gptaq_cross is not None:
        cross = pool.take(*square).copy_(gptaq_cross)
        cross[:, dead] = 0
    if perm is not None:
        w_p, dead = w[:, perm], dead[perm]
        h = _permuted(h, perm, pool)
        if cross is not None:
            cross = _permuted(cross, perm, pool)
    else:
        w_p = w
    work = w_p
    if bool(dead.any()):
        work = w_p.clone()
        work[:, dead] = 0
    mean_diag = float(h.diagonal().mean())
    u, used, factor = None, percdamp, pool.take(*square)
    for used in _damping_steps(percdamp):
        u = upper_inverse_cholesky(h, used * mean_diag, out=factor) if mean_diag > 0 else None
        if u is not None:
            break
        logger.warning("Cholesky failed at relative damping %g; retrying with more", used)
    if u is None:
        pool.give(factor, h, cross)
        del h
        return rtn(f"cholesky failed up to relative damping {used:g}", used)
    p = gptaq_correction(cross, u, gptaq_alpha, out=pool.take(*square)) if cross is not None else None
    pool.give(cross)
    del cross
    codes_p, scales, zeros, q_t, energy = _column_sweep(work, u, bits, group_size, sym, clip, block_size,
                                                        full_range, p)
    pool.give(u, p)
    del u, p, factor
    if energy is not None:  # without GPTAQ: each row's loss from the sweep's scaled errors
        # (W - Q) H (W - Q)^T = sum E^2 - damp ||work - Q||^2 per row: dead columns are 0 in work and Q, and
        # the caller's Hessian is 0 there
        damp = used * mean_diag
        row_losses = (energy - damp * _row_distances(work, q_t)).clamp_min_(0)
        row_losses = row_losses.to(w.dtype)
    else:
        h.diagonal()[dead] = 0  # back to the caller's Hessian (permuted) for the loss
        row_losses = _row_losses(w_p, q_t, h)
    pool.give(h)
    del h, q_t, work
    positions = torch.arange(n, device=w.device, dtype=torch.int32)
    group_of_pos = torch.zeros_like(positions) if group_size == -1 else positions // group_size
    if perm is None:
        return codes_p, scales, zeros, group_of_pos, row_losses, used, "gptq", None
    codes = torch.empty_like(codes_p).index_copy_(1, perm, codes_p)
    if group_perm is not None:  # groups stayed contiguous: the grid of position-group k is column-group group_perm[k]
        if group_size != -1 and group_size < n:
            scales = torch.empty_like(scales).index_copy_(1, group_perm, scales)
            zeros = torch.empty_like(zeros).index_copy_(1, group_perm, zeros)
        cols = torch.arange(n, device=w.device, dtype=torch.int32)
        g_idx = torch.zeros_like(cols) if group_size == -1 else cols // group_size
        return codes, scales, zeros, g_idx, row_losses, used, "gptq", None
    g_idx = torch.empty_like(group_of_pos).index_copy_(0, perm, group_of_pos)
    return codes, scales, zeros, g_idx, row_losses, used, "gptq", None


def gptq_quantize_shared(
    weights: list[torch.Tensor],
    hessian: torch.Tensor,
    *,
    bits: int,
    group_size: int = -1,
    sym: bool = True,
    act_order: bool = False,
    percdamp: float = 0.01,
    block_size: int = 128,
    clip: bool = False,
    nsamples: int | None = None,
    group_order: bool = False,
    full_range: bool = False,
    gptaq_cross: torch.Tensor | None = None,
    gptaq_alpha: float = GPTAQ_ALPHA,
    pool: MatrixPool | None = None,
) -> list[QuantResult]:
    """GPTQ for several layers fed the same input (q/k/v, gate/up): one damping and one Cholesky, the
    weights solved as one problem stacked along the output dim, results split back per layer.
    ``group_order``, ``full_range``, ``gptaq_cross`` / ``gptaq_alpha``: see the module docstring. ``pool``
    (``scratch.py``): where the solve's work matrices come from and go back to, so that a run's solves of
    one size reuse them (by default fresh ones)."""
    if not isinstance(weights, (list, tuple)) or not weights:
        raise ValueError(f"weights must be a non-empty list of 2-D tensors, got {type(weights).__name__}")
    check_common(bits, group_size, sym, clip)
    check_solver_args(percdamp, block_size, act_order, nsamples)
    for i, wi in enumerate(weights):
        check_weight(wi, f"weights[{i}]")
        if wi.shape[1] != weights[0].shape[1]:
            raise ValueError(
                f"weights[{i}] has {wi.shape[1]} input columns, weights[0] has {weights[0].shape[1]}"
            )
    check_hessian(hessian, weights[0].shape[1])
    check_gptq_options(group_order, act_order, full_range, gptaq_cross, gptaq_alpha, weights[0].shape[1])
    dtype = compute_dtype(hessian, *weights)
    device = weights[0].device
    stacked = torch.cat([wi.detach().to(device=device, dtype=dtype) for wi in weights], 0)
    solved = _solve(
        stacked,
        hessian,
        bits=bits,
        group_size=group_size,
        sym=sym,
        act_order=act_order,
        percdamp=float(percdamp),
        block_size=block_size,
        clip=clip,
        nsamples=nsamples,
        group_order=group_order,
        full_range=full_range,
        gptaq_cross=gptaq_cross,
        gptaq_alpha=float(gptaq_alpha),
        pool=pool,
    )
    return split_results(list(weights), solved, bits, group_size, sym, nsamples)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, *, bits: int, **options: Any) -> QuantResult:
    """GPTQ-quantize ``weight[out, in]`` given the layer Hessian ``[in, in]`` (see the module docstring);
    ``options`` are those of :func:`gptq_quantize_shared` (``group_size``, ``sym``, ``act_order``,
    ``percdamp``, ``block_size``, ``clip``, ``nsamples``, ``group_order``, ``full_range``, ``gptaq_cross``,
    ``gptaq_alpha``), with the same defaults.

    ``nsamples``: rows behind the Hessian; 0 means no calibration input (RTN fallback), None means unknown
    (then only an all-zero Hessian counts as no input). Computes in float64 when an input is float64,
    else float32. The caller's tensors are never modified.
    """
    check_weight(weight)
    return gptq_quantize_shared([weight], hessian, bits=bits, **options)[0]

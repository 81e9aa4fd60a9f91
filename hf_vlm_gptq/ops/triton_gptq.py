"""Fused GPTQ column sweep (Triton): the per-column loop of :func:`gptq_sweep._gptq_columns` in one launch per
block of columns.

Given the inverse-Cholesky factor ``U``, output rows are independent, so each program owns ``BR`` rows and
walks the block's columns in order, holding the block ``[BB columns, BR rows]`` (from the transposed weight)
in registers. For column ``j``:

* at a group's first column (in-kernel grids): per-row scale / zero from the group's columns, already
  updated by every earlier column -- the min/max grid of :func:`grid.find_params` (``clip=False``);
* ``code = clamp(rint(w / scale) + zero, 0, maxq)``, ``q = scale * (code - zero)``,
  ``err = (w - q) / U[j, j]``;
* the block's later columns: ``w_k -= err * U[j, k]``.

Codes, ``q`` (written over the weight row, so the transposed weight ends as ``Q^T``) and ``err`` go to
memory; the update of the columns after the block (one GEMM with the block's errors) stays in torch, as in
the torch path. Divisions are IEEE (``div_rn``) and rounding is half-to-even, as torch's, so codes match the
torch loop except where a value sits within float rounding of a rounding tie.

Grids: with ``group_size > 0`` and ``clip=False`` the kernel computes them (launch blocks of
``group_size * max(1, block_size // group_size)`` columns, as the torch path, when that is at most
:data:`MAX_BLOCK`). Otherwise -- group size -1, the MSE clip search, or groups wider than ``MAX_BLOCK`` --
torch computes each group's grid (``grid.find_params``, clip included) when the group's first column is
reached, from the same updated columns, and launches are cut at group starts (``MAX_BLOCK`` columns at most).

Applies to float32 weights on CUDA (or CPU under ``TRITON_INTERPRET=1``) with ``out * in < 2**31``; see
:func:`columns_unavailable_reason`. Row tile sizes are guesses, not tuned (no GPU on the development host).
"""

from __future__ import annotations

import itertools

import torch

from .grid import find_params, num_groups
from .triton_matmul import IMPORT_ERROR, _jit, interpreted, tl, triton

MAX_BLOCK = 256  # widest launch block (columns held in registers per program)


@_jit()
def _rint(x):
    """Round half to even (torch.round), exact for every float: ``x - floor(x)`` is exact below 2**23."""
    r = tl.floor(x)
    d = x - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), r + 1.0, r)


@_jit(do_not_specialize=["i1", "nb", "n", "group_size"])  # out_f stays: the row stride of wt / codes
def _gptq_block_kernel(
    wt_ptr, u_ptr, codes_ptr, err_ptr, scale_in_ptr, zero_in_ptr, scales_ptr, zeros_ptr,
    i1, nb, n, out_f, group_size,
    BITS: tl.constexpr, SYM: tl.constexpr, PARAMS_GIVEN: tl.constexpr, BB: tl.constexpr, BR: tl.constexpr,
):
    MAXQ: tl.constexpr = (1 << BITS) - 1
    HALF: tl.constexpr = 1 << (BITS - 1)
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    r_ok = r < out_f
    c = tl.arange(0, BB)
    c_ok = c < nb
    w = tl.load(wt_ptr + (i1 + c)[:, None] * out_f + r[None, :], mask=c_ok[:, None] & r_ok[None, :], other=0.0)
    if PARAMS_GIVEN:
        scale = tl.load(scale_in_ptr + r, mask=r_ok, other=1.0)
        zero = tl.load(zero_in_ptr + r, mask=r_ok, other=0.0)
    else:
        scale = tl.full((BR,), 1.0, tl.float32)
        zero = tl.full((BR,), HALF, tl.float32)
    for j in range(0, nb):
        p = i1 + j
        if not PARAMS_GIVEN:  # noqa: SIM102 (compile-time test outside, runtime test inside)
            if p % group_size == 0:  # a group's first column: its grid from the updated columns
                in_group = (c >= j) & (c < j + group_size) & c_ok
                xmin = tl.minimum(tl.min(tl.where(in_group[:, None], w, float("inf")), axis=0), 0.0)
                xmax = tl.maximum(tl.max(tl.where(in_group[:, None], w, float("-inf")), axis=0), 0.0)
                dead = (xmin == 0.0) & (xmax == 0.0)
                xmin = tl.where(dead, -1.0, xmin)
                xmax = tl.where(dead, 1.0, xmax)
                if SYM:
                    scale = tl.math.div_rn(tl.maximum(-xmin, xmax), tl.full((BR,), HALF - 1, tl.float32))
                else:
                    scale = tl.math.div_rn(xmax - xmin, tl.full((BR,), MAXQ, tl.float32))
                    zero = _rint(tl.math.div_rn(-xmin, scale))
                g = p // group_size
                tl.store(scales_ptr + g * out_f + r, scale, mask=r_ok)
                tl.store(zeros_ptr + g * out_f + r, zero, mask=r_ok)
        col = tl.sum(tl.where((c == j)[:, None], w, 0.0), axis=0)
        code = tl.minimum(tl.maximum(_rint(tl.math.div_rn(col, scale)) + zero, 0.0), MAXQ * 1.0)
        q = (code - zero) * scale
        err = tl.math.div_rn(col - q, tl.full((BR,), 1.0, tl.float32) * tl.load(u_ptr + p * n + p))
        u_row = tl.load(u_ptr + p * n + i1 + c, mask=(c > j) & c_ok, other=0.0)
        w = w - u_row[:, None] * err[None, :]
        tl.store(codes_ptr + p * out_f + r, code.to(tl.uint8), mask=r_ok)
        tl.store(wt_ptr + p * out_f + r, q, mask=r_ok)
        tl.store(err_ptr + j * out_f + r, err, mask=r_ok)


def columns_unavailable_reason(w: torch.Tensor) -> str | None:
    """Why the fused sweep cannot take ``w[out, n]`` (None when it can)."""
    if IMPORT_ERROR is not None:
        return IMPORT_ERROR
    if w.dtype != torch.float32:
        return f"dtype {w.dtype} (fused sweep is float32)"
    if max(w.numel(), w.shape[-1] ** 2) >= 2**31:
        return f"weight {tuple(w.shape)} too large for the kernel's int32 offsets"
    if w.device.type == "cuda" or (w.device.type == "cpu" and interpreted()):
        return None
    return f"device {w.device.type} (Triton runs on CUDA, or on CPU with TRITON_INTERPRET=1)"


def _launch_cuts(n: int, group_size: int, width: int) -> list[int]:
    """Launch boundaries: multiples of ``width`` plus every group start."""
    points = set(range(0, n, width)) | {n}
    if group_size > 0:
        points |= set(range(0, n, group_size))
    return sorted(points)


def gptq_columns_triton(
    w: torch.Tensor,
    u: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    clip: bool,
    block_size: int,
    rows_per_program: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as :func:`gptq_sweep._gptq_columns`: ``w[out, n]`` float32 (columns in processing order;
    not modified), ``u[n, n]`` upper -> ``codes uint8 [out, n]``, ``scales [out, G]``, ``zeros [out, G]``,
    ``q_t [n, out]``."""
    out_f, n = w.shape
    dev = w.device
    u = u.contiguous()
    wt = torch.empty(n, out_f, dtype=w.dtype, device=dev).copy_(w.t())
    codes_t = torch.empty(n, out_f, dtype=torch.uint8, device=dev)
    n_groups = num_groups(n, group_size)
    scales_t = torch.empty(n_groups, out_f, dtype=w.dtype, device=dev)
    zeros_t = torch.empty_like(scales_t)
    block = block_size if group_size == -1 else group_size * max(1, block_size // group_size)
    in_kernel = group_size > 0 and not clip and block <= MAX_BLOCK
    # in-kernel grids: whole groups per launch (the torch path's blocks); else cut at every group start,
    # where torch computes the group's grid
    cuts = _launch_cuts(n, -1, block) if in_kernel else _launch_cuts(n, group_size, min(block, MAX_BLOCK))
    width = max(b - a for a, b in itertools.pairwise(cuts))
    bb = triton.next_power_of_2(width)
    br = rows_per_program or (64 if interpreted() else 32 if bb <= 64 else 16)  # interpreter: fewer programs
    err = torch.empty(width, out_f, dtype=w.dtype, device=dev)
    scale = zero = scales_t[0]  # placeholders for in-kernel grids
    if group_size == -1:
        scale, zero = find_params(wt.t(), bits, sym, clip)
        scales_t[0], zeros_t[0] = scale, zero
    grid = (triton.cdiv(out_f, br),)
    for i1, i2 in itertools.pairwise(cuts):
        if not in_kernel and group_size > 0 and i1 % group_size == 0:
            gi = i1 // group_size
            scale, zero = find_params(wt[i1 : min(i1 + group_size, n)].t(), bits, sym, clip)
            scales_t[gi], zeros_t[gi] = scale, zero
        _gptq_block_kernel[grid](
            wt, u, codes_t, err, scale.contiguous(), zero.contiguous(), scales_t, zeros_t,
            i1, i2 - i1, n, out_f, max(group_size, 1),
            BITS=bits, SYM=sym, PARAMS_GIVEN=not in_kernel, BB=bb, BR=br, num_warps=4,
        )  # fmt: skip
        if i2 < n:
            wt[i2:].addmm_(u[i1:i2, i2:].t(), err[: i2 - i1], alpha=-1)
    return codes_t.t().contiguous(), scales_t.t().contiguous(), zeros_t.t().contiguous(), wt

"""Fused low-bit matmul for GPTQ-packed weights (Triton): ``y[M, out] = x[M, in] @ dequant(W)^T`` read
straight from the checkpoint buffers (``qweight``, ``qzeros``, ``scales``, ``g_idx``; layout in packing.py),
with no dense copy of the weight.

Per K step a program loads a ``[BK, BN]`` tile of codes (input row ``k`` sits in word ``k // (32 / bits)``
at bit ``(k % (32 / bits)) * bits``), its zero points (v1: stored ``zero - 1``, so ``(stored + 1) mod
2**bits``) and scales, dequantizes ``(code - zero) * scale`` in fp32 and rounds once to x's dtype -- the
exact weight :func:`kernels.dequantize_packed` gives -- and feeds ``tl.dot`` with fp32 accumulation; the
output is rounded once to x's dtype. So the result differs from "dequantize, then ``F.linear``" by the
summation order only.

Groups and act-order: every K row looks its group up through ``g_idx`` (scale and zero gathered per row),
which serves act-order checkpoints as they are: no permuted weight copy, no permutation of ``x``. When
``g_idx`` is the plain ``col // group_size`` (or the group size is -1) and the group size is a multiple of
``BK``, a K step lies inside one group and its scale / zero row is read once (``SCALAR_GROUP``).

Variants (one kernel, two launch shapes):

* tiled, ``M > SPLIT_K_MAX_ROWS``: a program per ``BM x BN`` output tile over the whole of K;
* split-K, ``M <= SPLIT_K_MAX_ROWS`` (decode, where reading the weight dominates): ``BM = 16`` holds every row,
  K is cut into slices so that about :data:`PROGRAMS_PER_SM` programs per SM run, each slice writes fp32
  partials ``[S, M, N]`` that torch sums (deterministic; no atomics).

Served: bits 2, 4, 8; any group size (also -1 and a partial last group); any ``in`` / ``out``; fp16 / bf16
activations; CUDA tensors (CPU tensors too when ``TRITON_INTERPRET=1`` was set before this module was imported,
as the tests do). Not served (``backends/triton.py`` says why): 3 bits (values straddle int32 words; the
dequantize path serves them), fp32 activations (``tl.dot`` would round them to TF32), bf16 below compute
capability 8.0. Block sizes are fixed per batch class (:data:`_TILES`), not autotuned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import contiguous_groups

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # the module stays importable; the reason says why nothing runs
    triton = tl = None
    IMPORT_ERROR: str | None = f"triton is not importable ({exc})"
else:
    IMPORT_ERROR = None

TRITON_BITS = (2, 4, 8)
SPLIT_K_MAX_ROWS = 16
PROGRAMS_PER_SM = 4
_MAX_OFFSET = 2**31 - 1  # the kernels index with int32


def _jit(**kwargs):
    """``triton.jit`` (with ``kwargs``) when triton is importable; the plain function otherwise."""
    return lambda fn: fn if triton is None else triton.jit(fn, **kwargs)


# sizes that only bound loops or index small tables are not specialized on (fewer compiles per layer shape);
# N and K stay specialized: they are row strides, and their alignment lets loads vectorize
@_jit(do_not_specialize=["M", "NZ", "k_steps", "group"])
def _packed_mm_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, out_ptr,
    M, N, K, NZ, k_steps, group,
    BITS: tl.constexpr, SCALAR_GROUP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_blocks = tl.cdiv(N, BN)
    rm = (pid // n_blocks) * BM + tl.arange(0, BM)
    rn = (pid % n_blocks) * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    z_shift = (rn % PER) * BITS
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_first = split * k_steps * BK
    for step in range(0, k_steps):
        k0 = k_first + step * BK
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        kn_ok = k_ok[:, None] & n_ok[None, :]
        words = tl.load(qw_ptr + (rk // PER)[:, None] * N + rn[None, :], mask=kn_ok, other=0)
        codes = (words >> ((rk % PER) * BITS)[:, None]) & MASK
        if SCALAR_GROUP:
            g = k0 // group
            g_ok = n_ok & (k0 < K)  # the last K slice may run past K
            scale = tl.load(s_ptr + g * N + rn, mask=g_ok, other=0.0)[None, :]
            zw = tl.load(qz_ptr + g * NZ + rn // PER, mask=g_ok, other=0)[None, :]
        else:
            g = tl.load(g_ptr + rk, mask=k_ok, other=0)
            scale = tl.load(s_ptr + g[:, None] * N + rn[None, :], mask=kn_ok, other=0.0)
            zw = tl.load(qz_ptr + g[:, None] * NZ + (rn // PER)[None, :], mask=kn_ok, other=0)
        zero = (((zw >> z_shift[None, :]) & MASK) + 1) & MASK
        w = ((codes - zero).to(tl.float32) * scale.to(tl.float32)).to(x.dtype)
        acc = tl.dot(x, w, acc)
    out = out_ptr + split * M * N + rm[:, None] * N + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def interpreted() -> bool:
    """True when the kernels were built for the Triton interpreter (``TRITON_INTERPRET=1`` at import)."""
    return triton is not None and type(_packed_mm_kernel).__name__ == "InterpretedFunction"


@dataclass(frozen=True)
class PackedWeights:
    """The GPTQ buffers as the kernel reads them (contiguous, on one device)."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    in_features: int
    out_features: int
    group: int  # group length when g_idx == col // group (in_features for -1); 0: rows look up g_idx


def packed_weights(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    in_features: int,
    out_features: int,
) -> PackedWeights:
    """Wrap the buffers for :func:`triton_matmul` (checks g_idx once for the contiguous-groups fast path)."""
    regular = contiguous_groups(g_idx, group_size)
    group = (in_features if group_size == -1 else group_size) if regular else 0
    return PackedWeights(
        qweight.contiguous(),
        qzeros.contiguous(),
        scales.contiguous(),
        g_idx.to(torch.int32).contiguous(),
        bits,
        in_features,
        out_features,
        group,
    )


def _block_k(w: PackedWeights, cap: int) -> tuple[int, bool]:
    """(BK, SCALAR_GROUP): the largest BK <= cap in 64/32/16 with every K step inside one group, else cap
    with per-row g_idx lookups."""
    if w.group == w.in_features and w.group > 0:
        return cap, True
    for bk in (64, 32, 16):
        if bk <= cap and w.group and w.group % bk == 0:
            return bk, True
    return cap, False


# (largest M, BM, BN, largest BK, warps, stages) per batch class; compiled for sm_90 without register spills
# (tests/ops/test_ops_triton_compile.py), to be tuned with bench/ops.py --kernels
_TILES = ((SPLIT_K_MAX_ROWS, 16, 64, 64, 8, 3), (32, 32, 64, 64, 8, 3), (64, 64, 64, 64, 8, 3), (None, 64, 128, 32, 8, 4))


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def triton_matmul(x2: torch.Tensor, w: PackedWeights) -> torch.Tensor:
    """``x2[M, in] @ dequant(W)^T`` in x2's dtype (fp16 / bf16, on the weights' device)."""
    rows, cols = x2.shape
    if cols != w.in_features:
        raise ValueError(f"x2 must have {w.in_features} columns, got {tuple(x2.shape)}")
    n = w.out_features
    max_rows = _MAX_OFFSET // max(cols, n)  # the kernel's offsets are int32
    if rows > max_rows:
        return torch.cat([triton_matmul(part, w) for part in x2.split(max_rows)])
    x2 = x2.contiguous()
    _, bm, bn, bk_cap, warps, stages = next(t for t in _TILES if t[0] is None or rows <= t[0])
    bk, scalar = _block_k(w, bk_cap)
    k_blocks = triton.cdiv(cols, bk)
    n_blocks = triton.cdiv(n, bn)
    if rows <= SPLIT_K_MAX_ROWS:  # decode: cut K so that ~PROGRAMS_PER_SM programs per SM stream the weight
        wanted = triton.cdiv(PROGRAMS_PER_SM * _sm_count(x2.device), n_blocks)
        k_steps = triton.cdiv(k_blocks, max(1, min(k_blocks, wanted)))
        split = triton.cdiv(k_blocks, k_steps)
    else:
        k_steps, split = k_blocks, 1
    out = torch.empty(split, rows, n, dtype=x2.dtype if split == 1 else torch.float32, device=x2.device)
    grid = (triton.cdiv(rows, bm) * n_blocks, split)
    _packed_mm_kernel[grid](
        x2, w.qweight, w.qzeros, w.scales, w.g_idx, out,
        rows, n, cols, w.qzeros.shape[1], k_steps, max(w.group, 1),
        BITS=w.bits, SCALAR_GROUP=scalar, BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out[0] if split == 1 else out.sum(0).to(x2.dtype)

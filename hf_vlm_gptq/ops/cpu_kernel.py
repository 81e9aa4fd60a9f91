"""What the fused CPU kernels (``cpu_fused.py``: AVX512-BF16, ``cpu_amx.py``: AMX, ``cpu_avx2.py``: AVX2 /
AVX-512) share: the layer data they read (:class:`FusedWeights`, checked once per layer; for act-order layers
a copy sorted by group, :func:`sorted_by_group`), their thread choice, how a call reaches a loaded kernel, and
the probe layers their once-per-process self-check runs against dequantize + matmul."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .packing import contiguous_groups, dequantize_packed, pack_gptq, pack_rows, unpack_codes, unpack_zeros

SERIAL_MACS = 1 << 20  # below this many multiply-adds a second thread costs more (fork / join) than it saves
KERNEL_BITS = (2, 4, 8)  # the bit widths both kernels take


@dataclass
class FusedWeights:
    """What the kernel reads for one layer, checked once (built on first use, cached by the module)."""

    qweight: torch.Tensor  # int32 [ceil(in / 8), out], the checkpoint buffer
    scales: torch.Tensor  # float16 [n_groups, out], the checkpoint buffer
    zeros: torch.Tensor  # uint8 [n_groups, out]
    g_idx: torch.Tensor  # int32 [in], contiguous
    regular_group: int  # columns per group when g_idx is col // group (a multiple of 8, or all), else 0
    bits: int

    @property
    def small_batch_path(self) -> bool:
        """Whether the kernel's 1-4 row paths (4-bit, groups of consecutive columns) serve this layer."""
        return self.bits == 4 and self.regular_group > 0

    def op_fields(self) -> tuple:
        """The fields in the order of the kernels' torch ops (after ``x2`` and ``bias``)."""
        return self.qweight, self.scales, self.zeros, self.g_idx, self.regular_group, self.bits

    @property
    def in_features(self) -> int:
        return self.g_idx.numel()

    @property
    def out_features(self) -> int:
        return self.zeros.shape[1]


def build_fused(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    group_size: int,
    bits: int = 4,
) -> FusedWeights:
    """Kernel data from the checkpoint buffers ``qweight`` / ``scales``, the unpacked zero points
    ``[n_groups, out]``, ``g_idx``, the group size and the bit width. The kernel indexes memory with these unchecked,
    so shapes, dtypes and the range of ``g_idx`` are checked here. Groups of consecutive columns (no
    act-order) whose size is a multiple of 8 enable the small-batch path."""
    n_groups, out_features = zeros.shape
    in_features = g_idx.numel()
    if scales.dtype != torch.float16 or tuple(scales.shape) != (n_groups, out_features):
        raise ValueError(f"scales must be float16 {(n_groups, out_features)}, got {scales.dtype} {tuple(scales.shape)}")
    if bits not in KERNEL_BITS:
        raise ValueError(f"bits must be one of {KERNEL_BITS}, got bits={bits!r}")
    per_word = 32 // bits
    if qweight.dtype != torch.int32 or qweight.shape[1] != out_features or qweight.shape[0] * per_word < in_features:
        raise ValueError(
            f"qweight must be int32 [>= {in_features} / {per_word}, {out_features}], "
            f"got {qweight.dtype} {tuple(qweight.shape)}"
        )
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
        raise ValueError(f"g_idx values must lie in [0, {n_groups}), got [{int(g_idx.min())}, {int(g_idx.max())}]")
    regular = 0
    if contiguous_groups(g_idx, group_size):
        if group_size == -1 or group_size >= in_features:
            regular = in_features
        elif group_size % 8 == 0:
            regular = group_size
    return FusedWeights(
        qweight=qweight.contiguous(),
        scales=scales.contiguous(),
        zeros=zeros.to(torch.uint8).contiguous(),
        g_idx=g_idx.to(torch.int32).contiguous(),
        regular_group=regular,
        bits=bits,
    )


def fused_weights_of(module: Any, what: str) -> FusedWeights | str:
    """The kernel data of a packed module, or why ``what`` cannot read it (scales not float16)."""
    if module.scales.dtype != torch.float16:
        return f"scales are {module.scales.dtype} (the {what} reads float16 scales)"
    zeros = unpack_zeros(module.qzeros, module.bits, module.out_features)
    return build_fused(module.qweight, module.scales, zeros, module.g_idx, module.group_size, module.bits)


@dataclass
class GroupSorted:
    """A kernel's data for one layer; for act-order layers (groups scattered over the input columns) a copy
    whose input columns are sorted by group (the groups then consecutive, so the kernels' regular paths
    serve), with ``input_order`` the columns of x in that order (int32; the kernels gather them while they
    copy x; None: the checkpoint's own layout)."""

    fused: FusedWeights
    input_order: torch.Tensor | None = None


def sorted_by_group(w: FusedWeights, group_size: int) -> GroupSorted:
    """``w`` with its input columns sorted by group (stable: within a group, the checkpoint's order): the
    codes repacked in that order, the same scales and zero points. Exact: the same products, summed in
    another order. Layers whose groups are already consecutive come back as they are."""
    if w.regular_group > 0:
        return GroupSorted(w)
    order = torch.argsort(w.g_idx, stable=True)
    codes = unpack_codes(w.qweight, w.bits, w.in_features)[:, order]  # [out, in]
    qweight = pack_rows(codes.t(), w.bits)
    fused = build_fused(qweight, w.scales, w.zeros, w.g_idx[order], group_size, w.bits)
    return GroupSorted(fused, order.to(torch.int32).contiguous())


def check_x_order(x_order: torch.Tensor | None, in_features: int) -> int | None:
    """The data pointer of a column order of x for a kernel (None for none), checked: the kernels index
    memory with it."""
    if x_order is None:
        return None
    k = in_features
    if x_order.dtype != torch.int32 or tuple(x_order.shape) != (k,) or not x_order.is_contiguous() or (
            k and (int(x_order.min()) < 0 or int(x_order.max()) >= k)):
        raise ValueError(f"x_order must be contiguous int32 [{k}] with values in [0, {k}), "
                         f"got {x_order.dtype} {tuple(x_order.shape)}")
    return x_order.data_ptr()


def balanced_chunk(rows: int, limit: int) -> int:
    """Rows per chunk when ``rows`` go to a kernel in calls of at most ``limit`` rows: balanced, so that past
    the limit every chunk holds more than half of it (none drops to a small-batch path)."""
    parts = -(-rows // limit)  # ceil
    return -(-rows // parts)


def kernel_threads(rows: int, w: FusedWeights) -> int:
    """Threads for one call: one below :data:`SERIAL_MACS` multiply-adds, else torch's intra-op count."""
    return 1 if rows * w.out_features * w.in_features < SERIAL_MACS else torch.get_num_threads()


def run_kernel(kernel: Callable[[], Any], state: dict, call: Callable, what: str, x2: torch.Tensor,
               w: FusedWeights, bias: torch.Tensor | None) -> torch.Tensor:
    """``call(fn, x2, w, bias)`` on the checked kernel ``kernel()``; raises, saying why, when it is unavailable."""
    fn = kernel()
    if fn is None:
        raise RuntimeError(f"the {what} is unavailable: {state.get('reason')}")
    return call(fn, x2, w, bias)


# (bits, in, out, group_size, act_order, rows): the kernel's paths -- 1-row and 2-4-row 4-bit paths, the GEMM
# micro-kernel (5+ rows, 2/8 bits, act-order), a partial last group, and several threads (>= SERIAL_MACS)
PROBES = (
    (4, 160, 32, 64, False, (1, 3, 4, 7)),
    (4, 256, 64, 64, False, (64,)),
    (4, 128, 32, 32, True, (1, 6)),
    (2, 128, 16, 64, False, (5,)),
    (8, 96, 48, -1, False, (2, 9)),
)


def _probe_layer(bits: int, in_f: int, out_f: int, group_size: int, act_order: bool, gen: torch.Generator):
    """Random packed buffers of one layer (any codes, zero points and fp16 scales), and its bias."""
    n_groups = 1 if group_size == -1 else -(-in_f // group_size)
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 2**bits, (out_f, n_groups), generator=gen, dtype=torch.int32)
    scales = (torch.rand(out_f, n_groups, generator=gen) * 0.05 + 0.002).half().float()
    g_idx = torch.zeros(in_f, dtype=torch.int32) if group_size == -1 else torch.arange(in_f, dtype=torch.int32) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(in_f, generator=gen)].contiguous()
    packed = pack_gptq(codes, scales, zeros, g_idx, bits)
    bias = torch.randn(out_f, generator=gen).to(torch.bfloat16)
    return packed, bias


def kernel_probes(call, dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,), layers=PROBES):
    """Probes of ``call(x, w, bias)`` against dequantize + matmul in float64 on random probe layers (each of
    ``layers``: (bits, in, out, group_size, act_order, rows)), for inputs of each of ``dtypes``.

    Bound per element: 2**-7 of |reference| + 2**-7 of sum |x| |w| (a correct kernel stays within bf16
    rounding of the output and, where it does not round the weight, of the weight: ~4x below), and 1%
    relative error overall. The reference weight is dequantized in the input's dtype."""
    gen = torch.Generator().manual_seed(1234)
    for bits, in_f, out_f, group_size, act_order, all_rows in layers:
        packed, bias = _probe_layer(bits, in_f, out_f, group_size, act_order, gen)
        w = build_fused(packed["qweight"], packed["scales"], unpack_zeros(packed["qzeros"], bits, out_f),
                        packed["g_idx"], group_size, bits)
        where = f"{bits}-bit {out_f}x{in_f} group {group_size}{' act-order' if act_order else ''}"
        for dtype in dtypes:
            dense = dequantize_packed(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"],
                                      bits=bits, in_features=in_f, out_features=out_f, group_size=group_size,
                                      dtype=dtype).double()
            for rows in all_rows:
                yield functools.partial(_probe, call, w, dense, bias.to(dtype), rows, gen,
                                        f"{where}, {rows} rows, {dtype}", dtype)


def _probe(call, w: FusedWeights, dense: torch.Tensor, bias: torch.Tensor, rows: int, gen: torch.Generator,
           where: str, dtype: torch.dtype = torch.bfloat16) -> str | None:
    x = torch.randn(rows, w.in_features, generator=gen).to(dtype)
    y = call(x, w, bias).double()
    ref = x.double() @ dense.T + bias.double()
    scale = x.double().abs() @ dense.abs().T
    if not bool(torch.isfinite(y).all()):
        return f"non-finite outputs ({where})"
    err = (y - ref).abs()
    if not bool((err <= 2**-7 * (ref.abs() + scale) + 1e-6).all()):
        return f"max error {float(err.max()):.3g} against outputs up to {float(ref.abs().max()):.3g} ({where})"
    rel = float((y - ref).norm() / ref.norm().clamp_min(1e-30))
    if not math.isfinite(rel) or rel > 1e-2:
        return f"relative error {rel:.3g} ({where})"
    return None



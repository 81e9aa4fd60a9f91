"""Streaming layer Hessians ``H = 2/n * sum_i w_i x_i x_i^T`` for GPTQ (token weights ``w_i``, default 1).

Rows ``x_i`` are the inputs a layer sees: one per token for a Linear, one per input patch for a conv (the
patch flattened in ``conv.weight.reshape(out, -1)`` column order). ``n`` counts those rows. The running
mean is updated in place per batch (as in the IST-DASLab reference), so accumulating in chunks gives the
same matrix as one pass, up to float rounding.

Half-precision rows on CUDA (bf16 / fp16 into the default fp32 accumulator) skip the fp32 copy:
``X^T X`` comes from one tensor-core ``torch.mm(x.t(), x, out_dtype=torch.float32)`` (products of bf16 /
fp16 values are exact in fp32, so only the summation order differs from fp32 accumulation), then
``H <- H * n_old / n + (2 / n) * X^T X``. That ``mm`` overload has no CPU kernel (torch 2.14). On CPUs with
AVX512-BF16, unweighted bf16 rows of a wide enough matrix skip the copy too: ``cpu_gram.py``'s kernel adds
their ``X^T X`` (float32 sums of exact products) into the upper block triangle, where it is the faster of the
two on this CPU (:func:`gram_kernel_wins`: timed once per process; ``vdpbf16ps`` loses to the float32 product
on some Intel Xeons). Other rows take the fp32
path: rows cast to fp32, one ``addmm_`` with ``alpha = 2 / n``; on CPU a wide matrix takes only its upper
block triangle from products of column blocks (the same dot products as one ``addmm_``) and mirrors it into
the lower one (:func:`add_xtx`), the products on the measured float32 engine (``dense.py``: oneDNN from the
rows' transpose, or BLAS).

Token weights (``weights=``, one per row, or one number for the whole batch; >= 0): ``H = X^T diag(w) X``
up to the same ``2 / n`` (``n`` still counts rows), computed by scaling each row by ``sqrt(w_i)`` on the
fp32 path, so all-ones weights give exactly the unweighted matrix. They carry per-modality weights (image,
video, text tokens) and importance weights from a backward pass.

``AsymmetricAccumulator`` (GPTAQ, see ``gptq.py``) takes pairs of rows, the quantized model's ``x~`` and
the float model's ``x`` for the same token: ``H = 2/n * sum w x~ x~^T`` and
``cross = 2/n * sum w (x - x~) x~^T`` (``with_hessian=False``: only ``cross``). Unweighted bf16 rows that
``cpu_gram`` takes stay bf16 until the flush: ``H`` from its kernel, as a plain accumulator's, and ``cross`` on
the float32 path, cast chunk by chunk in the transposes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from . import cpu_gram, dense, kernel_cache
from .conv_rows import unfold_conv_input
from .result import all_finite
from .scratch import MatrixPool

logger = logging.getLogger(__name__)

XtX = Callable[[torch.Tensor], torch.Tensor]
_HALF = (torch.bfloat16, torch.float16)
# bytes of rows an accumulator collects before they go into the matrix in one product (4M fp32 values, 8M
# bf16 ones): one rescale and one large matmul instead of one of each per small batch
_FLUSH_BYTES = 1 << 24
# column block of the triangular update on CPU (narrower matrices: one addmm_); 128 below 1024 columns
_TRIANGLE_BLOCK = 256
_TRIANGLE_FROM = 384
# the same on oneDNN (dense.py), whose products are fast on narrower blocks
_GRAM_BLOCK = 128
_GRAM_FROM = 256


def _mm_out_fp32(rows: torch.Tensor) -> torch.Tensor:
    """``rows^T rows`` in fp32 from half-precision rows, on CUDA tensor cores."""
    return torch.mm(rows.t(), rows, out_dtype=torch.float32)


def half_xtx(rows: torch.Tensor, acc_dtype: torch.dtype) -> XtX | None:
    """The fp32-output ``X^T X`` for ``rows`` that may skip the fp32 cast (CUDA, bf16 / fp16 rows, fp32
    accumulator), or None: the fp32 path applies."""
    if rows.is_cuda and rows.dtype in _HALF and acc_dtype == torch.float32:
        return _mm_out_fp32
    return None


def update_running_hessian(h: torch.Tensor, rows: torch.Tensor, n_old: int, xtx: XtX) -> None:
    """In place: ``h <- h * n_old / n + (2 / n) * xtx(rows)`` with ``n = n_old + len(rows)``."""
    total = n_old + rows.shape[0]
    h.mul_(n_old / total).add_(xtx(rows), alpha=2.0 / total)


# bf16 rows x columns the kernel and the float32 path are timed on (each a millisecond or two)
_GRAM_PROBE = (1024, 512)
_gram_wins: dict[int, bool] = {}  # thread count -> whether cpu_gram's kernel beat the float32 path


def gram_kernel_wins() -> bool:
    """Whether ``cpu_gram``'s kernel adds bf16 rows faster than the float32 path (cast, then the float32
    product) on this CPU with the current thread count: both timed on a probe, best of 3 in turns, once per
    process and thread count. The kernel's ``vdpbf16ps`` is not faster everywhere (on some Intel Xeons it
    runs at half the rate of float32 FMAs)."""
    threads = torch.get_num_threads()
    if threads not in _gram_wins:
        rows, columns = _GRAM_PROBE
        x = torch.randn(rows, columns, generator=torch.Generator().manual_seed(0)).bfloat16()
        h = torch.zeros(columns, columns)
        fns = {"kernel": lambda: cpu_gram.add_gram(h, [x], 1.0),
               "float32 path": lambda: _add_xtx_float32(h, [x.float()], 1.0)}
        best = kernel_cache.best_seconds_in_turns(fns, lambda _name, fn: fn())
        _gram_wins[threads] = best["kernel"] < best["float32 path"]
        logger.info("bf16 Hessian rows: %s (%d rows into %d columns, %d threads: kernel %.2f ms, float32 path "
                    "%.2f ms)", "the cpu_gram kernel" if _gram_wins[threads] else "the float32 path", rows,
                    columns, threads, best["kernel"] * 1e3, best["float32 path"] * 1e3)
    return _gram_wins[threads]


def gram_takes(rows: torch.Tensor, h: torch.Tensor) -> bool:
    """Whether ``rows`` go into ``h`` through ``cpu_gram``'s kernel: it takes them (``cpu_gram.takes``) and is
    the faster path here (:func:`gram_kernel_wins`)."""
    return cpu_gram.takes(rows, h) and gram_kernel_wins()


def add_xtx(h: torch.Tensor, rows: torch.Tensor | list[torch.Tensor], alpha: float) -> None:
    """In place, for a symmetric ``h``: ``h += alpha * rows^T rows`` (``rows``: one ``[N, n]`` matrix or a
    list of such pieces, read as their concatenation). float32 CPU products go to the measured engine
    (``dense.py``: oneDNN, from the rows' transpose, or BLAS); on CPU a wide ``h`` takes only its upper block
    triangle (block row ``i``: one product ``rows[:, i]^T rows[:, i:]``) and the lower one is copied from it,
    so ``h`` stays exactly symmetric off the diagonal blocks; elsewhere one product. bf16 rows that
    :func:`gram_takes` go through its kernel (the same triangle and mirror, by 64-column panels)."""
    pieces = [rows] if isinstance(rows, torch.Tensor) else list(rows)
    if gram_takes(pieces[0], h):  # bf16 rows on AVX512-BF16: no float32 copy (cpu_gram.py)
        cpu_gram.add_gram(h, pieces, alpha)
        return
    _add_xtx_float32(h, pieces, alpha)


def _add_xtx_float32(h: torch.Tensor, pieces: list[torch.Tensor], alpha: float) -> None:
    """:func:`add_xtx` for rows of ``h``'s dtype (the float32 path)."""
    n = h.shape[0]
    if dense.takes(h, *pieces):
        rows_t = dense.transposed(pieces)
        if n < _GRAM_FROM:
            h.add_(dense.linear(rows_t, rows_t), alpha=alpha)
            return
        block = _GRAM_BLOCK
        for i in range(0, n, block):
            h[i : i + block, i:].add_(dense.linear(rows_t[i : i + block], rows_t[i:]), alpha=alpha)
    else:
        rows = _joined(pieces)
        if h.device.type != "cpu" or n < _TRIANGLE_FROM:
            h.addmm_(rows.t(), rows, alpha=alpha)
            return
        block = _TRIANGLE_BLOCK if n >= 1024 else _TRIANGLE_BLOCK // 2
        for i in range(0, n, block):
            h[i : i + block, i:].addmm_(rows[:, i : i + block].t(), rows[:, i:], alpha=alpha)
    for i in range(0, n - block, block):
        h[i + block :, i : i + block].copy_(h[i : i + block, i + block :].t())


def row_scales(weights: torch.Tensor | float, n: int, like: torch.Tensor) -> torch.Tensor:
    """``sqrt(weights)`` as a column ``[n, 1]`` (or a 0-d tensor for one number) in ``like``'s dtype/device;
    weights must be finite and >= 0, one per row."""
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
    if w.dim() > 0:
        w = w.reshape(-1)
        if w.shape[0] != n:
            raise ValueError(f"weights must have one entry per input row ({n}), got {w.shape[0]}")
    if not all_finite(w) or bool((w < 0).any()):
        raise ValueError("weights must be finite and >= 0")
    w = w.sqrt()
    return w.unsqueeze(1) if w.dim() else w


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class HessianAccumulator:
    """Accumulates ``2/n * X^T X`` over batches of layer inputs (fp32 unless told otherwise).

    Batches are collected (up to ``_FLUSH_BYTES`` of them) and added to the matrix together, when the
    collection is full and when :attr:`hessian` is read. ``pool`` (``scratch.py``): where the matrix comes from
    (the caller may give it back once done with it)."""

    def __init__(
        self, columns: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
        pool: MatrixPool | None = None,
    ):
        if isinstance(columns, bool) or not isinstance(columns, int) or columns <= 0:
            raise ValueError(f"columns must be a positive int, got columns={columns!r}")
        self.columns = columns
        self._pool = pool if pool is not None else MatrixPool()
        self._h = self._zeros(dtype, device)
        self._in_matrix = 0  # rows already in self._h
        self._pending: list[torch.Tensor] = []  # rows (scaled by sqrt(weight)) not yet in self._h
        self._pending_rows = 0

    def _zeros(self, dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
        device = device if device is not None else torch.get_default_device()
        return self._pool.zeros((self.columns, self.columns), dtype, device)

    @property
    def nsamples(self) -> int:
        """Rows added so far."""
        return self._in_matrix + self._pending_rows

    @property
    def hessian(self) -> torch.Tensor:
        """The accumulated matrix ``[columns, columns]`` (zeros before any input)."""
        self._flush()
        return self._h

    def matrices(self) -> list[torch.Tensor]:
        """The matrices it accumulates into (for the caller to give back to the pool when done)."""
        return [self._h]

    def add_batch(self, x: torch.Tensor, weights: torch.Tensor | float | None = None) -> None:
        """Add Linear inputs ``x[..., columns]`` (every leading index is one sample row); ``weights``: one
        per row (shape ``x.shape[:-1]``) or one number for all, >= 0."""
        if x.shape[-1] != self.columns:
            raise ValueError(f"x must end in {self.columns} features, got shape {tuple(x.shape)}")
        self._add_rows(x.reshape(-1, self.columns), weights)

    def add_conv_batch(self, x: torch.Tensor, conv_module: nn.Module,
                       weights: torch.Tensor | float | None = None) -> None:
        """Add Conv2d / Conv3d inputs; see :func:`unfold_conv_input` for the accepted shapes (``weights``: one
        per unfolded patch row, or one number)."""
        self._add_rows(unfold_conv_input(x, conv_module), weights)

    def _add_rows(self, rows: torch.Tensor, weights: torch.Tensor | float | None = None) -> None:
        if rows.shape[-1] != self.columns:
            raise ValueError(f"input rows must have {self.columns} columns, got {rows.shape[-1]}")
        n = rows.shape[0]
        if n == 0:
            return
        rows = rows.to(device=self._h.device)
        if weights is not None or (half_xtx(rows, self._h.dtype) is None and not gram_takes(rows, self._h)):
            rows = rows.to(self._h.dtype)
        if not all_finite(rows):
            raise ValueError("x contains non-finite values (inf or nan)")
        if weights is not None:
            rows = rows * row_scales(weights, n, rows)
        if self._pending and self._pending[0].dtype != rows.dtype:
            self._flush()
        self._pending.append(rows)
        self._pending_rows += n
        if self._pending_rows * self.columns * rows.element_size() >= _FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        """Add the collected rows: ``H <- H * n_old / n + (2 / n) * X^T X``."""
        if self._pending:
            self._add_to_matrix(self._pending)
            self._pending, self._pending_rows = [], 0

    def _add_to_matrix(self, pieces: list[torch.Tensor]) -> None:
        """Add rows (pieces of one matrix, read as their concatenation) to the running matrix."""
        n = sum(p.shape[0] for p in pieces)
        xtx = half_xtx(pieces[0], self._h.dtype)
        if xtx is not None:
            update_running_hessian(self._h, _joined(pieces), self._in_matrix, xtx)
        else:
            total = self._in_matrix + n
            add_xtx(self._h.mul_(self._in_matrix / total), pieces, 2.0 / total)
        self._in_matrix += n


class AsymmetricAccumulator(HessianAccumulator):
    """``H`` of the quantized model's inputs plus GPTAQ's ``cross = 2/n * sum w (x - x~) x~^T`` (fp32 by
    default); feed it with :meth:`add_pair`. ``cross`` is exactly 0 when the two inputs are equal."""

    def __init__(
        self, columns: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
        with_hessian: bool = True, pool: MatrixPool | None = None,
    ):
        super().__init__(columns, device, dtype, pool)
        self._cross = self._zeros(dtype, device)
        self._with_hessian = with_hessian  # False: only ``cross`` (the caller accumulates H elsewhere)
        self._pending_float: list[torch.Tensor] = []  # the float model's rows of self._pending

    def matrices(self) -> list[torch.Tensor]:
        return [self._h, self._cross]

    @property
    def cross(self) -> torch.Tensor:
        """The accumulated ``[columns, columns]`` matrix ``2/n * sum w (x - x~) x~^T``."""
        self._flush()
        return self._cross

    def add_pair(self, x_quant: torch.Tensor, x_float: torch.Tensor,
                 weights: torch.Tensor | float | None = None) -> None:
        """Add Linear inputs of the same tokens: ``x_quant`` (the quantized model's) and ``x_float`` (the float
        model's), both ``[..., columns]`` with the same shape; ``weights`` as in :meth:`add_batch`."""
        if x_quant.shape != x_float.shape or x_quant.shape[-1] != self.columns:
            raise ValueError(f"x_quant and x_float must have the same shape ending in {self.columns}, got "
                             f"{tuple(x_quant.shape)} and {tuple(x_float.shape)}")
        xq = x_quant.detach().reshape(-1, self.columns).to(device=self._h.device)
        xf = x_float.detach().reshape(-1, self.columns).to(device=self._h.device)
        n = xq.shape[0]
        if n == 0:
            return
        # bf16 rows that cpu_gram takes stay bf16: H from its kernel, the cross term cast chunk by chunk
        if weights is not None or xf.dtype != xq.dtype or not gram_takes(xq, self._h):
            xq, xf = xq.to(self._h.dtype), xf.to(self._h.dtype)
        if not (all_finite(xq) and all_finite(xf)):
            raise ValueError("x contains non-finite values (inf or nan)")
        if weights is not None:
            scale = row_scales(weights, n, xq)
            xq, xf = xq * scale, xf * scale
        if self._pending and self._pending[0].dtype != xq.dtype:
            self._flush()
        self._pending.append(xq)
        self._pending_float.append(xf)
        self._pending_rows += n
        if self._pending_rows * self.columns * xq.element_size() >= _FLUSH_BYTES:
            self._flush()

    def _add_rows(self, rows: torch.Tensor, weights: torch.Tensor | float | None = None) -> None:
        self.add_pair(rows, rows, weights)  # add_batch / add_conv_batch: equal inputs

    def _flush(self) -> None:
        if self._pending:
            quant, floats = self._pending, self._pending_float
            self._pending, self._pending_float, self._pending_rows = [], [], 0
            total = self._in_matrix + sum(piece.shape[0] for piece in quant)
            self._cross.mul_(self._in_matrix / total)
            dtype = self._cross.dtype
            if dense.takes(self._cross):  # (x - x~)^T x~ from the two transposes (dense.py), cast on the way
                self._cross.add_(dense.linear(dense.transposed(floats, minus=quant, dtype=dtype),
                                              dense.transposed(quant, dtype=dtype)), alpha=2.0 / total)
            else:
                xq = _joined(quant).to(dtype)
                self._cross.addmm_((_joined(floats).to(dtype) - xq).t(), xq, alpha=2.0 / total)
            if self._with_hessian:
                self._add_to_matrix(quant)
            else:
                self._in_matrix = total

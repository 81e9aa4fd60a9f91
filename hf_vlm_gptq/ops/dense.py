"""Dense float32 products on the CPU through the faster of the two engines inside torch.

torch sends a float32 CPU matmul to its BLAS (MKL in the x86 wheels). oneDNN, also inside torch, computes the
same product through ``torch.ops.mkldnn._linear_pointwise`` (the op inductor emits for a CPU Linear). Which
one is faster depends on the processor: MKL picks its code path by CPU vendor, oneDNN by instruction set, so
on some CPUs one runs twice as fast as the other. Both are IEEE float32 products with float32 accumulation;
they differ only in summation order, and each is deterministic (also across thread counts).

The engine (:func:`engine`) is measured once per process at the first float32 CPU product: one product of
a few hundred rows, each engine in turns, best of :data:`REPS`, with the results compared (a disagreement
keeps BLAS and says why). oneDNN is taken only where it is :data:`MARGIN` times faster, so on CPUs where the
two are close the plain ``torch`` result stays. ``$HF_VLM_GPTQ_DENSE_ENGINE`` = ``blas`` / ``onednn`` forces
one (``auto``: measure, the default); without oneDNN in this torch build, or with
``torch.backends.mkldnn`` disabled, BLAS serves.

Used where the pipeline spends its float32 time on CPU: the calibration passes' Linears
(:func:`fast_layers`), the Hessian products (``hessian.py``), the solve's factorisations and losses, and
the packed modules' dequantize + matmul backend. :func:`fast_layers` also runs the passes' patch-embedding
convolutions (stride = kernel, no padding) as one product of patch rows (:func:`conv_by_patches`): torch's
Conv3d of a Qwen-style stem is ~7x slower than the same product on CPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
import types
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

ENV_ENGINE = "HF_VLM_GPTQ_DENSE_ENGINE"
ENGINES = ("blas", "onednn")
MARGIN = 1.25  # oneDNN only when at least this much faster than BLAS on the probe product
REPS = 3
_PROBE = (384, 1024, 1024)  # rows, inner, outputs of the probe product (~0.8 GFLOP)
_lock = threading.Lock()
_chosen: list[str] = []  # the measured engine, once known


def _onednn_unavailable() -> str | None:
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN"
    if not torch.backends.mkldnn.enabled:
        return "torch.backends.mkldnn is disabled"
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return "torch.ops.mkldnn._linear_pointwise is missing"
    return None


def _onednn_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # oneDNN takes any strides of a 2-D input, but a weight that is neither contiguous nor the transpose of a
    # contiguous matrix (a sub-block of a larger one) sends it to a reference kernel thousands of times slower
    if not (w.is_contiguous() or w.t().is_contiguous()):
        w = w.contiguous()
    if x.dim() != 2 and not x.is_contiguous():
        x = x.contiguous()
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


def _measure() -> str:
    reason = _onednn_unavailable()
    if reason is not None:
        logger.debug("dense float32 products: BLAS (%s)", reason)
        return "blas"
    gen = torch.Generator().manual_seed(0)
    rows, inner, outs = _PROBE
    x, w = torch.randn(rows, inner, generator=gen), torch.randn(outs, inner, generator=gen)
    try:
        blas, onednn = F.linear(x, w), _onednn_linear(x, w, None)
    except RuntimeError as e:
        logger.warning("dense float32 products: oneDNN failed (%s); using BLAS", e)
        return "blas"
    if not torch.allclose(onednn, blas, rtol=1e-4, atol=1e-4 * float(blas.abs().max())):
        logger.warning("dense float32 products: oneDNN disagrees with BLAS (max difference %.3g); using BLAS",
                       float((onednn - blas).abs().max()))
        return "blas"
    best = {"blas": float("inf"), "onednn": float("inf")}
    for _ in range(REPS):
        for name, run in (("blas", lambda: F.linear(x, w)), ("onednn", lambda: _onednn_linear(x, w, None))):
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    chosen = "onednn" if best["onednn"] * MARGIN <= best["blas"] else "blas"
    logger.info("dense float32 products: %s (a %dx%dx%d product: BLAS %.2f ms, oneDNN %.2f ms, %d threads)",
                "oneDNN" if chosen == "onednn" else "BLAS", rows, inner, outs, best["blas"] * 1e3,
                best["onednn"] * 1e3, torch.get_num_threads())
    return chosen


def engine() -> str:
    """``"onednn"`` or ``"blas"``: the engine of this process's float32 CPU products (see the module docstring);
    ValueError for a ``$HF_VLM_GPTQ_DENSE_ENGINE`` other than ``auto`` / ``blas`` / ``onednn``."""
    forced = os.environ.get(ENV_ENGINE) or "auto"
    if forced not in ("auto", *ENGINES):
        raise ValueError(f"{ENV_ENGINE} must be one of auto, blas, onednn; got {forced!r}")
    if forced == "blas":
        return "blas"
    if forced == "onednn":
        reason = _onednn_unavailable()
        if reason is not None:
            raise ValueError(f"{ENV_ENGINE}=onednn, but {reason}; unset it or set it to blas")
        return "onednn"
    if not _chosen:
        with _lock:
            if not _chosen:
                _chosen.append(_measure())
    return _chosen[0]


def takes(*tensors: torch.Tensor | None) -> bool:
    """Whether products of these operands run on oneDNN: float32 CPU tensors, no autograd, not traced, and
    oneDNN the engine."""
    present = [t for t in tensors if t is not None]
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 and t.numel() > 0 for t in present):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return False
    return not torch.compiler.is_compiling() and engine() == "onednn"


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, bias)`` (``x[..., in] @ w[out, in]^T + bias``) on the measured engine."""
    if takes(x, w, bias) and w.dim() == 2:
        return _onednn_linear(x, w, bias)
    return F.linear(x, w, bias)


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D ``a [m, k]`` and ``b [k, n]`` on the measured engine (``b`` read as ``b^T``'s rows,
    so a ``b`` that is the transpose of a contiguous matrix costs no copy)."""
    if takes(a, b) and a.dim() == 2 and b.dim() == 2:
        return _onednn_linear(a, b.t(), None)
    return a @ b


_TRANSPOSE_ROWS = 64  # rows per chunk of a transposed copy (cache-sized: one whole-matrix transpose is slower)
def transposed(pieces: list[torch.Tensor], minus: list[torch.Tensor] | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """The rows of ``pieces`` (each ``[n_i, d]``) as one contiguous ``[d, sum n_i]`` in ``dtype`` (default: the
    pieces'): their transpose; with ``minus`` (pieces of the same shapes), the transpose of ``pieces - minus``
    computed in ``dtype``, without an untransposed difference or a whole cast copy in between."""
    d = pieces[0].shape[1]
    dtype = dtype or pieces[0].dtype
    out = torch.empty(d, sum(p.shape[0] for p in pieces), dtype=dtype, device=pieces[0].device)
    # the difference of a chunk in row order first: a subtraction into the transposed block runs on strided
    # operands, ~2x slower than this subtraction plus the copy at 512 columns
    diff = None if minus is None else out.new_empty(_TRANSPOSE_ROWS, d)
    at = 0
    for k, piece in enumerate(pieces):
        for i in range(0, piece.shape[0], _TRANSPOSE_ROWS):
            chunk, rows = piece[i : i + _TRANSPOSE_ROWS], min(_TRANSPOSE_ROWS, piece.shape[0] - i)
            if diff is not None and chunk.dtype == dtype:
                chunk = torch.sub(chunk, minus[k][i : i + _TRANSPOSE_ROWS], out=diff[:rows])
            elif diff is not None:  # cast first, then subtract in dtype (exact for bf16 pieces into float32)
                chunk = diff[:rows].copy_(chunk).sub_(minus[k][i : i + _TRANSPOSE_ROWS])
            out[:, at : at + rows].copy_(chunk.t())
            at += rows
    return out


def is_patch_conv(kernel: Sequence[int], stride: Sequence[int], padding: str | Sequence[int],
                  dilation: Sequence[int]) -> bool:
    """Whether a convolution with this geometry only cuts its input into disjoint patches (stride = kernel,
    no padding, no dilation): then it is one product of patch rows (:func:`conv_by_patches`)."""
    no_pad = padding == "valid" or (not isinstance(padding, str) and not any(padding))
    return tuple(stride) == tuple(kernel) and no_pad and all(d == 1 for d in dilation)


def conv_by_patches(x: torch.Tensor, kernel: Sequence[int],
                    product: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """A patch convolution (:func:`is_patch_conv`) of ``x [batch, channels, *spatial]``: the patches as rows
    ``[batch * prod(outputs), channels * prod(kernel)]`` (the flattened weight's column order), ``product``
    of them (``[rows, out_channels]``), back in the conv's layout ``[batch, out, *outputs]``. Trailing inputs
    that fill no whole patch are dropped, as by the conv; ValueError when an input is smaller than the
    kernel."""
    nd, k = len(kernel), tuple(kernel)
    b, c, *spatial = x.shape
    outs = [size // kk for size, kk in zip(spatial, k)]
    if any(o == 0 for o in outs):
        raise ValueError(f"input spatial size {tuple(spatial)} is smaller than the kernel {k}")
    x = x[(..., *[slice(0, o * kk) for o, kk in zip(outs, k)])]
    split = [b, c] + [v for o, kk in zip(outs, k) for v in (o, kk)]
    perm = [0, *[2 + 2 * i for i in range(nd)], 1, *[3 + 2 * i for i in range(nd)]]
    patches = x.reshape(split).permute(perm).reshape(-1, c * math.prod(k))
    y = product(patches)
    y = y.view(b, *outs, y.shape[-1])
    return y.permute(0, nd + 1, *range(1, nd + 1)).contiguous()


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


def _patch_conv_forward(self: nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    nd = len(self.kernel_size)
    if x.dim() != nd + 2 or x.dtype != self.weight.dtype or any(s < k for s, k in zip(x.shape[2:], self.kernel_size)):
        return type(self).forward(self, x)  # unbatched, mixed dtypes, too small: the conv's own checks and errors
    weight = self.weight.reshape(self.out_channels, -1)
    return conv_by_patches(x, self.kernel_size, lambda rows: linear(rows, weight, self.bias))


def _plain(module: nn.Module, cls: type[nn.Module]) -> bool:
    """A module of exactly ``cls``'s forward, not replaced on the instance nor wrapped by accelerate."""
    return (isinstance(module, cls) and type(module).forward is cls.forward and "forward" not in module.__dict__
            and not hasattr(module, "_hf_hook"))


@contextlib.contextmanager
def fast_layers(model: nn.Module) -> Iterator[None]:
    """While it is active, the calibration passes' plain layers compute faster, to rounding: ``nn.Linear``
    through :func:`linear` (nothing changes where BLAS is the engine), and patch-embedding ``nn.Conv2d`` /
    ``nn.Conv3d`` (:func:`is_patch_conv`, one group) as one product of patch rows. Modules whose ``forward``
    is already replaced on the instance (accelerate's hooks, other wrappers) or whose class has its own
    ``forward`` keep theirs; on exit every patched module gets its class's ``forward`` back."""
    patched: list[tuple[nn.Module, Callable]] = []
    onednn = engine() == "onednn"
    for module in model.modules():
        if onednn and _plain(module, nn.Linear):
            patched.append((module, _linear_forward))
        elif ((_plain(module, nn.Conv2d) or _plain(module, nn.Conv3d)) and module.groups == 1
              and is_patch_conv(module.kernel_size, module.stride, module.padding, module.dilation)):
            patched.append((module, _patch_conv_forward))
    for module, forward in patched:
        module.forward = types.MethodType(forward, module)
    try:
        yield
    finally:
        for module, forward in patched:
            if getattr(module.__dict__.get("forward"), "__func__", None) is forward:
                del module.forward

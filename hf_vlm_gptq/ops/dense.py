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
(:func:`fast_linears`), the Hessian products (``hessian.py``), the solve's factorisations and losses, and
the packed modules' dequantize + matmul backend.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import types
from collections.abc import Iterator

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


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


@contextlib.contextmanager
def fast_linears(model: nn.Module) -> Iterator[None]:
    """While it is active, the model's plain ``nn.Linear`` modules compute through :func:`linear` (the
    calibration passes' float32 matmuls on the measured engine). Modules whose ``forward`` is already replaced
    on the instance (accelerate's hooks, other wrappers) or whose class has its own ``forward`` keep theirs;
    on exit every patched module gets its class's ``forward`` back. Nothing changes where BLAS is the engine."""
    patched: list[nn.Linear] = []
    if engine() == "onednn":
        for module in model.modules():
            if (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
                    and "forward" not in module.__dict__ and not hasattr(module, "_hf_hook")):
                module.forward = types.MethodType(_linear_forward, module)
                patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            if getattr(module.__dict__.get("forward"), "__func__", None) is _linear_forward:
                del module.forward

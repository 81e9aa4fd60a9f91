"""A plain eager GPTQ over a whole VLM, the yardstick of bench/quantize_speed.py.

Written from scratch in the classic IST-DASLab shape: one fp32 Hessian per linear (``H *= n/(n+m)``,
``x *= sqrt(2/(n+m))``, ``H += x^T x``), one solve per linear (damping ``percdamp * mean(diag H)``,
``cholesky -> cholesky_inverse -> cholesky(upper)``, blocks of 128 columns with lazy updates and a Python
loop over the columns inside each block, group parameters when a group's first column is reached), and
fake quantization (the dequantized weight is written back into the float linear). The grid is the
project's (symmetric: ``scale = absmax / (2**(b-1) - 1)``, zero ``2**(b-1)``) with the same MSE clip
search (shrink 1.00 .. 0.21, norm 2.4), so proxy losses compare one to one with our pipeline's.

Only the capture of a block's inputs is shared with our pipeline (``capture_calls``, ``replay``): the
Hessians and the solves are this file's own.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from bench.harness import Stopwatch
from hf_vlm_gptq.arch import find_module, spec_for_model_type
from hf_vlm_gptq.capture import capture_calls, first_output, replay, run_batches, with_hidden


@dataclass
class RefRecord:
    """One solved linear: proxy loss ``tr((W-Q) H (W-Q)^T)`` on its own Hessian, and where time went."""

    loss: float
    hessian_s: float
    solve_s: float
    component: str


@dataclass
class RefRun:
    records: dict[str, RefRecord] = field(default_factory=dict)
    part_seconds: dict[str, float] = field(default_factory=dict)
    blocks_done: dict[str, int] = field(default_factory=dict)
    blocks_total: dict[str, int] = field(default_factory=dict)
    stopped_early: bool = False


class Hessian:
    """The classic streaming ``2/n X^T X`` in fp32."""

    def __init__(self, columns: int, device: torch.device) -> None:
        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.reshape(-1, self.H.shape[0]).to(self.H.device, torch.float32)
        m = rows.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        rows = math.sqrt(2 / self.n) * rows
        self.H += rows.t() @ rows


def grid_params(x: torch.Tensor, bits: int, clip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric (scale, zero) of ``x[rows, cols]``, with the optional MSE clip search."""
    maxq, half = 2**bits - 1, 2 ** (bits - 1)
    absmax = x.abs().amax(1).clamp(min=1e-12)
    scale = absmax / (half - 1)
    zero = torch.full_like(scale, half)
    if clip:
        best = torch.full_like(scale, float("inf"))
        for i in range(80):
            s = (1 - i / 100) * absmax / (half - 1)
            q = torch.clamp(torch.round(x / s[:, None]) + half, 0, maxq)
            err = (s[:, None] * (q - half) - x).abs().pow(2.4).sum(1)
            better = err < best
            best, scale = torch.where(better, err, best), torch.where(better, s, scale)
    return scale, zero


def fasterquant(weight: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, clip: bool,
                percdamp: float = 0.01, block: int = 128) -> torch.Tensor:
    """The dequantized GPTQ weight (fp32) of ``weight[out, in]``; ``H`` is not modified."""
    W = weight.detach().float().clone()
    H = H.clone()
    n = W.shape[1]
    maxq = 2**bits - 1
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(n, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    scale, zero = grid_params(W, bits, clip) if group_size == -1 else (None, None)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1 = W[:, i1:i2].clone()
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if group_size != -1 and (i1 + i) % group_size == 0:
                # blocks hold whole groups; the group's columns as updated so far
                scale, zero = grid_params(W1[:, i:i + group_size], bits, clip)
            w = W1[:, i]
            q = scale * (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero)
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q


def proxy_loss(weight: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    D = weight.detach().float() - Q
    return float(((D @ H) * D).sum())


def _solve_into(module: nn.Module, H: Hessian, bits: int, group_size: int, clip: bool) -> float:
    """GPTQ the module's (flattened) weight, write the dequantized result back; returns the proxy loss."""
    weight = module.weight.detach().reshape(module.weight.shape[0], -1)
    gs = -1 if group_size > weight.shape[1] else group_size
    Q = fasterquant(weight, H.H, bits, gs, clip, block=gs * max(1, 128 // gs) if gs > 0 else 128)
    loss = proxy_loss(weight, Q, H.H)
    module.weight.data.copy_(Q.reshape(module.weight.shape).to(module.weight.dtype))
    return loss


@torch.no_grad()
def reference_quantize(model: nn.Module, batches: list[dict], *, bits: int = 4, group_size: int = 128,
                       clip: bool = True, deadline: float | None = None) -> RefRun:
    """Quantize every part of a Qwen2-VL / VideoLLaMA3 model (float, on one device) in place.

    ``deadline`` (``time.perf_counter()`` value): stop after the block that crosses it (``stopped_early``).
    """
    spec = spec_for_model_type(model.config.model_type)
    device = next(model.parameters()).device
    run = RefRun()
    for comp in spec.components:
        start = time.perf_counter()
        per_batch = lambda batch, comp=comp: spec.calls_per_batch(comp, batch)  # noqa: E731
        if comp.stem:
            path, conv = find_module(model, comp.stem)
            H = Hessian(conv.weight[0].numel(), device)
            handle = conv.register_forward_hook(lambda _m, args, _o, H=H: H.add(args[0]))
            with Stopwatch(device) as hessian_t:
                run_batches(model, conv, batches, per_batch)
                handle.remove()
            with Stopwatch(device) as solve_t:
                loss = _solve_into(conv, H, bits, group_size, clip)
            run.records[path] = RefRecord(loss, hessian_t.seconds, solve_t.seconds, comp.name)
        path, container = find_module(model, comp.blocks)
        blocks = [(path, container)] if comp.single else [(f"{path}.{i}", b) for i, b in enumerate(container)]
        run.blocks_total[comp.name] = len(blocks)
        run.blocks_done[comp.name] = 0
        calls = capture_calls(model, blocks[0][1], batches, device, per_batch)
        for index, (block_path, block) in enumerate(blocks):
            for group in comp.sequential:
                linears = {name: block.get_submodule(name) for name in group}
                hessians = {name: Hessian(lin.in_features, device) for name, lin in linears.items()}
                handles = [lin.register_forward_hook(lambda _m, args, _o, H=hessians[name]: H.add(args[0]))
                           for name, lin in linears.items()]
                with Stopwatch(device) as hessian_t:
                    replay(block, calls, keep_outputs=False)
                    for h in handles:
                        h.remove()
                hessian_s = hessian_t.seconds / len(linears)
                solve_t = Stopwatch(device)
                for name, lin in linears.items():
                    with solve_t:
                        loss = _solve_into(lin, hessians[name], bits, group_size, clip)
                    run.records[f"{block_path}.{name}"] = RefRecord(loss, hessian_s, solve_t.seconds, comp.name)
                del hessians
            run.blocks_done[comp.name] = index + 1
            if deadline is not None and time.perf_counter() > deadline:
                run.stopped_early = True
                break
            if index + 1 < len(blocks):
                calls = [with_hidden(c, first_output(block(*c[0], **c[1]))) for c in calls]
        run.part_seconds[comp.name] = time.perf_counter() - start
        if run.stopped_early:
            break
    return run

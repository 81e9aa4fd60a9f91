"""Catching a block's inputs from real forward passes, and replaying the block on them.

A call is the (args, kwargs) a block was called with: hidden states plus whatever else the model passes
(cu_seqlens, rotary embeddings, masks, M-RoPE position ids). Calls are caught by a pre-hook on the block
during forward passes of the whole model, each pass cut short once the block has run, and later replayed on
the block alone: to feed Hessians (only as far into the block as the watched layers need), and to produce
the next block's inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn

from .offload import move_to
from .ops import QuantConv, QuantLinear

Call = tuple[tuple[Any, ...], dict[str, Any]]
CallsPerBatch = Callable[[dict], int]

__all__ = ["Call", "StopForward", "advance", "capture_calls", "capture_chain_calls", "dense_cache", "first_output",
           "hidden_of", "replay", "replay_until", "run_batches", "with_hidden"]


class StopForward(Exception):
    """Raised from a hook to end a forward pass once the wanted inputs are caught."""


@torch.no_grad()
def run_batches(model: nn.Module, watched: nn.Module, batches: list[dict],
                calls_per_batch: CallsPerBatch | None = None, input_device: torch.device | None = None,
                stop_before: bool = False) -> None:
    """Run the model on each batch, ending each pass once `watched` has finished its expected calls (with
    `stop_before`, as soon as its last expected call begins: when only its inputs are wanted, after the
    forward pre-hooks registered before this call have seen them).

    `calls_per_batch(batch)` says how often `watched` runs in one pass (a vision tower runs once for the
    images and once more for the videos of a sample); batches where it never runs are not run at all.
    Batches are moved to `input_device` (default: the model's device) one at a time.
    """
    remaining = [0]

    def count(*_):
        remaining[0] -= 1
        if remaining[0] <= 0:
            raise StopForward

    handle = (watched.register_forward_pre_hook(count) if stop_before else watched.register_forward_hook(count))
    input_device = input_device or next(model.parameters()).device
    try:
        for batch in batches:
            remaining[0] = calls_per_batch(batch) if calls_per_batch is not None else 1
            if remaining[0] <= 0:
                continue
            try:
                model(**move_to(batch, input_device), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()


@torch.no_grad()
def capture_calls(model: nn.Module, target: nn.Module, batches: list[dict], device: torch.device,
                  calls_per_batch: CallsPerBatch | None = None, input_device: torch.device | None = None,
                  ) -> list[Call]:
    """Run the model on each batch and keep every (args, kwargs) `target` is called with, on `device`."""
    calls: list[Call] = []

    def pre_hook(_module, args, kwargs):
        calls.append((move_to(args, device), move_to(kwargs, device)))

    handle = target.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        run_batches(model, target, batches, calls_per_batch, input_device, stop_before=True)
    finally:
        handle.remove()
    return calls


@torch.no_grad()
def capture_chain_calls(model: nn.Module, blocks: list[nn.Module], batches: list[dict], device: torch.device,
                        calls_per_batch: CallsPerBatch | None = None, input_device: torch.device | None = None,
                        ) -> tuple[list[Call], list[list[Call]]]:
    """One forward pass per batch through all of `blocks` (a chain): the first block's calls, and for every
    block its own calls with the hidden states left out (None), to be filled with the chain's.

    For blocks that take different arguments (window vs full attention). Tensors the blocks share in the
    real pass (rotary embeddings, masks) stay shared on `device`.
    """
    own: list[list[Call]] = [[] for _ in blocks]
    first: list[Call] = []
    memo: dict[int, torch.Tensor] = {}
    sources: list[Call] = []  # keeps the memo's keys (ids) valid for the whole capture

    def hook_for(index: int):
        def pre_hook(_module, args, kwargs):
            stripped = with_hidden((args, kwargs), None)
            sources.append(stripped)
            call = move_to(stripped, device, memo)
            own[index].append(call)
            if index == 0:
                first.append(with_hidden(call, move_to(hidden_of((args, kwargs)), device)))
        return pre_hook

    handles = [block.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        run_batches(model, blocks[-1], batches, calls_per_batch, input_device)
    finally:
        for handle in handles:
            handle.remove()
    memo.clear()
    return first, own


def hidden_of(call: Call) -> torch.Tensor:
    """The hidden-states input of a call (first positional, else `hidden_states=`)."""
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def first_output(out: Any) -> torch.Tensor:
    """The hidden states in a block's output (a tensor, the first of a tuple, or `last_hidden_state`)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    raise TypeError(f"cannot find the hidden states in a block output of type {type(out).__name__}")


def with_hidden(call: Call, hidden: torch.Tensor | None) -> Call:
    """The same call with its hidden-states input replaced (first positional, else `hidden_states=`)."""
    args, kwargs = call
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@torch.no_grad()
def replay(block: nn.Module, calls: list[Call], keep_outputs: bool) -> list[Call]:
    """Run `block` on every caught call; with `keep_outputs`, return the calls for the next block."""
    next_calls: list[Call] = []
    for call in calls:
        out = block(*call[0], **call[1])
        if keep_outputs:
            next_calls.append(with_hidden(call, first_output(out)))
    return next_calls


@torch.no_grad()
def advance(block: nn.Module, calls: list[Call]) -> None:
    """Replace each caught call by the next block's (this block's output), in place: one copy of the
    activations is alive at a time."""
    for i, call in enumerate(calls):
        calls[i] = with_hidden(call, first_output(block(*call[0], **call[1])))


@torch.no_grad()
def replay_until(block: nn.Module, calls: list[Call], layers: list[nn.Module]) -> None:
    """Run `block` on every call only until each of `layers` has run once (so their hooks saw the call's
    inputs); the rest of the block is skipped. Feeding the Hessian of `attn.qkv` needs a layer norm, not
    the whole block."""
    if not layers:
        return
    pending = [0]

    def reached(*_):
        pending[0] -= 1
        if pending[0] <= 0:
            raise StopForward

    handles = [layer.register_forward_hook(reached) for layer in layers]
    try:
        for call in calls:
            pending[0] = len(layers)
            try:
                block(*call[0], **call[1])
            except StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def dense_cache(block: nn.Module) -> Iterator[Callable[[], None]]:
    """While a block is being quantized it is replayed once per sequential group and once more for the next
    block's inputs: the function this yields makes the packed modules already in the block keep their
    dequantized weight (instead of dequantizing on every call); on exit they drop it and go back to their
    default."""
    def enable() -> None:
        for module in block.modules():
            if isinstance(module, (QuantLinear, QuantConv)):
                module.cache_dequantized = True

    try:
        yield enable
    finally:
        for module in block.modules():
            if isinstance(module, (QuantLinear, QuantConv)):
                module.__dict__.pop("cache_dequantized", None)
                module.clear_cache()

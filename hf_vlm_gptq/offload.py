"""Run a model on the calibration device while its weights stay where they are (usually CPU).

A model larger than the GPU is quantized one block at a time on the GPU; the calibration forward passes
that catch a block's inputs must run there too, without moving the whole model. `ExecutionOffload`
attaches a pair of hooks to every module that owns parameters or buffers:

* before the module runs, its tensors are copied to the execution device (the module's entries are
  swapped for the copies; the original objects are kept aside) and the call's tensor arguments follow;
* after it runs, the originals go back, unless the module is *resident*: modules stay on the device
  between calls while their total size fits `max_resident_bytes`. A calibration pass stops at the block it
  captures, so the residents are exactly the modules that run before it (vision tower, embeddings), and
  later samples do not copy them again.

On exit every module gets its original tensors back (same objects: ties, caches and optimizer-free
identity checks survive) and every hook is removed. Execution device == home device (CPU) runs the same
code: the copies are then CPU copies, which is what the tests use.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

__all__ = ["ExecutionOffload", "move_to", "same_device"]


def move_to(obj: Any, device: torch.device, memo: dict[int, torch.Tensor] | None = None) -> Any:
    """Move every tensor inside nested tuples / lists / dicts to `device`.

    With `memo` (id of a source tensor -> its moved copy), a tensor seen before is moved once and shared,
    as it was in the source (blocks of one forward pass share their rotary embeddings and masks); the
    caller keeps the sources alive while the memo is in use.
    """
    if isinstance(obj, torch.Tensor):
        if memo is None:
            return obj.to(device)
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, tuple):
        return tuple(move_to(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [move_to(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: move_to(v, device, memo) for k, v in obj.items()}
    return obj


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """True when `a` and `b` name the same device ("cuda" and "cuda:0" do when 0 is the current one)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return a.index == b.index or a.type == "cpu"
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


def _own_tensors(module: nn.Module) -> list[tuple[dict, str]]:
    """(dict, name) of the module's own (non-recursive) parameters and buffers."""
    entries = [(module._parameters, n) for n, p in module._parameters.items() if p is not None]
    return entries + [(module._buffers, n) for n, b in module._buffers.items() if b is not None]


def _nbytes(module: nn.Module) -> int:
    return sum(store[name].numel() * store[name].element_size() for store, name in _own_tensors(module))


def _default_budget(device: torch.device) -> int | None:
    """Half the device's free memory for CUDA; no limit elsewhere."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    return None


class ExecutionOffload:
    """Context manager: every forward of `model` inside it runs on `device`, module by module.

    `max_resident_bytes`: how much may stay on the device between calls (None: half the free CUDA memory
    at entry; unlimited on CPU). `moves` counts the modules copied over, for tests and logs.
    """

    def __init__(self, model: nn.Module, device: torch.device | str, max_resident_bytes: int | None = None):
        self.model = model
        self.device = torch.device(device)
        self.max_resident_bytes = max_resident_bytes
        self.moves = 0
        self._budget: int | None = None
        self._resident_bytes = 0
        self._resident: set[int] = set()
        self._saved: dict[int, tuple[nn.Module, list[tuple[dict, str, Any]]]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> ExecutionOffload:
        self._budget = self.max_resident_bytes if self.max_resident_bytes is not None else \
            _default_budget(self.device)
        for module in self.model.modules():
            if _own_tensors(module):
                self._handles.append(module.register_forward_pre_hook(self._before, with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._after, always_call=True))
        logger.debug("execution offload to %s: %d modules hooked", self.device, len(self._handles) // 2)
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, _ in list(self._saved.values()):
            self._restore(module)
        self._resident.clear()
        self._resident_bytes = 0
        logger.debug("execution offload to %s: %d module copies made", self.device, self.moves)

    # --- hooks ------------------------------------------------------------------------------------
    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if id(module) not in self._saved:
            self._place(module)
        return move_to(args, self.device), move_to(kwargs, self.device)

    def _after(self, module: nn.Module, _args: Any, _out: Any) -> None:
        if id(module) not in self._resident:
            self._restore(module)

    # --- moves ------------------------------------------------------------------------------------
    def _place(self, module: nn.Module) -> None:
        saved = []
        for store, name in _own_tensors(module):
            original = store[name]
            copy = original.detach().to(self.device, copy=True)
            if isinstance(original, nn.Parameter):
                copy = nn.Parameter(copy, requires_grad=False)
            saved.append((store, name, original))
            store[name] = copy
        self._saved[id(module)] = (module, saved)
        self.moves += 1
        size = _nbytes(module)
        if self._budget is None or self._resident_bytes + size <= self._budget:
            self._resident.add(id(module))
            self._resident_bytes += size

    def _restore(self, module: nn.Module) -> None:
        entry = self._saved.pop(id(module), None)
        if entry is None:
            return
        for store, name, original in entry[1]:
            store[name] = original
        clear = getattr(module, "clear_cache", None)  # packed modules cache weights derived on the device
        if callable(clear):
            clear()

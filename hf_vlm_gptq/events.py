"""The pipeline's event stream: typed events a quantization run emits, and how to listen to them.

Order within one run (`pipeline.quantize_model`), per enabled component in its ArchSpec's order:
`ComponentStart`; the stem's `ModuleSolved` (when it has one); then per block: `CaptureDone` when the
block's inputs were caught from a real forward pass (the component's first block, and fresh blocks),
`BlockStart`, one `ModuleSolved` per module quantized in it, `BlockEnd` (after the block also produced the
next block's inputs). The progress bars, the run's records and the benches consume these events.

Listeners are called synchronously, in registration order, in the thread that runs the pipeline; an
exception in a listener ends the run. Events that carry live objects (`block`, `calls`) are only valid
during the call: listeners must not keep or modify them.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from .report import QuantRecord


@dataclass(frozen=True)
class ComponentStart:
    """A component (vision, merger, llm, ...) starts; `blocks`: how many blocks this run solves (0 when
    only its stem is asked for), `stem`: whether its conv stem is solved first."""

    component: str
    bits: int
    method: str  # "GPTQ" | "RTN"
    blocks: int
    stem: bool


@dataclass(frozen=True)
class CaptureDone:
    """The inputs of block `block` were caught from a real forward pass (`calls`: one (args, kwargs) per
    call the block received, on the calibration device), or, with `handed`, taken from the outputs of the
    component before it (`ComponentSpec.inputs_from`: no pass, `seconds` 0)."""

    component: str
    block: str
    calls: list
    seconds: float
    handed: bool = False


@dataclass(frozen=True)
class BlockStart:
    """Block `index` of `total` (module path `path`) is on the calibration device, about to be solved on
    `calls`."""

    component: str
    path: str
    index: int
    total: int
    block: nn.Module
    calls: list


@dataclass(frozen=True)
class BlockEnd:
    """Block `path` is solved, swapped, has produced the next block's inputs and is back on its device."""

    component: str
    path: str
    index: int
    total: int
    seconds: float


@dataclass(frozen=True)
class ModuleSolved:
    """One module was quantized and swapped: `record` (keyed `record.path`; a split layer's is
    `<module>.L2`), `module` (the swapped module's path) and its `modules` entry for the checkpoint."""

    record: QuantRecord
    module: str
    entry: dict[str, Any]


Event = ComponentStart | CaptureDone | BlockStart | BlockEnd | ModuleSolved
Listener = Callable[[Event], None]

_listeners: contextvars.ContextVar[tuple[Listener, ...]] = contextvars.ContextVar("hf_vlm_gptq_listeners",
                                                                                  default=())


@contextlib.contextmanager
def listen(callback: Listener | None) -> Iterator[None]:
    """Call `callback(event)` for every event emitted inside the `with` block (None: listen to nothing).

    Listeners nest: the outer ones stay registered and are called first.
    """
    if callback is None:
        yield
        return
    token = _listeners.set((*_listeners.get(), callback))
    try:
        yield
    finally:
        _listeners.reset(token)


def emit(event: Event) -> None:
    """Send `event` to every registered listener, in registration order."""
    for callback in _listeners.get():
        callback(event)


__all__ = ["BlockEnd", "BlockStart", "CaptureDone", "ComponentStart", "Event", "Listener", "ModuleSolved", "emit",
           "listen"]

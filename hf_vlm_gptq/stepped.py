"""One forward pass per call for every sequential group of a block (instead of one replay per group).

A block quantized group by group (``true_sequential``: q/k/v, then o_proj, then gate/up, then down_proj)
needs each group's inputs as the block computes them with the groups before it already quantized. Replaying
the block once per group recomputes the same prefix again and again. Here each call's forward pass runs
once, in a greenlet of its own, and stops (a forward pre-hook) before the first module of each group that has
not been solved yet: when every call has stopped there (or finished), the group's inputs are complete, the
group is solved and swapped, and the passes go on. Only one pass runs at a time, in call order, so the
Hessians get their rows in the same order as from the replays. With GPTAQ the float copy of the block runs
its own passes the same way, each just before the quantized block's pass of the same call.

Greenlets rather than OS threads: a pass and the caller share one thread, so a stop costs a switch of ~1 us
instead of two thread wake-ups (~0.5 ms on a 2-core VM), and the passes' ops run in the caller's OpenMP team
instead of one team per thread. The passes share the thread's torch state (grad mode, autocast), so they run
under the caller's ``no_grad`` and must not stop inside a context that changes it (no block's linear layer
does: `tests/test_architectures.py` quantizes every family through here).

The module a pass stopped in was entered before it was swapped: it goes on with the dequantized weight of its
packed replacement, so that call computes what the replays would (up to the kernel's rounding). Each call's activations stay alive until
its pass ends, which is why the pipeline uses this only when they fit (``fits_in_memory``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import greenlet
import torch
import torch.nn as nn

from .capture import Call, first_output, hidden_of, with_hidden
from .modules_swap import dense_weight

__all__ = ["Lane", "fits_in_memory", "forward_in_steps", "hand_over"]

# Paused passes hold their activations at once: allow it when the block inputs times this factor (the
# intermediate activations of a block, a few times its input) stay below the share of free memory below.
_ACTIVATION_FACTOR = 8
_MEMORY_SHARE = 0.25


def _free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def fits_in_memory(calls: list[Call], device: torch.device, lanes: int = 1) -> bool:
    """Whether every call's pass (of each of ``lanes`` blocks) can be held at once (estimated from the block
    inputs)."""
    held = lanes * sum(hidden_of(call).numel() * hidden_of(call).element_size() for call in calls)
    free = _free_bytes(device)
    return free is not None and held * _ACTIVATION_FACTOR <= free * _MEMORY_SHARE


class _Pass:
    """One call's forward pass in a greenlet of its own (same OS thread, so the same OpenMP team and thread
    state as the caller), stopping where the pre-hooks say."""

    def __init__(self, block: nn.Module, call: Call, registry: dict[greenlet.greenlet, _Pass]) -> None:
        self.block, self.call = block, call
        self.stage: int | None = None  # the group it waits before; None while running or when done
        self.done = False
        self.output: Any = None
        self.runner = greenlet.greenlet(self._run)
        registry[self.runner] = self

    def _run(self) -> None:
        self.output = self.block(*self.call[0], **self.call[1])
        self.done = True

    def step(self) -> None:
        """Let the pass run until it stops again or ends (starting it the first time); its error is raised
        here."""
        self.stage = None
        self.runner.switch()

    def wait_before(self, stage: int) -> None:
        """Called in the pass: stop before group ``stage`` until stepped again."""
        self.stage = stage
        self.runner.parent.switch()


@dataclass
class Lane:
    """One block run on a list of calls: ``groups[k]`` its modules of group ``k`` (they share their input),
    ``feed(k, args)`` takes the arguments of the first of them a pass reaches. Its calls are replaced, in
    place, by the next block's (this block's outputs), like ``capture.advance``."""

    block: nn.Module
    calls: list[Call]
    groups: Sequence[Sequence[nn.Module]]
    feed: Callable[[int, tuple], None]


def forward_in_steps(lanes: Sequence[Lane], solve: Callable[[int], None]) -> None:
    """Run each lane's block once on each of its calls. A pass that reaches group ``k`` feeds it and waits
    until every pass has reached group ``k`` or ended and ``solve(k)`` has run. Passes take turns call by
    call, the lanes in the given order for each call (GPTAQ: the float copy's pass just before the
    quantized block's, as the pairs of rows want)."""
    registry: dict[greenlet.greenlet, _Pass] = {}
    solved = [0]
    reached: set[tuple[int, int]] = set()  # (pass, group) fed
    stages = max((len(lane.groups) for lane in lanes), default=0)

    def hook_for(stage: int, feed: Callable[[int, tuple], None]):
        def pre_hook(_module, args):
            one = registry.get(greenlet.getcurrent())
            if one is None or stage < solved[0] or (id(one), stage) in reached:
                return
            reached.add((id(one), stage))
            feed(stage, args)
            one.wait_before(stage)
        return pre_hook

    passes = [[_Pass(lane.block, call, registry) for call in lane.calls] for lane in lanes]
    handles = [module.register_forward_pre_hook(hook_for(k, lane.feed))
               for lane in lanes for k, group in enumerate(lane.groups) for module in group]
    order = [lane_passes[i] for i in range(max(map(len, passes), default=0))
             for lane_passes in passes if i < len(lane_passes)]
    try:
        with torch.no_grad():  # the passes share this thread's grad mode
            for stage in range(stages + 1):
                for one in order:
                    if not one.done and (one.stage is None or one.stage < stage):
                        one.step()
                if stage < stages:
                    solve(stage)
                    solved[0] = stage + 1
    finally:
        for handle in handles:
            handle.remove()
        for one in order:  # after an error: unwind the paused passes (their context managers exit)
            if one.runner:
                one.runner.throw(greenlet.GreenletExit)
    for lane, lane_passes in zip(lanes, passes):
        for i, one in enumerate(lane_passes):
            lane.calls[i] = with_hidden(lane.calls[i], first_output(one.output))


def hand_over(entered: nn.Module, replacement: nn.Module) -> None:
    """A pass that stopped inside ``entered`` (its forward pre-hook: torch has already picked the forward it
    will run) goes on with the weight of its packed ``replacement``, dequantized."""
    if isinstance(entered, nn.Linear):
        entered.weight.data = dense_weight(replacement).to(entered.weight.dtype)

"""Solving one block: its sequential groups' Hessians fed from the block's calls (one forward pass per call,
``stepped.py``, or replays of the block, ``capture.py``), each group solved and swapped for packed modules.

``BlockSolving`` is the block half of ``pipeline.ComponentQuantizer``; it uses the host's ``config``,
``opts``, ``comp``, ``device``, ``pool``, ``_skipped``, ``_block_tokens``, ``_swap`` and ``_record``, and sets
``advanced`` when the calls it was given already hold the next block's inputs.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
import torch.nn as nn

from .capture import Call, first_output, hidden_of, replay_until, with_hidden
from .config import VLMGPTQConfig
from .config_fields import PartOptions
from .events import ModuleSolved, emit
from .modality import GroupInputs
from .ops import QuantResult, gptq_quantize_shared, rtn_quantize
from .ops.scratch import MatrixPool
from .stepped import Lane, fits_in_memory, forward_in_steps, hand_over

__all__ = ["BlockSolving", "solve_weights"]


def solve_weights(weights: list[torch.Tensor], hessian: torch.Tensor, tokens: int, opts: PartOptions,
                  config: VLMGPTQConfig, cross: torch.Tensor | None = None,
                  pool: MatrixPool | None = None) -> list[QuantResult]:
    """GPTQ (or RTN, as the part's options say) of layers fed the same input, from their Hessian over
    ``tokens`` rows (GPTAQ: ``cross``); the solve's work matrices from ``pool`` (ops/scratch.py)."""
    group_size = config.w_groupsize
    if group_size > weights[0].shape[1]:
        # One group covers the whole row either way; -1 says so (and ops' dequantize rejects a group wider
        # than the layer).
        group_size = -1
    common = dict(bits=opts.bits, group_size=group_size, sym=config.sym, clip=opts.clip,
                  full_range=config.sym_full_range and config.sym)
    if opts.rtn:
        seen = hessian if tokens > 0 else None  # RTN needs no data; the loss is reported when there was some
        return [rtn_quantize(w, hessian=seen, **common) for w in weights]
    return gptq_quantize_shared(weights, hessian, act_order=config.act_order, percdamp=config.percdamp,
                                block_size=config.block_size, nsamples=tokens, group_order=config.group_order,
                                gptaq_cross=cross, gptaq_alpha=config.gptaq_alpha, pool=pool, **common)


class BlockSolving:
    """The per-block solves of a component (see the module docstring)."""

    def _stages(self, block: nn.Module) -> list[list[tuple[str, ...]]]:
        groups = [tuple(n for n in g if _has(block, n)) for g in self.comp.sequential]
        groups = [g for g in groups if g]
        return [[g] for g in groups] if self.config.true_sequential else [groups]

    def _quantize_block(self, path: str, block: nn.Module, calls: list[Call],
                        keep_dense: Callable[[], None] = lambda: None,
                        float_hidden: list[torch.Tensor] | None = None) -> list[torch.Tensor] | None:
        """Solve every group of `block`. With GPTAQ (`float_hidden`: the float model's hidden states for each
        call) a float copy of the block runs next to it; returns the float copy's outputs (the next block's
        float inputs), else None."""
        if (calls and self.config.true_sequential  # one group per stage: one pass serves them all
                and fits_in_memory(calls, self.device, 1 if float_hidden is None else 2)):
            return self._quantize_block_in_one_pass(path, block, calls, keep_dense, float_hidden)
        float_block = copy.deepcopy(block) if float_hidden is not None else None
        for stage in self._stages(block):
            watched = self._watch(path, block, stage, float_block)
            start = time.perf_counter()
            keep_dense()
            layers = [inputs.module for _, _, inputs in watched]
            if float_block is None:
                replay_until(block, calls, layers)
            else:  # call by call: the float copy on the float inputs, then the block on the quantized ones
                twins = [float_block.get_submodule(names[0]) for names, _, _ in watched]
                for call, hidden in zip(calls, float_hidden):
                    replay_until(float_block, [with_hidden(call, hidden)], twins)
                    replay_until(block, [call], layers)
            for names, split, inputs in watched:
                self._solve_group(path, block, names, split, inputs, start)
        if float_block is None:
            return None
        with torch.no_grad():
            return [first_output(float_block(*with_hidden(call, hidden)[0], **with_hidden(call, hidden)[1]))
                    for call, hidden in zip(calls, float_hidden)]

    def _quantize_block_in_one_pass(self, path: str, block: nn.Module, calls: list[Call],
                                    keep_dense: Callable[[], None],
                                    float_hidden: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
        """The same solves from one forward pass per call (``stepped.py``), with GPTAQ's float copy of the
        block run the same way beside it; the calls become the next block's. Returns the float copy's outputs
        (GPTAQ), else None."""
        float_block = copy.deepcopy(block) if float_hidden is not None else None
        stages = [self._watch(path, block, stage, float_block, before_call=True) for stage in self._stages(block)]
        stages = [watched for watched in stages if watched]
        start = [time.perf_counter()]

        def solve(k: int) -> None:
            for names, split, inputs in stages[k]:
                entered = [block.get_submodule(n) for n in names]
                self._solve_group(path, block, names, split, inputs, start[0])
                for old, name in zip(entered, names):
                    hand_over(old, block.get_submodule(name))
            keep_dense()
            start[0] = time.perf_counter()

        def feed(k: int, args: tuple) -> None:
            for _, _, inputs in stages[k]:
                inputs.add_call(args)

        def feed_float(k: int, args: tuple) -> None:
            for _, _, inputs in stages[k]:
                inputs.add_float_call(args)

        def modules(root: nn.Module) -> list[list[nn.Module]]:
            return [[root.get_submodule(n) for names, _, _ in watched for n in names] for watched in stages]

        lanes = [Lane(block, calls, modules(block), feed)]
        float_calls: list[Call] = []
        if float_block is not None:
            float_calls = [with_hidden(call, hidden) for call, hidden in zip(calls, float_hidden)]
            lanes.insert(0, Lane(float_block, float_calls, modules(float_block), feed_float))
        keep_dense()
        forward_in_steps(lanes, solve)
        self.advanced = True
        return None if float_block is None else [hidden_of(call) for call in float_calls]

    def _watch(self, path: str, block: nn.Module, stage: list[tuple[str, ...]], float_block: nn.Module | None,
               before_call: bool = False) -> list[tuple[list[str], bool, GroupInputs]]:
        """The Hessian feeds of one stage's groups (skipped modules left out)."""
        watched = []
        for group in stage:
            names = [n for n in group if not self._skipped(f"{path}.{n}")]
            if not names:
                continue
            split = self.opts.split and self.comp.split_target in names
            first = block.get_submodule(names[0])
            twin = float_block.get_submodule(names[0]) if float_block is not None else None
            watched.append((names, split, GroupInputs(first, is_conv=False, drop_first_channel=split,
                                                       tokens=self._block_tokens(path), float_module=twin,
                                                       before_call=before_call, pool=self.pool)))
        return watched

    def _solve_group(self, path: str, block: nn.Module, names: list[str], split: bool, inputs: GroupInputs,
                     start: float) -> nn.Module:
        """Solve one group from its collected inputs and swap its packed modules in; returns the first one."""
        hessian, cross = inputs.close()
        linears = [block.get_submodule(n) for n in names]
        weights = [lin.weight.detach()[:, 1:] if split else lin.weight.detach() for lin in linears]
        results = solve_weights(weights, hessian, inputs.tokens, self.opts, self.config, cross=cross,
                                pool=self.pool)
        del hessian, cross
        seconds = (time.perf_counter() - start) / len(names)
        by_modality = [inputs.modality_losses(w, result) for w, result in zip(weights, results)]
        inputs.release()
        for name, lin, result, losses in zip(names, linears, results, by_modality):
            swapped, entry = self._swap(block, path, name, lin, result, split=split)
            key = f"{swapped}.L2" if split else swapped
            record = self._record(key, "split_linear" if split else "linear", result, lin.out_features,
                                  result.codes.shape[1], inputs.samples, inputs.tokens, seconds, losses)
            emit(ModuleSolved(record, swapped, entry))
        return block.get_submodule(names[0])


def _has(block: nn.Module, name: str) -> bool:
    try:
        block.get_submodule(name)
        return True
    except AttributeError:
        return False



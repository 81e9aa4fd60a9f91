"""The layerwise engine: walk an ArchSpec over a model, calibrate each block on real inputs, solve, swap.

Per enabled component, in the spec's order (vision -> bridge -> LLM):
  1. the conv stem, if any: its inputs are caught from a real forward pass, one Hessian, solve, swap;
  2. the inputs (args and kwargs) of the first block are caught from a real forward pass of the model as
     it is now, so a later component sees the outputs of the already quantized earlier ones;
  3. per block (``block_solve.py``): per sequential group, the group's Hessian is fed from the block run on
     every caught input — one forward pass per input that stops before each group until it is solved
     (``stepped.py``), or, where that does not apply, one replay per group (only as far as the group's input)
     and one more for the next block's inputs — then solved, and packed modules swapped in (they keep their
     dequantized weight while the block is being worked on).
Only one block (and one group's Hessian) is on the calibration device at a time. When the weights live
elsewhere (a model larger than the GPU, kept on CPU), the calibration passes of steps 1-2 run module by module
on the calibration device (offload.py); the caught inputs stay there, one copy at a time.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn

from . import block_solve
from .arch import ArchSpec, ComponentSpec, find_module, spec_for_model_type
from .block_solve import BlockSolving
from .capture import (
    Call,
    CallsPerBatch,
    advance,
    capture_calls,
    capture_chain_calls,
    dense_cache,
    hidden_of,
    replay,
    run_batches,
    with_hidden,
)
from .checks import check_part_flags, log_ignored_flags, run_model_checks
from .config import VLMGPTQConfig
from .events import BlockEnd, BlockStart, CaptureDone, ComponentStart, Listener, ModuleSolved, emit, listen
from .importance import gradient_token_weights
from .modality import GroupInputs, TokenInfo
from .modules_swap import SplitLinear, build_split_linear, make_quant_module, module_entry, set_submodule
from .offload import ExecutionOffload, same_device
from .ops import QuantResult
from .ops.dense import fast_layers
from .ops.scratch import MatrixPool
from .progress import ProgressBars
from .report import QuantRecord, RunRecords
from .threads import adaptive_threads

logger = logging.getLogger(__name__)

def resolve_device(config: VLMGPTQConfig, model: nn.Module) -> torch.device:
    """The device that runs one block at a time: the config's, else CUDA when present, else the model's."""
    if config.calibration_device is not None:
        return torch.device(config.calibration_device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return next(model.parameters()).device


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def use_offload(config: VLMGPTQConfig, model: nn.Module, device: torch.device) -> bool:
    """Whether calibration passes bring each module to `device` in turn (see offload.py): the config's
    `calibration_offload`, else when the weights are elsewhere and accelerate has not dispatched the model."""
    if config.calibration_offload is not None:
        return config.calibration_offload
    if any(hasattr(m, "_hf_hook") for m in model.modules()):
        logger.info("the model is dispatched by accelerate; calibration passes run through its hooks")
        return False
    return not same_device(_model_device(model), device)


class ComponentQuantizer(BlockSolving):
    """Quantizes one component of one model; each quantized module is announced as a `ModuleSolved` event
    (events.py), blocks by `CaptureDone` / `BlockStart` / `BlockEnd`."""

    def __init__(self, model: nn.Module, spec: ArchSpec, comp: ComponentSpec, config: VLMGPTQConfig,
                 device: torch.device, offload: bool = False) -> None:
        self.model = model
        self.spec = spec
        self.comp = comp
        self.token_info: TokenInfo | None = None
        self.importance: dict[str, list[torch.Tensor | None]] | None = None  # "gradient" weights per block path
        self.calls_per_batch: CallsPerBatch = lambda batch: spec.calls_per_batch(comp, batch)
        self.config = config
        self.opts = config.part_options(comp.part)
        self.device = device
        self.offload = offload
        self.advanced = False  # the block just solved has replaced its calls by the next block's
        self.before_block: Callable[[], object] = lambda: None
        """Called before each block is solved (the CPU thread policy re-measures there)."""
        self.keep_outputs = False
        """Keep the last block's outputs in `outputs` (the next component takes them: `inputs_from`)."""
        self.outputs: list[torch.Tensor] | None = None
        self.handed: list[torch.Tensor] | None = None
        """The first block's inputs handed over by the component before (`inputs_from`), else None: caught."""
        self.pool = MatrixPool()
        """The blocks' Hessians and solve matrices, reused from block to block (ops/scratch.py)."""

    # --- helpers ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _forward_on_device(self) -> Iterator[None]:
        """Where calibration passes run: module by module on the device (offload), or where the model is; there
        the packed modules of the parts already quantized keep their dequantized weight for the passes (each
        runs once per batch; `dense_cache`), dropped at the end."""
        if self.offload:
            with ExecutionOffload(self.model, self.device):
                yield
            return
        with dense_cache(self.model) as keep_dense:
            keep_dense()
            yield

    def _input_device(self) -> torch.device | None:
        return self.device if self.offload else None

    def _skipped(self, path: str) -> bool:
        return any(path == p or path.startswith(p + ".") for p in self.config.modules_to_not_convert)

    def _tokens(self, batches: list[dict]) -> TokenInfo:
        """The modality of every call's rows and the token weights (the same for the stem and the blocks)."""
        if self.token_info is None:
            self.token_info = TokenInfo.for_component(self.spec, self.comp, self.model.config, batches,
                                                      self.config.hessian_weighting, self.config.modality_weights)
        return self.token_info

    def _block_tokens(self, path: str) -> TokenInfo | None:
        """The token info of one block: with hessian_weighting="gradient", that block's own row weights."""
        if self.importance is None or self.token_info is None:
            return self.token_info
        return self.token_info.with_call_weights(self.importance.get(path))

    def _record(self, path: str, kind: str, result: QuantResult, out_f: int, in_f: int, samples: int,
                tokens: int, seconds: float, extra: dict | None = None) -> QuantRecord:
        return QuantRecord(
            path=path, component=self.comp.name, kind=kind, method=result.method, bits=result.bits,
            group_size=result.group_size, sym=result.sym, act_order=self.config.act_order and
            result.method == "gptq", in_features=in_f, out_features=out_f, samples=samples, tokens=tokens,
            damp=result.damp, loss=result.loss, fallback=result.fallback, seconds=seconds, extra=dict(extra or {}))

    def _swap(self, root: nn.Module, root_path: str, name: str, module: nn.Module, result: QuantResult,
              split: bool) -> tuple[str, dict]:
        """Swap in the packed module; returns its path and its `modules` entry."""
        path = f"{root_path}.{name}" if root_path else name
        new = build_split_linear(module, result) if split else make_quant_module(module, result)
        set_submodule(root, name, new)
        return path, module_entry(new)

    # --- the stem -----------------------------------------------------------------------------
    def quantize_stem(self, batches: list[dict]) -> None:
        found = find_module(self.model, self.comp.stem)
        if found is None:
            logger.warning("%s: no patch embedding found at %s; skipped", self.comp.name, self.comp.stem)
            return
        path, conv = found
        if self._skipped(path):
            return
        start = time.perf_counter()
        self._tokens(batches)
        first_block = self._blocks()[0][0]  # gradient weighting: the stem's rows are its first block's
        inputs = GroupInputs(conv, is_conv=True, drop_first_channel=False, device=self.device,
                              tokens=self._block_tokens(first_block))
        try:
            with self._forward_on_device():
                run_batches(self.model, conv, batches, self.calls_per_batch, self._input_device())
        finally:
            hessian, _ = inputs.close()
        hessian = hessian.to(self.device)
        weight = conv.weight.detach().reshape(conv.weight.shape[0], -1).to(self.device)
        (result,) = block_solve.solve_weights([weight], hessian, inputs.tokens, self.opts, self.config)
        del hessian
        parent_path, _, name = path.rpartition(".")
        parent = self.model.get_submodule(parent_path)
        swapped, entry = self._swap(parent, parent_path, name, conv, result, split=False)
        record = self._record(path, "conv", result, weight.shape[0], weight.shape[1], inputs.samples,
                              inputs.tokens, time.perf_counter() - start, inputs.modality_losses(weight, result))
        emit(ModuleSolved(record, swapped, entry))

    # --- the blocks ---------------------------------------------------------------------------
    def _blocks(self) -> list[tuple[str, nn.Module]]:
        found = find_module(self.model, self.comp.blocks)
        if found is None:
            raise ValueError(
                f"{self.comp.name}: none of the module paths {list(self.comp.blocks)} exists in this model; "
                f"switch `{self.comp.flag}` off or report the model's layout."
            )
        path, container = found
        if self.comp.single:
            return [(path, container)]
        return [(f"{path}.{i}", block) for i, block in enumerate(container)]

    def block_inputs(self, batches: list[dict]) -> Iterator[tuple[str, nn.Module, list[Call], Callable[[], None]]]:
        """Each block (on the calibration device) with the calls it is fed, in order.

        The consumer quantizes the block before asking for the next one, so each block is fed the outputs
        of the already quantized blocks before it: replayed along the chain (with each block's own other
        arguments when `per_block_kwargs`), or caught from a real forward pass of the partly quantized
        model for the blocks the spec marks fresh. The yielded function makes the block's packed modules
        keep their dequantized weight while it is replayed (see `dense_cache`).
        """
        blocks = self._blocks()
        fresh = self.comp.fresh_blocks(self.model.config, len(blocks))
        calls: list[Call] = []
        own: dict[int, list[Call]] = {}
        for index, (path, block) in enumerate(blocks):
            if index == 0 and self.handed is not None:
                calls, own = [((hidden,), {}) for hidden in self.handed], {}
                self.handed = None
                emit(CaptureDone(self.comp.name, path, calls, 0.0, handed=True))
            elif index in fresh:
                calls, own = self._catch(blocks, index, fresh, batches)
            if index in fresh:
                if not calls and not self.opts.rtn:
                    logger.warning("%s: no calibration sample reached %s (e.g. no image or video in the data); "
                                   "its linears get RTN and are flagged", self.comp.name, path)
            elif index in own:
                calls = [with_hidden(own[index][i], hidden_of(call)) for i, call in enumerate(calls)]
            home = next(block.parameters()).device
            block.to(self.device)
            start = time.perf_counter()
            emit(BlockStart(self.comp.name, path, index, len(blocks), block, calls))
            with dense_cache(block) as keep_dense:
                self.advanced = False
                yield path, block, calls, keep_dense
                last = index + 1 == len(blocks)
                wanted = self.keep_outputs if last else index + 1 not in fresh
                if wanted and not self.advanced:
                    keep_dense()
                    advance(block, calls)
            block.to(home)
            if last and self.keep_outputs:
                self.outputs = [hidden_of(call) for call in calls]
            emit(BlockEnd(self.comp.name, path, index, len(blocks), time.perf_counter() - start))

    def _catch(self, blocks: list[tuple[str, nn.Module]], index: int, fresh: set[int], batches: list[dict],
               ) -> tuple[list[Call], dict[int, list[Call]]]:
        """Calls of block `index` from real forward passes, and with `per_block_kwargs` each later block's own
        arguments up to the next fresh block."""
        start = time.perf_counter()
        with self._forward_on_device():
            if not self.comp.per_block_kwargs:
                first, own = capture_calls(self.model, blocks[index][1], batches, self.device,
                                           self.calls_per_batch, self._input_device()), []
            else:
                stop = min([i for i in fresh if i > index] + [len(blocks)])
                first, own = capture_chain_calls(self.model, [b for _, b in blocks[index:stop]], batches,
                                                 self.device, self.calls_per_batch, self._input_device())
        emit(CaptureDone(self.comp.name, blocks[index][0], first, time.perf_counter() - start))
        return first, {index + i: calls for i, calls in enumerate(own)}

    def quantize_blocks(self, batches: list[dict]) -> None:
        feed = self.block_inputs(batches)
        self._tokens(batches)
        fresh = self.comp.fresh_blocks(self.model.config, len(self._blocks()))
        float_hidden: list[torch.Tensor] | None = None  # GPTAQ: the float model's inputs of this block
        try:
            for index, (path, block, calls, keep_dense) in enumerate(feed):
                self.before_block()
                if self.config.gptaq and not self.opts.rtn and (index in fresh or float_hidden is None):
                    float_hidden = [hidden_of(call) for call in calls]  # a part's first block: the same inputs
                float_hidden = self._quantize_block(path, block, calls, keep_dense, float_hidden)
        finally:
            logger.debug("%s: %d of %d work matrices reused between solves", self.comp.name, self.pool.reused,
                         self.pool.reused + self.pool.fresh)
            self.pool.clear()


def quantize_model(model: nn.Module, config: VLMGPTQConfig, batches: list[dict], *, progress: bool = True,
                   spec: ArchSpec | None = None, select: dict[str, str] | None = None,
                   on_event: Listener | None = None,
                   ) -> tuple[dict[str, QuantRecord], dict[str, dict]]:
    """Quantize every enabled component of `model` in place on calibration `batches`.

    `select` limits the run to some components and, per component, to "stem", "blocks" or "all"
    (the research code's per-component entry points); None runs every component its flag enables.
    The run emits the events of events.py (to `on_event` and to `events.listen` listeners); `progress`
    shows them as bars. Returns the per-module records (keyed by module path; split layers as
    `<path>.L2`) and the `modules` entries the loader needs to rebuild the packed modules from a checkpoint.
    """
    spec = spec or spec_for_model_type(model.config.model_type)
    check_part_flags(spec, config)
    log_ignored_flags(spec, config)
    unknown = set(select or ()) - {c.name for c in spec.components}
    if unknown:
        raise ValueError(f"{spec.name} has no part named {sorted(unknown)}; its parts are "
                         f"{[c.name for c in spec.components]} (is this function meant for another model?)")
    checks = run_model_checks(model, spec, config, select)  # weights, modules_to_not_convert; inputs while it runs
    device = resolve_device(config, model)
    offload = use_offload(config, model, device)
    if offload:
        logger.info("calibration passes run on %s, one module at a time (weights stay on %s)", device,
                    _model_device(model))
    if config.hessian_weighting == "gradient" and offload:
        raise ValueError(f"hessian_weighting='gradient' runs a backward pass of the whole model, which needs its "
                         f"weights on the calibration device ({device}), but they are on {_model_device(model)}; "
                         "move the model there, or use hessian_weighting='none' / 'modality' / 'balanced'.")
    collected, bars = RunRecords(), ProgressBars(enabled=progress)
    was_training = model.training
    model.eval()
    workers = [(comp, ComponentQuantizer(model, spec, comp, config, device, offload)) for comp in spec.components
               if getattr(config, comp.flag) and (select is None or comp.name in select)]
    with_blocks = {comp.name for comp, _ in workers if select is None or select[comp.name] in ("all", "blocks")}
    for (comp, worker), (after, _) in itertools.pairwise(workers):
        worker.keep_outputs = after.inputs_from == comp.name and {comp.name, after.name} <= with_blocks
    if config.hessian_weighting == "gradient":
        logger.info("token importance: one backward pass of the float model per calibration batch")
        importance = gradient_token_weights(model, {p: b for _, w in workers for p, b in w._blocks()}, batches)
        for _, worker in workers:
            worker.importance = importance
    # on CPU: 1 thread while other processes hold the cores (threads.py)
    with adaptive_threads(enabled=device.type == "cpu") as threads, listen(on_event), listen(collected), \
            listen(bars), fast_layers(model):
        handed: list[torch.Tensor] | None = None  # the last component's outputs, when the next one takes them
        try:
            for comp, worker in workers:
                which = "all" if select is None else select[comp.name]
                opts = config.part_options(comp.part)
                method = "RTN" if opts.rtn else "GPTQ"
                logger.info("quantizing %s (%s bits, %s)", comp.name, opts.bits, method)
                worker.before_block = threads.refresh
                stem = bool(comp.stem) and which in ("all", "stem")
                blocks = len(worker._blocks()) if which in ("all", "blocks") else 0
                emit(ComponentStart(comp.name, opts.bits, method, blocks, stem))
                if stem:
                    worker.quantize_stem(batches)
                if blocks:
                    worker.handed = handed  # set only where this part takes the one before's outputs
                    worker.quantize_blocks(batches)
                handed = worker.outputs
        finally:
            bars.close()
    checks.finish(collected.records)  # float16 scales that underflowed -> the records' stats
    model.train(was_training)
    return collected.records, collected.entries


__all__ = ["SplitLinear", "advance", "capture_calls", "quantize_model", "replay", "run_batches"]

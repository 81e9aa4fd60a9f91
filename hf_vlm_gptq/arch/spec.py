"""Architecture definitions as data: which modules of a VLM are quantized, in which order, how each block's
inputs are obtained, how the checkpoint and vLLM name them, and how to build a tiny one offline.

An `ArchSpec` lists components (vision encoder, bridge(s), language model) in execution order. Each
component names the config flag that switches it, the option set it takes ("visual" or "llm" bits, RTN,
clip, split), an optional conv stem (patch embedding), the module holding its blocks, and the sequential
groups of linears inside one block. Linears in one group read the same input and share one Hessian.
Paths are tried in order, so one spec covers checkpoints whose module layout moved between releases.

Block inputs: by default the blocks of a component form a chain (block i+1 is called on block i's output
with the same other arguments), so the first block's calls are caught from a real forward pass and the
rest are replayed. `per_block_kwargs` keeps each block's own non-hidden arguments (window vs full
attention); `fresh_inputs` names the blocks whose input is not the previous block's output (something runs
between them, e.g. DeepStack adding visual features after the first LLM layers): those are caught again
from a real forward pass of the partly quantized model. `chained=False` does that for every block (a list
of independent modules such as the DeepStack mergers). `inputs_from` hands a component the outputs of the
one before it (its first block's only argument) when both run in the same pass over the model.

Room for later families: a sequential group names module paths inside a block; a kind of module other than
Linear / Conv (fused 3-D expert weights, linear-attention projections) enters as a new module kind with its
own solver and packed module, and the component fields above stay as they are.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn


@dataclass(frozen=True)
class ComponentSpec:
    """One quantizable part of a VLM."""

    name: str
    """Short name used in reports: "vision", "merger", "projector", "deepstack", "llm"."""
    flag: str
    """VLMGPTQConfig field that switches this part on."""
    part: str
    """Which option set applies: "visual" or "llm"."""
    blocks: tuple[str, ...]
    """Candidate paths of the block container (a ModuleList), or of one module when `single`."""
    sequential: tuple[tuple[str, ...], ...]
    """Groups of linears (paths inside a block) in solve order; a group shares one input."""
    stem: tuple[str, ...] = ()
    """Candidate paths of a conv patch embedding quantized before the blocks."""
    single: bool = False
    """True when `blocks` is one module rather than a list of blocks."""
    split_target: str | None = None
    """The linear that `*_split` cuts into L1 (channel 0, full precision) + L2 (quantized)."""
    calls_per_media: bool = False
    """True when the part runs once per kind of media in a batch (the vision tower and bridge run for the
    images, then again for the videos) and not at all on text-only batches; False: once per batch."""
    per_block_kwargs: bool = False
    """True when blocks take different non-hidden arguments (Qwen2.5-VL: full-attention blocks get other
    `cu_seqlens` than window blocks): each block's own are caught in the first forward pass."""
    chained: bool = True
    """False when the blocks are independent modules fed from elsewhere (DeepStack mergers): every block's
    inputs are caught from a real forward pass."""
    fresh_inputs: Callable[[Any], Collection[int]] | None = None
    """model config -> indexes of blocks whose input is not the previous block's output; their inputs are
    caught from a real forward pass of the partly quantized model instead of replayed."""
    inputs_from: str | None = None
    """The component (named as in `name`) whose last block's outputs are, call for call, this component's
    first block's only argument (Qwen VL: `merger(hidden_states)` right after the vision blocks). When that
    component was quantized just before in the same run, its outputs are handed over instead of caught from
    another forward pass through it."""

    def fresh_blocks(self, model_config: Any, count: int) -> set[int]:
        """Indexes of the blocks whose inputs come from a real forward pass (block 0 always does)."""
        if not self.chained:
            return set(range(count))
        fresh = set(self.fresh_inputs(model_config)) if self.fresh_inputs is not None else set()
        return {0} | {i for i in fresh if 0 <= i < count}


@dataclass(frozen=True)
class VllmLayout:
    """How vLLM names one family's modules and which of them it runs packed (read from vLLM's model file)."""

    model_class: str
    """vLLM's model class, for messages."""
    prefixes: tuple[tuple[str, str], ...]
    """Checkpoint-key prefix -> vLLM prefix (its `hf_to_vllm_mapper`), tried in order, each on the result
    of the previous one."""
    fused: tuple[tuple[str, str, tuple[str, ...]], ...] = ()
    """(vLLM prefix the fusion applies under, fused leaf, checkpoint shard leaves): vLLM's
    `packed_modules_mapping` as it applies to this model."""
    dense: tuple[str, ...] = ()
    """Checkpoint-key substrings of modules vLLM builds without the quantization config (written dense)."""

    def module_name(self, key: str) -> str:
        """The name vLLM gives the module stored under checkpoint key prefix `key` (fused name for shards)."""
        for old, new in self.prefixes:
            if key.startswith(old):
                key = new + key[len(old):]
        parent, _, leaf = key.rpartition(".")
        for under, fused, shards in self.fused:
            if key.startswith(under) and leaf in shards:
                return f"{parent}.{fused}"
        return key

    def shards_of(self, fused_leaf: str, vllm_name: str) -> tuple[str, ...]:
        """The checkpoint shard leaves of the fused module `vllm_name` (leaf `fused_leaf`)."""
        for under, fused, shards in self.fused:
            if fused == fused_leaf and vllm_name.startswith(under):
                return shards
        return ()


@dataclass(frozen=True)
class ArchSpec:
    """A model family: the `model_type`s it covers, its components in execution order, its checkpoint and
    vLLM layout, and its tiny offline builder."""

    name: str
    display_name: str
    model_types: tuple[str, ...]
    components: tuple[ComponentSpec, ...] = field(default_factory=tuple)
    tiny_builder: str = ""
    """"module:function" writing a tiny offline checkpoint: f(out_dir, *, seed=0, **overrides) -> Path."""
    saved_prefixes: tuple[tuple[str, str], ...] = ()
    """(module-path prefix, checkpoint-key prefix) pairs where `save_pretrained` writes a legacy layout."""
    media_inputs: tuple[str, ...] = ("pixel_values", "pixel_values_videos")
    """Model-input keys that each send one batch of media through the vision tower."""
    vllm: VllmLayout | None = None
    """None: vLLM has no model class for this family (`vllm_missing` says so)."""
    vllm_missing: str = ""

    def checkpoint_names(self, name: str) -> list[str]:
        """The keys a module tensor may have in a checkpoint: its own name, then the legacy one."""
        names = [name]
        for runtime, saved in self.saved_prefixes:
            if name.startswith(runtime):
                names.append(saved + name[len(runtime):])
        return names

    def flags(self) -> set[str]:
        return {c.flag for c in self.components}

    def calls_per_batch(self, comp: ComponentSpec, batch: dict) -> int:
        """How many times `comp`'s first block runs in one forward pass on `batch` (0: never)."""
        if not comp.calls_per_media:
            return 1
        return sum(1 for key in self.media_inputs if batch.get(key) is not None)

    def tiny_builder_function(self) -> Callable[..., Path]:
        """The function behind `tiny_builder` (imported on demand: test helpers are not loaded otherwise)."""
        module, _, function = self.tiny_builder.partition(":")
        return getattr(importlib.import_module(module), function)

    def build_tiny(self, out_dir: str | Path, **kwargs: Any) -> Path:
        """Write this family's tiny offline checkpoint (real config, model and processor classes)."""
        return self.tiny_builder_function()(out_dir, **kwargs)


def find_module(root: nn.Module, candidates: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    """The first candidate path that names a submodule of `root`, matched on module boundaries."""
    for path in candidates:
        try:
            return path, root.get_submodule(path)
        except AttributeError:
            continue
    return None

"""Architecture descriptions as data: which modules of a VLM are quantized, in which order.

An `ArchSpec` lists components (vision encoder, bridge, language model) in execution order. Each
component names the config flag that switches it, the option set it takes ("visual" or "llm" bits, RTN,
clip, split), an optional conv stem (patch embedding), the module holding its blocks, and the sequential
groups of linears inside one block. Linears in one group read the same input and share one Hessian.
Paths are tried in order, so one spec covers checkpoints whose module layout moved between releases.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn


@dataclass(frozen=True)
class ComponentSpec:
    """One quantizable part of a VLM."""

    name: str
    """Short name used in reports: "vision", "merger", "projector", "llm"."""
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


@dataclass(frozen=True)
class ArchSpec:
    """A model family: the `model_type`s it covers and its components in execution order."""

    name: str
    model_types: tuple[str, ...]
    components: tuple[ComponentSpec, ...] = field(default_factory=tuple)
    saved_prefixes: tuple[tuple[str, str], ...] = ()
    """(module-path prefix, checkpoint-key prefix) pairs where `save_pretrained` writes a legacy layout."""
    media_inputs: tuple[str, ...] = ("pixel_values", "pixel_values_videos")
    """Model-input keys that each send one batch of media through the vision tower."""

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


def find_module(root: nn.Module, candidates: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    """The first candidate path that names a submodule of `root`, matched on module boundaries."""
    for path in candidates:
        try:
            return path, root.get_submodule(path)
        except AttributeError:
            continue
    return None

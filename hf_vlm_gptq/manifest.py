"""`CheckpointManifest`: what quantization wrote about a checkpoint, apart from the user's options.

`modules` (module path -> the JSON object of its `records.ModuleRecord`), `stats` (module path -> the
record's JSON-able stats) and `format_version`. In `config.json` they sit flat in `quantization_config`
next to the options, under these three keys, as every earlier version wrote them; `VLMGPTQConfig` reads
and writes that layout and keeps the manifest as its own object (`config.manifest`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

FORMAT_VERSION = 1
MANIFEST_KEYS = ("modules", "stats", "format_version")


@dataclass(frozen=True)
class CheckpointManifest:
    """The quantized modules, their stats and the format version of a checkpoint (empty before quantizing)."""

    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_values(cls, modules: Any = None, stats: Any = None, format_version: Any = FORMAT_VERSION,
                    ) -> CheckpointManifest:
        """From `quantization_config`'s flat keys; raises ValueError for a format this version cannot read."""
        if format_version != FORMAT_VERSION:
            raise ValueError(
                f"This checkpoint's quantization_config has format_version {format_version!r}; this "
                f"hf_vlm_gptq reads format_version {FORMAT_VERSION}. Install the hf_vlm_gptq release that wrote it."
            )
        return cls(dict(modules or {}), dict(stats or {}), format_version)

    @property
    def is_empty(self) -> bool:
        """True before quantization (no module listed): a config that will quantize, not a saved one."""
        return not self.modules

    def with_results(self, modules: dict[str, dict[str, Any]], stats: dict[str, dict[str, Any]],
                     ) -> CheckpointManifest:
        """A copy with `modules` and `stats` added to (or replacing) those already listed."""
        return replace(self, modules={**self.modules, **modules}, stats={**self.stats, **stats})

    def to_dict(self) -> dict[str, Any]:
        """The flat keys `quantization_config` stores (`modules`, `stats`, `format_version`), deep-copied."""
        return {"modules": copy.deepcopy(self.modules), "stats": copy.deepcopy(self.stats),
                "format_version": self.format_version}

"""Architecture registry: every module of this package that defines `ARCH` (an ArchSpec) is one family.

Adding a family is adding one file here (plus its tiny builder in `hf_vlm_gptq.testing`) and editing nothing
else: the pipeline, loader, export, compat, demo, CLI and tests read the registry (compat's research-code
entry points exist only for the two families that code had).
"""

from __future__ import annotations

import importlib
import pkgutil

from .spec import ArchSpec, ComponentSpec, VllmLayout, find_module


def _discover() -> tuple[ArchSpec, ...]:
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.name == "spec":
            continue
        spec = getattr(importlib.import_module(f"{__name__}.{info.name}"), "ARCH", None)
        if isinstance(spec, ArchSpec):
            found.append(spec)
    return tuple(found)


ARCHITECTURES: tuple[ArchSpec, ...] = _discover()


def supported_model_types() -> list[str]:
    return sorted(t for spec in ARCHITECTURES for t in spec.model_types)


def spec_for_name(name: str) -> ArchSpec:
    """The ArchSpec called `name` (its `name` field), or a ValueError listing them."""
    for spec in ARCHITECTURES:
        if spec.name == name:
            return spec
    raise ValueError(f"no architecture named {name!r}; registered: {', '.join(s.name for s in ARCHITECTURES)}")


def spec_for_model_type(model_type: str) -> ArchSpec:
    """The ArchSpec for `model_type`, or a ValueError listing the supported ones."""
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    raise ValueError(
        f"hf_vlm_gptq has no handler for model_type {model_type!r}; supported: "
        f"{', '.join(supported_model_types())}."
    )


__all__ = ["ARCHITECTURES", "ArchSpec", "ComponentSpec", "VllmLayout", "find_module", "spec_for_model_type",
           "spec_for_name", "supported_model_types"]

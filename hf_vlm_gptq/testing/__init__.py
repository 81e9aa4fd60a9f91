"""Offline test helpers: tiny real checkpoints of the supported VLM families (see ``tiny_models``)."""

from .tiny_models import build_tiny_qwen2vl, build_tiny_videollama3

__all__ = ["build_tiny_qwen2vl", "build_tiny_videollama3"]

"""Triton kernels on a host without a GPU: run them in the Triton interpreter.

``TRITON_INTERPRET=1`` must be set before a kernel module (``ops/triton_*.py``) is imported, which the
library only does on CUDA paths and the tests do at collection time, after this file. On a CUDA host the
variable is left alone and the kernels compile.

Tests marked ``slow_interp`` take seconds each in the interpreter: they are skipped there unless
``RUN_SLOW=1``, and always run on CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def pytest_collection_modifyitems(config, items):
    if not _interpreting() or os.environ.get("RUN_SLOW", "0") == "1":
        return
    skip = pytest.mark.skip(reason="slow in the Triton interpreter (RUN_SLOW=1 runs it)")
    for item in items:
        if "slow_interp" in item.keywords:
            item.add_marker(skip)


def _patch_interpreter_bf16() -> None:
    """Two bfloat16 gaps of the interpreter (it keeps bf16 as uint16 and converts by bit manipulation):

    * ``tl.dot`` multiplies the raw bits (triton issue 11584, not supported upstream yet): convert bf16
      operands to fp32 first -- exact, and what the GPU's bf16 x bf16 -> fp32 tensor-core products give;
    * fp32 -> bf16 casts truncate the mantissa: round to nearest even instead, as the GPU does.

    With both, bf16 kernels can be checked on CPU against torch's bf16 arithmetic."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except ImportError:
        return
    builder = interp.InterpreterBuilder
    if getattr(builder.create_dot, "_bf16_patched", False):
        return
    original_dot, original_cast = builder.create_dot, builder.cast_impl

    def to_fp32(h):
        if h.dtype != tl.bfloat16:
            return h
        data = interp._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interp.TensorHandle(data.reshape(h.data.shape), tl.float32)

    def create_dot(self, a, b, d, *args, **kwargs):
        return original_dot(self, to_fp32(a), to_fp32(b), d, *args, **kwargs)

    def cast_impl(self, src, dst_type):  # every implicit-rounding cast (.to(tl.bfloat16)) lands here
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            f32 = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            bits = f32.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return interp.TensorHandle(bits.reshape(src.data.shape), tl.bfloat16)
        return original_cast(self, src, dst_type)

    create_dot._bf16_patched = True
    builder.create_dot = create_dot
    builder.cast_impl = cast_impl


if _interpreting():
    _patch_interpreter_bf16()

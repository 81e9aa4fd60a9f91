"""Run the Triton kernels on CPU through Triton's interpreter (tests and bench dry runs; no GPU needed).

``TRITON_INTERPRET=1`` must be in the environment before a kernel module (``ops/triton_*.py``) is imported:
Triton decides at decoration time whether a kernel compiles or is interpreted. :func:`use_interpreter`
sets it (unless CUDA is available) and patches two bfloat16 gaps of the interpreter, which keeps bf16 as
uint16 and converts by bit manipulation:

* ``tl.dot`` multiplies the raw bits of bf16 operands (triton issue 11584, not supported upstream yet):
  the operands are converted to fp32 first -- exact, and what the GPU's bf16 x bf16 -> fp32 tensor-core
  products give;
* fp32 -> bf16 casts truncate the mantissa where the compiled kernel rounds to nearest even: they round
  to nearest even.

With both, bf16 kernels can be checked on CPU against torch's bf16 arithmetic.
"""

from __future__ import annotations

import os

import torch


def interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_interpreter() -> bool:
    """On a host without CUDA: set ``TRITON_INTERPRET=1`` (unless already set) and patch the interpreter's
    bf16 gaps. Returns whether the interpreter is on. Call before importing ``ops/triton_*.py``."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if interpreter_enabled():
        _patch_bf16()
    return interpreter_enabled()


def _patch_bf16() -> None:
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

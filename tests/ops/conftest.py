"""Triton kernels on a host without a GPU: run them in the Triton interpreter.

``TRITON_INTERPRET=1`` must be set before a kernel module (``ops/triton_*.py``) is imported, which the
library only does on CUDA paths and the tests do at collection time, after this file
(``hf_vlm_gptq.testing.triton_interp`` also patches two bf16 gaps of the interpreter). On a CUDA host the
variable is left alone and the kernels compile.

Tests marked ``slow`` (sweeps over many settings: seconds each in the interpreter, a compile each on a
GPU) are skipped unless ``RUN_SLOW=1``.
"""

from __future__ import annotations

import os

import pytest

from hf_vlm_gptq.testing.triton_interp import use_interpreter

use_interpreter()


def pytest_collection_modifyitems(config, items):
    if os.environ.get("RUN_SLOW", "0") == "1":
        return
    skip = pytest.mark.skip(reason="a slow sweep (RUN_SLOW=1 runs it)")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)

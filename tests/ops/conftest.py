"""Triton kernels on a host without a GPU: run them in the Triton interpreter.

``TRITON_INTERPRET=1`` must be set before a kernel module (``ops/triton_*.py``) is imported, which the
library only does on CUDA paths and the tests do at collection time, after this file
(``hf_vlm_gptq.testing.triton_interp`` also patches two bf16 gaps of the interpreter). On a CUDA host the
variable is left alone and the kernels compile.

Tests marked ``slow`` (sweeps over many settings: seconds each in the interpreter, a compile each on a
GPU) are deselected unless ``RUN_SLOW=1``.
"""

from __future__ import annotations

import os

from hf_vlm_gptq.testing.triton_interp import use_interpreter

use_interpreter()


def pytest_collection_modifyitems(config, items):
    if os.environ.get("RUN_SLOW", "0") == "1":
        return
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    if slow:  # deselected (counted as such in the summary), not hundreds of skips
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item.get_closest_marker("slow") is None]

"""The `hf-vlm-gptq` command: sets the OpenMP wait policy for its own process, then runs the CLI.

libgomp (torch's CPU thread pool) reads `OMP_WAIT_POLICY` once, when torch is imported. Its default lets
threads spin at every barrier, which makes a run on a busy machine several times slower (see
hf_vlm_gptq/threads.py). The command is its own process, so it asks for PASSIVE waiting before anything
imports torch, unless the user set a policy; the library itself leaves the environment alone.
"""

from __future__ import annotations

import os


def main() -> int | None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from hf_vlm_gptq.cli import main as cli_main

    return cli_main()

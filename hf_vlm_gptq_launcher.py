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
    import sys

    if len(sys.argv) > 1 and sys.argv[1] in ("quantize", "export", "export-vllm", "demo"):
        # the first line at once: importing torch and transformers takes seconds on a busy machine
        print(f"[hf-vlm-gptq] {sys.argv[1]}: loading torch and transformers", file=sys.stderr, flush=True)
    from hf_vlm_gptq.cli import main as cli_main

    return cli_main()

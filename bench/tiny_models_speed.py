"""How fast the tiny offline models build and run, against the budgets the test suite relies on.

    python -m bench.tiny_models_speed [--arch qwen2_vl,video_llama_3] [--repeats 5]

For each family (default: every registered one): the time to build its tiny checkpoint
(`ArchSpec.build_tiny`: config, random weights, a tokenizer trained on the spot, processors) and the time of
one forward pass on a 96x80 image prompt after a warm-up (best of `--repeats`), each printed with its ratio
to the budget (build 5 s, forward 0.2 s; a ratio above 1 is over budget). Wall-clock figures: on a shared
host read them as rough. Prints only; writes nothing but a temporary folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import logging as hf_logging

from hf_vlm_gptq.arch import ARCHITECTURES, spec_for_name

BUILD_BUDGET_S = 5.0
FORWARD_BUDGET_S = 0.2


def _image_prompt(processor) -> dict:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "Describe the image."}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


def measure(name: str, folder: Path, repeats: int) -> tuple[float, float]:
    """(build seconds, best forward seconds) of one family's tiny model."""
    start = time.perf_counter()
    path = spec_for_name(name).build_tiny(folder / name, seed=0)
    build = time.perf_counter() - start
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    inputs = _image_prompt(AutoProcessor.from_pretrained(path))
    times = []
    with torch.no_grad():
        model(**inputs)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(**inputs)
            times.append(time.perf_counter() - start)
    return build, min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default=",".join(spec.name for spec in ARCHITECTURES),
                        help="comma-separated family names (default: all registered)")
    parser.add_argument("--repeats", type=int, default=5, help="timed forward passes per family (best is shown)")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'family':<14} {'build s':>8} {'/ budget':>8} {'forward ms':>11} {'/ budget':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.arch.split(","):
            build, forward = measure(name, Path(tmp), max(1, args.repeats))
            print(f"{name:<14} {build:>8.2f} {build / BUILD_BUDGET_S:>7.2f}x {forward * 1e3:>11.1f} "
                  f"{forward / FORWARD_BUDGET_S:>7.2f}x")


if __name__ == "__main__":
    main()

"""llm-compressor's GPTQ on a VLM checkpoint's language model, for bench/quantize_speed.py and bench/accuracy.py.

    /work/llmc-venv/bin/python bench/llmc_gptq.py MODEL_DIR BATCHES.pt OUT.json [--group 128] [--bits 4]
        [--save DIR]

(a file path, not ``-m``: bench.quantize_speed starts it in that virtualenv, where this project is not
installed).

Runs in llm-compressor's own virtualenv (it pins other transformers versions), so it imports nothing from
hf_vlm_gptq. Calibration batches are the processed inputs bench/quantize_speed.py saved (the same ones our
pipeline and the reference used). Writes {"seconds": oneshot wall time, "versions": ..., "layers": n};
`--save DIR` also writes the compressed-tensors checkpoint (plain transformers loads it) with the processor.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("batches")
    parser.add_argument("out")
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--save", default=None, help="write the quantized checkpoint (compressed-tensors) here")
    args = parser.parse_args()

    import compressed_tensors
    import llmcompressor
    import torch
    import transformers
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from torch.utils.data import DataLoader
    from transformers import AutoModelForImageTextToText, AutoProcessor

    batches = torch.load(args.batches, weights_only=True)
    model = AutoModelForImageTextToText.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype))
    decoder_layer = type(model.model.language_model.layers[0]).__name__  # the LLM's blocks, by class name
    if torch.cuda.is_available():
        model.to("cuda")
    loader = DataLoader(batches, batch_size=1, collate_fn=lambda rows: rows[0])
    scheme = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": args.bits, "type": "int", "symmetric": True,
                                                              "strategy": "group", "group_size": args.group}}}
    dense = ["lm_head", "re:.*visual.*", "re:.*vision.*", "re:.*projector.*", "re:.*merger.*"]  # LLM only
    recipe = GPTQModifier(config_groups=scheme, ignore=dense, dampening_frac=0.01,
                          block_size=128, actorder=None)
    start = time.perf_counter()
    oneshot(model=model, dataset=loader, recipe=recipe, num_calibration_samples=len(batches),
            sequential_targets=[decoder_layer], pipeline="sequential")
    seconds = time.perf_counter() - start
    if args.save:
        model.save_pretrained(args.save, save_compressed=True)
        AutoProcessor.from_pretrained(args.model_dir).save_pretrained(args.save)
    layers = sum(1 for name, _ in model.named_modules() if name.endswith("mlp.down_proj"))
    result = {"seconds": seconds, "layers": layers, "samples": len(batches), "ignore": dense,
              "versions": {"llmcompressor": llmcompressor.__version__, "transformers": transformers.__version__,
                           "compressed_tensors": compressed_tensors.__version__, "torch": torch.__version__}}
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()

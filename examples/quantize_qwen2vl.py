"""Quantize Qwen2-VL (vision tower, merger and language model) to 4 bits and save it.

    python examples/quantize_qwen2vl.py Qwen/Qwen2-VL-7B-Instruct qwen2-vl-7b-w4g128 --images my_images/

Without --images the package's built-in synthetic calibration set is used. Offline, try it on the tiny
model the demo builds:  python examples/quantize_qwen2vl.py --tiny out/
"""

import argparse
import logging
import tempfile

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import hf_vlm_gptq  # registers quant_method "vlm_gptq" with transformers
from hf_vlm_gptq import VLMGPTQConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", help="hub id or folder of a Qwen2-VL checkpoint")
    parser.add_argument("out")
    parser.add_argument("--images", default=None, help="folder of calibration images")
    parser.add_argument("--tiny", action="store_true", help="use a tiny offline Qwen2-VL instead of MODEL")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    model_path = args.model
    if args.tiny:
        from hf_vlm_gptq.testing import build_tiny_qwen2vl

        model_path = build_tiny_qwen2vl(tempfile.mkdtemp())
    config = VLMGPTQConfig(
        dataset=args.images,          # None -> built-in synthetic images, clips and text
        num_samples=128,
        visual_w_bits=4, llm_w_bits=4,
        w_groupsize=32 if args.tiny else 128,
        act_order=False,
    )
    model = AutoModelForImageTextToText.from_pretrained(model_path, quantization_config=config,
                                                        dtype=torch.bfloat16)
    print(hf_vlm_gptq.quantization_report(model))
    model.save_pretrained(args.out)
    AutoProcessor.from_pretrained(model_path).save_pretrained(args.out)


if __name__ == "__main__":
    main()

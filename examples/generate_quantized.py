"""Load a checkpoint written by hf_vlm_gptq and describe an image with it.

    python examples/generate_quantized.py qwen2-vl-7b-w4g128 photo.jpg
"""

import sys

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import hf_vlm_gptq  # noqa: F401  -- import BEFORE from_pretrained: it teaches transformers "vlm_gptq"


def main() -> None:
    path, image_path = sys.argv[1], sys.argv[2]
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16)
    processor = AutoProcessor.from_pretrained(path)
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(image_path)},
                                             {"type": "text", "text": "Describe this image."}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt").to(model.device)
    out = model.generate(**inputs, max_new_tokens=64, do_sample=False)
    print(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])


if __name__ == "__main__":
    main()

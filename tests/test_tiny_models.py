"""Tiny offline checkpoints: they load through the Auto classes, run forward and generate on image, video and
text prompts through the real processors, and are deterministic by seed. (How fast they build and run:
`python -m bench.tiny_models_speed`.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from generation_checks import assert_greedy
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from hf_vlm_gptq.testing import build_tiny_qwen2vl, build_tiny_videollama3

ARCHS = ("qwen2_vl", "video_llama_3")


@pytest.fixture(scope="module")
def loaded(tiny_qwen2vl_dir, tiny_videollama3_dir):
    """arch -> (model, processor), loaded once per module from the session dirs."""
    out = {}
    for arch, path in (("qwen2_vl", tiny_qwen2vl_dir), ("video_llama_3", tiny_videollama3_dir)):
        out[arch] = (AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path))
    return out


def _image(seed: int = 0, size: tuple[int, int] = (96, 80)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _frames(n: int = 4) -> list[Image.Image]:
    return [_image(seed=t, size=(64, 64)) for t in range(n)]


def _messages(kind: str) -> list[dict]:
    if kind == "image":
        content = [{"type": "image", "image": _image()}, {"type": "text", "text": "Describe the image."}]
    elif kind == "video":
        content = [{"type": "video", "video": _frames()}, {"type": "text", "text": "What happens in the video?"}]
    else:
        content = [{"type": "text", "text": "What is quantization?"}]
    return [{"role": "user", "content": content}]


def _encode(processor, kind: str):
    kwargs = {"processor_kwargs": {"video_metadata": [{"total_num_frames": 4, "fps": 2.0,
                                                       "frames_indices": [0, 1, 2, 3]}]}} if kind == "video" else {}
    return processor.apply_chat_template(_messages(kind), add_generation_prompt=True, tokenize=True,
                                         return_dict=True, return_tensors="pt", **kwargs)


@pytest.mark.parametrize("arch", ARCHS)
def test_dirs_load_with_auto_classes_and_ids_are_consistent(arch, loaded):
    model, processor = loaded[arch]
    cfg, tok = model.config, processor.tokenizer
    assert cfg.model_type == arch
    expected = {"qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", "Qwen2VLImageProcessor",
                             "Qwen2VLVideoProcessor"),
                "video_llama_3": ("VideoLlama3ForConditionalGeneration", "VideoLlama3Processor",
                                  "VideoLlama3ImageProcessor", "VideoLlama3VideoProcessor")}[arch]
    got = (type(model).__name__, type(processor).__name__, type(processor.image_processor).__name__,
           type(processor.video_processor).__name__)
    assert got == expected
    assert cfg.text_config.vocab_size == len(tok)
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>") == processor.image_token_id
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>") == processor.video_token_id
    if arch == "qwen2_vl":
        assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
        assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    gen = model.generation_config
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen.eos_token_id
    assert gen.pad_token_id == tok.pad_token_id
    # the trained vocabulary is small but real: ordinary words are single tokens or a few merges
    assert 300 < len(tok) < 1100
    assert len(tok.tokenize(" the image")) <= 3


def test_patch_stems_and_awkward_sizes(loaded):
    qwen, _ = loaded["qwen2_vl"]
    stem = qwen.model.visual.patch_embed.proj
    assert isinstance(stem, torch.nn.Conv3d) and stem.weight[0].numel() == 3 * 2 * 14 * 14
    vl3, _ = loaded["video_llama_3"]
    stem = vl3.model.vision_model.embeddings.patch_embedding
    assert isinstance(stem, torch.nn.Conv2d) and stem.weight[0].numel() == 3 * 14 * 14
    fc1 = vl3.model.vision_model.encoder.layers[0].mlp.fc1
    assert fc1.out_features % 16 == 0 and fc1.out_features % 32 != 0  # like SigLIP's 4304


def test_chat_templates_expand_vision_placeholders(loaded):
    _, qwen_proc = loaded["qwen2_vl"]
    prompt = qwen_proc.apply_chat_template(_messages("image"), add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert "<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    video_prompt = qwen_proc.apply_chat_template(_messages("video"), add_generation_prompt=True)
    assert "<|vision_start|><|video_pad|><|vision_end|>" in video_prompt
    _, vl3_proc = loaded["video_llama_3"]
    prompt = vl3_proc.apply_chat_template(_messages("image"), add_generation_prompt=True)
    assert prompt == "<|im_start|>user\n<|image_pad|>\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("kind", ["image", "video", "text"])
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_and_generate(arch, kind, loaded):
    model, processor = loaded[arch]
    inputs = _encode(processor, kind)
    n_vision = int(torch.isin(inputs["input_ids"], torch.tensor([model.config.image_token_id,
                                                                model.config.video_token_id])).sum())
    assert (n_vision > 0) == (kind != "text")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    last = logits[0, -1]
    assert last.std() > 0.5 and last.softmax(-1).max() < 0.99  # peaked but not degenerate
    out = model.generate(**inputs, max_new_tokens=4)  # the tiny models' generation config is greedy
    assert out.shape[1] - inputs["input_ids"].shape[1] <= 4
    assert int(out[0, inputs["input_ids"].shape[1]]) == int(last.argmax())
    assert_greedy(model, inputs, out)
    # the tokens decode back to text: the user's words come out as written (no byte-level symbols)
    words = _messages(kind)[0]["content"][-1]["text"]
    assert words in processor.decode(out[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_inputs_change_the_output(arch, loaded):
    model, processor = loaded[arch]
    with torch.no_grad():
        a = model(**_encode(processor, "image")).logits[0, -1]
        b = model(**_encode(processor, "text")).logits[0, -1]
    assert not torch.allclose(a, b, atol=1e-3)


@pytest.mark.parametrize("builder", [build_tiny_qwen2vl, build_tiny_videollama3])
def test_deterministic_by_seed(builder, tmp_path):
    first = load_file(str(builder(tmp_path / "a", seed=0) / "model.safetensors"))
    second = load_file(str(builder(tmp_path / "b", seed=0) / "model.safetensors"))
    other = load_file(str(builder(tmp_path / "c", seed=1) / "model.safetensors"))
    assert first.keys() == second.keys() == other.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "c" / "tokenizer.json").read_text()


def test_building_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_videollama3(tmp_path / "v")
    assert torch.equal(torch.rand(3), expected)


def test_overrides_reach_the_configs(tmp_path):
    path = build_tiny_qwen2vl(tmp_path / "q", num_llm_layers=1, text_config={"intermediate_size": 96},
                              vision_config={"mlp_ratio": 2}, max_pixels=56 * 56)
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert model.config.text_config.num_hidden_layers == 1
    assert model.config.text_config.intermediate_size == 96
    assert model.config.vision_config.mlp_ratio == 2
    inputs = _encode(processor, "image")
    assert int(inputs["image_grid_thw"].prod()) * 14 * 14 <= 56 * 56  # 96x80 squeezed into 56x56 pixels

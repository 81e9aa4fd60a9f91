"""Video calibration end to end, through each architecture's real processor: clips given as a list of
frames, an array or a file (PyAV), mixed with pictures and text, reach the vision tower (a sample with a
picture AND a clip sends both); an undecodable clip fails before any weight is loaded, naming the sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText

from hf_vlm_gptq import VLMGPTQConfig, get_quantizers
from hf_vlm_gptq.calib import builtin_samples

VISION = {"qwen2_vl": "model.visual", "video_llama_3": "model.vision_model"}
BRIDGE = {"qwen2_vl": "model.visual.merger", "video_llama_3": "model.projector"}
LLM = "model.language_model.layers"


@pytest.fixture(params=["qwen2_vl", "video_llama_3"])
def tiny_dir(request):
    return request.param, request.getfixturevalue(
        "tiny_qwen2vl_dir" if request.param == "qwen2_vl" else "tiny_videollama3_dir")


def _clip(n: int = 4, size: tuple[int, int] = (64, 48)) -> list[np.ndarray]:
    frames = []
    for t in range(n):
        frame = np.full((size[1], size[0], 3), 90, np.uint8)
        frame[8:24, 2 + 8 * t: 18 + 8 * t] = (20, 200, 220)
        frames.append(frame)
    return frames


def test_every_video_form_reaches_the_vision_tower(tiny_dir, video_file):
    arch, path = tiny_dir
    picture = next(s for s in builtin_samples(3, seed=4) if "image" in s)["image"]
    clip = _clip()
    dataset = [
        {"video": list(clip), "text": "What moves?"},  # list of frames (arrays)
        {"video": np.stack(clip), "text": "Describe the clip.", "answer": "A square moves right."},  # array
        {"video": str(video_file)},  # a file, decoded with PyAV
        {"image": picture, "text": "Describe."},
        {"text": "Name three colors.", "answer": "Red, green and blue."},
        {"image": picture, "video": str(video_file), "text": "Compare the picture and the clip."},
        {"text": "Say hello."},
    ]
    cfg = VLMGPTQConfig(dataset=dataset, num_samples=len(dataset), w_groupsize=32)
    model = AutoModelForImageTextToText.from_pretrained(path, quantization_config=cfg, dtype=torch.float32)
    records = get_quantizers(model)
    vision_inputs = 3 + 1 + 2  # three clips, one picture, one sample with both (the tower runs twice for it)
    for part in (VISION[arch], BRIDGE[arch]):
        recs = [r for p, r in records.items() if p.startswith(part)]
        assert recs and all(r.samples == vision_inputs and r.fallback is None for r in recs), part
    assert all(r.samples == len(dataset) for p, r in records.items() if p.startswith(LLM))


def test_undecodable_video_fails_before_loading_weights(tiny_dir, tmp_path):
    _arch, path = tiny_dir
    garbage = tmp_path / "broken.mp4"
    garbage.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 20)
    cfg = VLMGPTQConfig(dataset=[{"text": "fine"}, {"image": np.zeros((56, 56, 3), np.uint8)},
                                 {"video": str(garbage), "text": "What happens?"}], num_samples=3)
    with pytest.raises(ValueError, match=r"sample 2: field 'video': cannot decode video '.*broken\.mp4'") as info:
        AutoModelForImageTextToText.from_pretrained(path, quantization_config=cfg, dtype=torch.float32)
    assert any(entry.name == "_process_model_before_weight_loading" for entry in info.traceback)

"""Promises about bad input, made early and by name (issue 10, points 12 and 14).

Config fields (point 12):
* `modules_to_not_convert` is a list of module paths; a single string is an error (it used to be split into
  characters and ignored). Paths that match no module of the model get a warning naming them when
  quantizing starts (with the model's own name when a checkpoint key was given).
* `calibration_device`, `processor` and `seed` are checked when the config is made, before any weights load.
* `num_samples` with the built-in calibration set is at most 1024: a huge value fails at once instead of
  drawing pictures for hours.

Calibration images (point 14):
* 16-bit images (PIL mode I;16, uint16 arrays, 16-bit PNG files) are scaled to 8 bits, not clipped to white.
* A float array holding NaN / inf is an error naming the sample.
* A decompression-bomb image (PIL's limit) is an error naming the sample, however it is given.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from hf_vlm_gptq import VLMGPTQConfig
from hf_vlm_gptq.api import quantize
from hf_vlm_gptq.calib import load_samples

TEXT = [{"text": "Write a haiku about autumn.", "answer": "Red leaves fall slowly."},
        {"text": "What is two plus two?", "answer": "Four."}]

# --- point 12: config fields ------------------------------------------------------------------------


def test_a_string_modules_to_not_convert_is_refused():
    with pytest.raises(ValueError, match=r"modules_to_not_convert.*string 'model.visual'.*\['model.visual'\]"):
        VLMGPTQConfig(modules_to_not_convert="model.visual")
    assert VLMGPTQConfig(modules_to_not_convert=("model.visual",)).modules_to_not_convert == ["model.visual"]


def test_prefixes_that_match_no_module_get_a_warning_naming_them(tiny_qwen2vl_dir, caplog):
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2vl_dir, dtype=torch.float32)
    keep = ["model.language_model.layers.1.mlp",  # matches
            "model.layers.0.self_attn",  # a checkpoint key (legacy layout), not the module's path
            "model.visual.blocks.9"]  # there is no block 9
    cfg = VLMGPTQConfig(quant_visual_clip=False, quant_cross_attention=False, llm_w_rtn=True, w_groupsize=32,
                        num_samples=2, modules_to_not_convert=keep)
    with caplog.at_level(logging.WARNING, logger="hf_vlm_gptq"):
        records = quantize(model, cfg, data=TEXT, progress=False)
    assert cfg.manifest.is_empty and set(model.config.quantization_config.modules) == set(records)  # cfg untouched
    warnings = [r.getMessage() for r in caplog.records if "modules_to_not_convert" in r.getMessage()]
    assert len(warnings) == 1
    assert "'model.layers.0.self_attn'" in warnings[0] and "'model.visual.blocks.9'" in warnings[0]
    assert "'model.language_model.layers.1.mlp'" not in warnings[0]
    assert "did you mean 'model.layers.0.self_attn' -> 'model.language_model.layers.0.self_attn'" in warnings[0]
    assert not any(path.startswith(keep[0]) for path in records)  # the matching prefix was honoured


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("calibration_device", "cdua", "not a device"),
        ("calibration_device", "meta", "meta"),
        ("processor", "Qwen/Qwen2-VL-7B-Instruct", "AutoProcessor.from_pretrained"),
        ("processor", object(), "apply_chat_template"),
        ("seed", -1, ">= 0"),
        ("seed", "0", "int"),
    ],
)
def test_calibration_device_processor_and_seed_are_checked_in_the_config(field, value, says):
    with pytest.raises(ValueError, match=f"VLMGPTQConfig.{field}") as err:
        VLMGPTQConfig(**{field: value})
    assert says in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_calibration_device_this_machine_lacks_is_refused_before_weights_load(tiny_qwen2vl_dir):
    with pytest.raises(ValueError, match=r"calibration_device='cuda'.*no cuda device"):
        VLMGPTQConfig(calibration_device="cuda")
    # a saved checkpoint's config is not about this machine: loading it elsewhere is fine
    saved = VLMGPTQConfig().to_dict() | {"calibration_device": "cuda", "modules": {"x": {"kind": "linear"}}}
    assert VLMGPTQConfig.from_dict(saved).calibration_device == "cuda"


def test_a_huge_num_samples_with_the_builtin_set_fails_at_once(tiny_qwen2vl_dir):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"num_samples=1000000 .*built-in.* at most 1024"):
        AutoModelForImageTextToText.from_pretrained(
            tiny_qwen2vl_dir, quantization_config=VLMGPTQConfig(num_samples=10**6), dtype=torch.float32)
    assert time.perf_counter() - start < 60  # it used to draw a million pictures first
    VLMGPTQConfig(num_samples=10**6, dataset=TEXT)  # with the user's own data it is only an upper bound


# --- point 14: calibration images -------------------------------------------------------------------

def _gradient16(h: int = 32, w: int = 48) -> np.ndarray:
    return np.linspace(0, 65535, h * w).reshape(h, w).astype(np.uint16)


def _pixels(sample: dict) -> np.ndarray:
    return np.asarray(sample["image"], dtype=np.float64)


@pytest.mark.parametrize("form", ["PIL I;16", "uint16 array", "uint16 RGB array", "16-bit PNG file"])
def test_16_bit_images_are_scaled_not_clipped_to_white(form, tmp_path):
    gray = _gradient16()
    if form == "PIL I;16":
        image = Image.fromarray(gray)
        assert image.mode == "I;16"
    elif form == "uint16 array":
        image = gray
    elif form == "uint16 RGB array":
        image = np.stack([gray, gray // 2, 65535 - gray], -1)
    else:
        image = str(tmp_path / "gray16.png")
        Image.fromarray(gray).save(image)
    (sample,) = load_samples([{"image": image}], 1)
    pixels = _pixels(sample)
    expected = np.round(gray / 257.0)
    assert np.abs(pixels[..., 0] - expected).max() <= 1  # 65535 -> 255, 32768 -> 128, not all 255
    assert 100 < pixels[..., 0].mean() < 155
    if form == "uint16 RGB array":
        assert np.abs(pixels[..., 2] - (255 - expected)).max() <= 1


def test_8_bit_and_float_images_are_unchanged(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3)).astype(np.uint8)
    (a, b, c) = load_samples([{"image": rgb}, {"image": rgb.astype(np.int64)}, {"image": rgb / 255.0}], 3)
    for sample in (a, b, c):
        assert np.abs(_pixels(sample) - rgb).max() <= 1


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("where", ["image", "video frame"])
def test_a_float_array_with_nan_is_an_error_naming_the_sample(bad, where):
    array = np.random.default_rng(0).random((16, 16, 3))
    array[3, 4, 1] = bad
    sample = {"image": array} if where == "image" else {"video": [array * 0.5, array]}
    kind = "NaN" if np.isnan(bad) else "inf"
    with pytest.raises(ValueError, match=rf"sample 2: field '{where.split()[0]}'.*{kind}"):
        load_samples([TEXT[0], TEXT[1], sample], 3)


@pytest.fixture
def small_bomb_limit(monkeypatch):
    """PIL's decompression-bomb limit lowered so that a 64x64 picture trips it (2x the limit raises)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)


@pytest.mark.parametrize("form", ["path", "bytes", "folder", "datasets.Dataset"])
def test_a_decompression_bomb_gets_the_sample_index_in_its_error(form, tmp_path, small_bomb_limit):
    folder = tmp_path / "pictures"
    folder.mkdir()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / "a_small.png")
    Image.new("RGB", (64, 64), (200, 20, 30)).save(folder / "b_bomb.png")
    bomb = folder / "b_bomb.png"
    if form == "path":
        data = [TEXT[0], {"image": str(bomb)}]
    elif form == "bytes":
        data = [TEXT[0], {"image": {"bytes": bomb.read_bytes(), "path": None}}]
    elif form == "folder":
        data = str(folder)
    else:
        datasets = pytest.importorskip("datasets")
        data = datasets.Dataset.from_dict({"image": [str(folder / "a_small.png"), str(bomb)],
                                           "text": ["small", "bomb"]}).cast_column("image", datasets.Image())
    with pytest.raises(ValueError, match=r"sample 1\b.*(decompression|DecompressionBomb)"):
        load_samples(data, 2)

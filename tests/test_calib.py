"""Calibration data: the built-in set, every accepted form of user data, errors that name the sample and
field, and processor inputs the tiny models accept (both architectures)."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from hf_vlm_gptq.calib import (
    build_model_inputs,
    builtin_samples,
    decode_video,
    load_samples,
    normalize_sample,
)


def _digest(image: Image.Image) -> str:
    return hashlib.sha1(image.tobytes()).hexdigest()


def _frames(n: int, size: tuple[int, int] = (64, 48)) -> list[np.ndarray]:
    """Frames with a bright square moving right (codec friendly: smooth, even sizes)."""
    out = []
    for t in range(n):
        frame = np.full((size[1], size[0], 3), 40, np.uint8)
        frame[10:26, 4 + 3 * t: 20 + 3 * t] = (230, 200, 40)
        out.append(frame)
    return out


def _write_video(path, frames: list[np.ndarray], fps: int = 4) -> None:
    av = pytest.importorskip("av")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# --- built-in set -------------------------------------------------------------------------------------


def test_builtin_is_deterministic_and_prefix_stable():
    a, b = builtin_samples(10, seed=3), builtin_samples(10, seed=3)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and x["text"] == y["text"] and x.get("answer") == y.get("answer")
        if "image" in x:
            assert _digest(x["image"]) == _digest(y["image"])
        if "video" in x:
            assert [_digest(f) for f in x["video"]] == [_digest(f) for f in y["video"]]
    prefix = builtin_samples(5, seed=3)
    assert [s["text"] for s in prefix] == [s["text"] for s in a[:5]]
    other = builtin_samples(10, seed=4)
    assert [_digest(s["image"]) for s in a if "image" in s] != [_digest(s["image"]) for s in other if "image" in s]


def test_builtin_is_varied_and_has_video_and_text_only(builtin_samples_small):
    samples = builtin_samples_small
    images = [s["image"] for s in samples if "image" in s]
    videos = [s["video"] for s in samples if "video" in s]
    text_only = [s for s in samples if "image" not in s and "video" not in s]
    assert len(images) >= 8 and len(videos) >= 2 and len(text_only) >= 1
    assert len({_digest(im) for im in images}) == len(images)
    assert len({im.size for im in images}) >= 3
    assert all(im.mode == "RGB" for im in images)
    assert len({s["text"] for s in samples}) >= 8
    assert all(isinstance(s.get("answer"), str) and s["answer"] for s in samples)
    for clip in videos:
        assert 4 <= len(clip) <= 8 and len({f.size for f in clip}) == 1
        assert _digest(clip[0]) != _digest(clip[-1])  # something moves
    # pictures are not flat noise: real structure, a spread of colors
    stds = [np.asarray(im, np.float32).std() for im in images]
    assert min(stds) > 5
    assert not any("video" in s for s in builtin_samples(12, seed=0, with_video=False))


def test_load_samples_none_is_the_builtin_set():
    got = load_samples(None, 6, seed=2)
    want = builtin_samples(6, seed=2)
    assert [s["text"] for s in got] == [s["text"] for s in want]


# --- user data forms ----------------------------------------------------------------------------------


def test_each_image_form(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "pic.png")
    chw_float = rgb.transpose(2, 0, 1).astype(np.float32) / 255.0
    samples = load_samples([
        {"image": Image.fromarray(rgb).convert("RGBA"), "text": "a"},
        {"image": rgb, "text": "b"},
        {"image": str(tmp_path / "pic.png"), "text": "c", "answer": "d"},
        {"image": tmp_path / "pic.png"},
        {"image": chw_float},
        {"image": rgb[..., 0]},
        {"image": torch.from_numpy(rgb)},
    ], num_samples=10)
    assert len(samples) == 7
    for sample in samples:
        assert sample["image"].mode == "RGB" and sample["image"].size == (50, 40)
    assert np.array_equal(np.asarray(samples[0]["image"]), rgb)
    assert np.array_equal(np.asarray(samples[2]["image"]), rgb)
    assert np.abs(np.asarray(samples[4]["image"]).astype(int) - rgb).max() <= 1
    assert samples[2]["answer"] == "d" and samples[3]["text"] == "Describe the image."


def test_each_video_form(tmp_path):
    frames = _frames(6)
    _write_video(tmp_path / "clip.mp4", frames, fps=4)
    samples = load_samples([
        {"video": [Image.fromarray(f) for f in frames], "text": "list"},
        {"video": np.stack(frames), "text": "array"},
        {"video": str(tmp_path / "clip.mp4"), "text": "file"},
    ], num_samples=3)
    for sample in samples:
        assert len(sample["video"]) == 6 and sample["video"][0].size == (64, 48)
    assert samples[2]["video_fps"] == pytest.approx(4.0)
    decoded = np.asarray(samples[2]["video"][3], np.float32)
    assert np.abs(decoded - frames[3]).mean() < 12  # lossy codec, same picture
    assert load_samples([{"video": np.stack(frames)}], 1)[0]["text"] == "Describe the video."


def test_long_videos_are_subsampled(tmp_path):
    _write_video(tmp_path / "long.mp4", _frames(20), fps=10)
    frames, fps = decode_video(tmp_path / "long.mp4", max_frames=16)
    assert len(frames) == 16 and fps == pytest.approx(8.0)


def test_messages_dataset_folder_and_iterables(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (30, 30, 3), dtype=np.uint8)
    for name in ("b.png", "a.jpg", "c.webp"):
        Image.fromarray(rgb).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    folder = load_samples(str(tmp_path), num_samples=2)
    assert len(folder) == 2 and all(s["text"] == "Describe the image." for s in folder)

    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image", "path": str(tmp_path / "a.jpg")},
                                             {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Noise."}]}]
    (sample,) = load_samples([{"messages": messages}], num_samples=1)
    part = sample["messages"][1]["content"][0]
    assert part["type"] == "image" and isinstance(part["image"], Image.Image)

    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({"image": [Image.fromarray(rgb)] * 3, "text": ["x", "y", "z"]})
    rows = load_samples(table, num_samples=2)
    assert [r["text"] for r in rows] == ["x", "y"] and rows[0]["image"].size == (30, 30)
    generated = load_samples(({"text": f"q{i}"} for i in range(100)), num_samples=4)
    assert [s["text"] for s in generated] == ["q0", "q1", "q2", "q3"]


def test_fewer_samples_than_asked_warns_and_never_cycles(caplog):
    with caplog.at_level(logging.WARNING, logger="hf_vlm_gptq.calib"):
        got = load_samples([{"text": "only one"}], num_samples=5)
    assert len(got) == 1 and "fewer than the 5" in caplog.text


def test_missing_pyav_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\x00" * 64)
    monkeypatch.setitem(__import__("sys").modules, "av", None)
    with pytest.raises(ImportError, match="pip install av"):
        load_samples([{"video": str(path)}], 1)


# --- bad input ----------------------------------------------------------------------------------------


_OK = {"text": "fine"}
# (id, dataset given the test's folder, error pattern, needs PyAV); "garbage.mp4" and "broken.png" exist there
_BAD_CASES = [
    ("no-fields", lambda d: [{}], r"sample 0: needs at least one of the fields image, video, text, messages", False),
    ("missing-image-file", lambda d: [_OK, {"image": str(d / "missing.png")}],
     r"sample 1: field 'image': cannot read image", False),
    ("unreadable-image-file", lambda d: [_OK, _OK, {"image": str(d / "broken.png")}],
     r"sample 2: field 'image': cannot read image .*broken\.png", False),
    ("undecodable-video", lambda d: [_OK, _OK, _OK, {"video": str(d / "garbage.mp4")}],
     r"sample 3: field 'video': cannot decode video '.*garbage\.mp4': ", True),
    ("missing-video-file", lambda d: [{"video": str(d / "none.mp4")}],
     r"sample 0: field 'video': cannot decode video .*no such file", False),
    ("image-array-shape", lambda d: [{"image": np.zeros((5, 6, 7))}], r"sample 0: field 'image': expected an HxW",
     False),
    ("frame-sizes-differ", lambda d: [{"video": [np.zeros((8, 8, 3)), np.zeros((9, 9, 3))]}],
     r"sample 0: field 'video': all frames", False),
    ("text-not-a-string", lambda d: [{"text": 42}], r"sample 0: field 'text' must be a string", False),
    ("answer-not-a-string", lambda d: [{"text": "q", "answer": ["a"]}], r"sample 0: field 'answer' must be a string",
     False),
    ("sample-not-a-dict", lambda d: [_OK, "just a string"], r"sample 1: expected a dict", False),
    ("message-role", lambda d: [{"messages": [{"role": "robot", "content": "hi"}]}],
     r"sample 0: field 'messages'\[0\]", False),
    ("message-image-part", lambda d: [{"messages": [{"role": "user", "content": [{"type": "image", "image": 3}]}]}],
     r"sample 0: field 'messages'\[0\] content part 0 \(image\)", False),
    ("messages-and-text", lambda d: [{"messages": [{"role": "user", "content": "hi"}], "text": "also"}],
     r"sample 0: give either", False),
    ("one-dict", lambda d: {"text": "a dict, not a list"}, r"not a single dict", False),
    ("missing-folder", lambda d: str(d / "missing_folder"), r"is neither a folder of images", False),
    ("unsupported-type", lambda d: 12345, r"unsupported calibration dataset", False),
    ("empty-list", lambda d: [], r"empty", False),
]


@pytest.mark.parametrize(("make", "pattern", "needs_av"), [case[1:] for case in _BAD_CASES],
                         ids=[case[0] for case in _BAD_CASES])
def test_bad_inputs_name_the_sample_and_field(tmp_path, make, pattern, needs_av):
    if needs_av:
        pytest.importorskip("av")  # undecodable-video cases need PyAV (the `test` extra installs it)
    (tmp_path / "garbage.mp4").write_bytes(b"this is not a video at all" * 10)
    (tmp_path / "broken.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match=pattern):
        load_samples(make(tmp_path), num_samples=10)


def test_empty_folder_and_zero_samples_are_errors(tmp_path):
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        load_samples(str(empty), 3)
    with pytest.raises(ValueError, match="num_samples"):
        load_samples(None, 0)


def test_bad_dataset_columns_fail_early():
    datasets = pytest.importorskip("datasets")
    with pytest.raises(ValueError, match="needs one of the columns"):
        load_samples(datasets.Dataset.from_dict({"caption": ["x"]}), 1)


# --- processor step -----------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["qwen2_vl", "video_llama_3"])
def tiny(request, tiny_qwen2vl_dir, tiny_videollama3_dir):
    path = tiny_qwen2vl_dir if request.param == "qwen2_vl" else tiny_videollama3_dir
    return AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def test_build_model_inputs_feeds_the_model(tiny, builtin_samples_small):
    model, processor = tiny
    batches = build_model_inputs(builtin_samples_small, processor, max_seq_len=2048)
    assert len(batches) == len(builtin_samples_small)
    kinds = set()
    for sample, inputs in zip(builtin_samples_small, batches):
        assert inputs["input_ids"].shape[0] == 1
        kinds.add("video" if "pixel_values_videos" in inputs else "image" if "pixel_values" in inputs else "text")
        assert ("video" in sample) == ("pixel_values_videos" in inputs)
        assert ("image" in sample) == ("pixel_values" in inputs)
        with torch.no_grad():
            logits = model(**inputs).logits
        assert torch.isfinite(logits).all()
    assert kinds == {"image", "video", "text"}
    # the answer is part of the calibration sequence
    decoded = processor.decode(batches[0]["input_ids"][0])
    assert builtin_samples_small[0]["answer"] in decoded and builtin_samples_small[0]["text"] in decoded


def test_user_forms_through_the_processor(tiny, tmp_path):
    model, processor = tiny
    frames = _frames(5)
    _write_video(tmp_path / "clip.mp4", frames, fps=2)
    samples = load_samples([
        {"image": np.asarray(_frames(1, (90, 70))[0]), "text": "What is this?"},
        {"video": str(tmp_path / "clip.mp4"), "text": "What moves?"},
        {"messages": [{"role": "user", "content": [{"type": "video", "video": np.stack(frames)},
                                                   {"type": "text", "text": "Describe."}]}]},
        {"text": "Just text.", "answer": "Sure."},
    ], num_samples=4)
    batches = build_model_inputs(samples, processor)
    assert len(batches) == 4
    for inputs in batches:
        with torch.no_grad():
            assert torch.isfinite(model(**inputs).logits).all()
    if model.config.model_type == "video_llama_3":  # timestamps follow the decoded file's frame rate
        assert "Time 0.5s:" in processor.decode(batches[1]["input_ids"][0])


def test_truncation_never_cuts_vision_tokens(tiny, caplog):
    model, processor = tiny
    vision_ids = torch.tensor([model.config.image_token_id, model.config.video_token_id])
    long_text = " ".join(["the chart shows a steady rise"] * 60)
    image = Image.fromarray(_frames(1, (56, 56))[0])
    samples = [
        {"text": "Tell me a story.", "answer": long_text},
        {"image": image, "text": "Describe.", "answer": long_text},  # picture first, long tail after it
        {"messages": [{"role": "user", "content": [{"type": "text", "text": long_text},
                                                   {"type": "image", "image": image}]}]},  # picture at the end
    ]
    full = build_model_inputs(samples, processor, max_seq_len=4096)
    cut = int(torch.isin(full[1]["input_ids"][0], vision_ids).nonzero().max()) + 8
    assert all(b["input_ids"].shape[1] > cut for b in full)
    with caplog.at_level(logging.WARNING, logger="hf_vlm_gptq.calib"):
        short = build_model_inputs(samples, processor, max_seq_len=cut)
    assert len(short) == 2 and "sample 2" in caplog.text and "skipped" in caplog.text
    for before, after in zip(full, short):
        assert after["input_ids"].shape == after["attention_mask"].shape == (1, cut)
        assert torch.equal(after["input_ids"][0], before["input_ids"][0, :cut])
        with torch.no_grad():
            assert torch.isfinite(model(**after).logits).all()
    assert int(torch.isin(short[1]["input_ids"], vision_ids).sum()) == int(torch.isin(full[1]["input_ids"],
                                                                                      vision_ids).sum())


def _content(value):
    """A sample as comparable data: every picture and frame as (mode, size, pixel digest)."""
    if isinstance(value, Image.Image):
        return ("image", value.mode, value.size, _digest(value))
    if isinstance(value, dict):
        return {key: _content(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_content(v) for v in value]
    return value


def test_normalize_sample_is_idempotent(builtin_samples_small, tmp_path):
    rgb = np.asarray(_frames(1, (30, 20))[0])
    Image.fromarray(rgb).save(tmp_path / "pic.png")
    given = [
        *builtin_samples_small,  # pictures, clips, text-only turns
        {"image": Image.fromarray(rgb).convert("RGBA"), "answer": "a"},
        {"image": rgb.transpose(2, 0, 1).astype(np.float32) / 255.0},
        {"image": str(tmp_path / "pic.png"), "text": "file"},
        {"video": np.stack(_frames(3)), "video_fps": 2},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": rgb},
                                                   {"type": "video", "video": _frames(2)},
                                                   {"type": "text", "text": "Compare."}]}]},
    ]
    assert sum("video" in s for s in builtin_samples_small) >= 2 and any("image" in s for s in builtin_samples_small)
    for index, sample in enumerate(given):
        once = normalize_sample(sample, index)
        twice = normalize_sample(once, index)
        assert _content(twice) == _content(once), index
    # the first pass did load every form into RGB pictures, and kept their pixels
    loaded = normalize_sample(given[-4], 0)["image"]
    assert loaded.mode == "RGB" and np.array_equal(np.asarray(loaded), rgb)

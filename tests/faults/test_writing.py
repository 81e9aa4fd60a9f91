"""What `hf-vlm-gptq quantize`, `export-vllm` and `export --format compressed-tensors` promise about the files
they read and write (issue 10, points 5-9). All write through `hf_vlm_gptq.outdir.OutputDir`; both exports
read SRC through `hf_vlm_gptq.export_io`, so the export cases run for both formats.

5. An export reads only files inside SRC: index entries with an absolute path or `..`, and symlinks
   pointing outside SRC (`config.json` included), are refused (a Hugging Face cache snapshot's links into
   its own blobs are fine).
6. `--overwrite` replaces only a previous output of this package (marker file or vlm_gptq config): never
   SRC / MODEL, a folder holding it, or a folder the tool did not write.
7. OUT is checked before any quantization: a file, MODEL itself, a parent that takes no writes.
8. Temporary folders are `.OUT.hf_vlm_gptq-tmp-<pid>-<hex>`; those of a killed run are removed by the next
   run for the same OUT; OUT gets the usual permissions (0777 minus the umask), not 0700, and so do its
   files (0666 minus the umask; safetensors writes 0600).
9. A full or read-only disk gives one `error:` line (exit 2), and neither OUT nor a temporary folder stays.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest

from hf_vlm_gptq.cli import main
from hf_vlm_gptq.outdir import MARKER

FAST = ["--num-samples", "2", "--w-groupsize", "32", "--dtype", "float32", "--visual-w-rtn", "--llm-w-rtn"]
TMP_NAME = re.compile(r"^\.out\.hf_vlm_gptq-tmp-\d+-[0-9a-f]+$")


FORMATS = pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
"""The export cases run for both exports (they share SRC reading and OutputDir)."""


def export(src, out, *extra, fmt="gptq"):
    if fmt == "gptq":
        return main(["export-vllm", str(src), str(out), "--dense-unsupported", *extra])
    return main(["export", "--format", fmt, str(src), str(out), *extra])


def assert_normal_modes(out) -> None:
    """OUT (under umask 022) is 0755 and every file in it 0644."""
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in out.rglob("*") if p.is_file()}
    assert modes and set(modes.values()) == {"0o644"}, modes


def one_error_line(capsys) -> str:
    """The one `error:` line the command printed last (progress bars may come before it; no traceback)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and [line for line in lines if "error" in line.lower()] == lines[-1:], err
    assert lines[-1].startswith("error: "), err
    return lines[-1]


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def model_copy(tiny_qwen2vl_dir, tmp_path):
    """A private copy of the tiny float model (MODEL for `quantize`)."""
    return shutil.copytree(tiny_qwen2vl_dir, tmp_path / "model")


@pytest.fixture
def no_quantization(monkeypatch):
    """Quantizing is an error: the checks must have failed before."""
    def refuse(*args, **kwargs):
        raise AssertionError("quantization started although OUT is unusable")

    monkeypatch.setattr("hf_vlm_gptq.runner.quantize_model", refuse)


def fail_mkdir_in(monkeypatch, parent, code):
    """os.mkdir of any folder inside `parent` fails with `code` (a read-only disk, no permission)."""
    real = os.mkdir

    def mkdir(path, *args, **kwargs):
        if os.path.dirname(os.path.abspath(path)) == str(parent):
            raise OSError(code, os.strerror(code), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)


# --- 5. export reads only SRC -----------------------------------------------------------------------
@FORMATS
@pytest.mark.parametrize("where", ["absolute", "dotdot"])
def test_an_index_entry_outside_src_is_refused_and_never_rewritten(packed_copy, tmp_path, capsys, where, fmt):
    victim = tmp_path / "victim.safetensors"
    shutil.copy(packed_copy / "model.safetensors", victim)
    from safetensors import safe_open

    with safe_open(str(victim), framework="pt") as handle:
        keys = list(handle.keys())
    name = str(victim) if where == "absolute" else "../victim.safetensors"
    weight_map = {k: name if ".layers.1.mlp.up_proj." in k else "model.safetensors" for k in keys}
    (packed_copy / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    before = sha(victim)
    assert export(packed_copy, tmp_path / "out", fmt=fmt) == 2
    assert "victim.safetensors" in one_error_line(capsys)
    assert sha(victim) == before and not (tmp_path / "out").exists()


@FORMATS
@pytest.mark.parametrize("what", ["processor-file", "weights", "config"])
def test_a_symlink_pointing_outside_src_is_refused(packed_copy, tmp_path, capsys, what, fmt):
    outside = tmp_path / "outside"
    outside.mkdir()
    if what == "processor-file":
        (outside / "secret.txt").write_text("TOP SECRET")
        (packed_copy / "notes.txt").symlink_to(outside / "secret.txt")
        name = "notes.txt"
    else:
        name = "model.safetensors" if what == "weights" else "config.json"
        shutil.move(packed_copy / name, outside / name)
        (packed_copy / name).symlink_to(outside / name)
    assert export(packed_copy, tmp_path / "out", fmt=fmt) == 2
    assert name in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("repo_name", ["models--tiny--qwen2vl", "my-work"], ids=["hf-cache", "not-a-cache"])
def test_a_hugging_face_cache_snapshot_exports(packed_qwen2vl_dir, tmp_path, capsys, repo_name):
    """Links into a snapshot's own blobs are fine in the Hub cache's layout only, not in any folder that
    happens to be called `snapshots`."""
    repo = tmp_path / repo_name
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for item in packed_qwen2vl_dir.iterdir():  # the cache layout: every file a link into ../../blobs
        blob = repo / "blobs" / hashlib.sha1(item.name.encode()).hexdigest()
        shutil.copy(item, blob)
        (snapshot / item.name).symlink_to(os.path.relpath(blob, snapshot))
    if repo_name.startswith("models--"):
        assert export(snapshot, tmp_path / "out") == 0
        assert (tmp_path / "out" / "model.safetensors").is_file()
    else:
        assert export(snapshot, tmp_path / "out") == 2
        assert "outside" in one_error_line(capsys) and not (tmp_path / "out").exists()


# --- 6. --overwrite replaces only our previous output ---------------------------------------------------
@FORMATS
@pytest.mark.parametrize("out_is", ["the folder holding SRC", "SRC"])
def test_export_overwrite_never_deletes_src_or_the_folder_holding_it(packed_qwen2vl_dir, tmp_path, capsys, fmt,
                                                                      out_is):
    work = tmp_path / "work"
    src = shutil.copytree(packed_qwen2vl_dir, work / "ckpt")  # SRC is an output of ours: only the check stops it
    before = {p.name: sha(p) for p in src.iterdir()}
    out = work if out_is == "the folder holding SRC" else src
    assert export(src, out, "--overwrite", fmt=fmt) == 2
    assert ("contains the input" if out == work else "is the input") in one_error_line(capsys)
    assert {p.name: sha(p) for p in src.iterdir()} == before
    assert sorted(p.name for p in work.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("command", ["export-vllm", "export-compressed-tensors", "quantize"])
def test_overwrite_never_deletes_a_folder_the_tool_did_not_write(packed_copy, model_copy, tmp_path, capsys,
                                                                 no_quantization, command):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8 a cat")
    if command.startswith("export"):
        fmt = "gptq" if command == "export-vllm" else "compressed-tensors"
        assert export(packed_copy, foreign, "--overwrite", fmt=fmt) == 2
    else:
        assert main(["quantize", str(model_copy), str(foreign), "--overwrite", *FAST]) == 2
    assert "was not written by hf_vlm_gptq" in one_error_line(capsys)
    assert (foreign / "cat.jpg").read_bytes() == b"\xff\xd8 a cat"


@FORMATS
def test_export_overwrite_replaces_a_previous_export(packed_copy, tmp_path, fmt):
    out = tmp_path / "out"
    assert export(packed_copy, out, fmt=fmt) == 0
    (out / "stale.txt").write_text("from the first export")
    assert export(packed_copy, out, "--overwrite", fmt=fmt) == 0
    assert (out / MARKER).is_file() and not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]


# --- 7. OUT checked before quantizing ---------------------------------------------------------------
@pytest.mark.parametrize("case", ["out-is-a-file", "out-is-model", "out-holds-model", "parent-refuses-writes",
                                  "read-only-disk"])
def test_a_bad_out_fails_before_quantizing(model_copy, tmp_path, capsys, monkeypatch, no_quantization, case):
    out = tmp_path / "out"
    if case == "out-is-a-file":
        out.write_text("not a folder")
    elif case == "out-is-model":
        out = model_copy
    elif case == "out-holds-model":
        out = tmp_path
    else:
        fail_mkdir_in(monkeypatch, tmp_path, errno.EACCES if case == "parent-refuses-writes" else errno.EROFS)
    before = {p.name: sha(p) for p in model_copy.iterdir()}
    assert main(["quantize", str(model_copy), str(out), "--overwrite", *FAST]) == 2
    line = one_error_line(capsys)
    assert str(out) in line
    assert {p.name: sha(p) for p in model_copy.iterdir()} == before
    if case == "out-is-a-file":
        assert out.read_text() == "not a folder"
    if case in ("parent-refuses-writes", "read-only-disk"):
        assert ("read-only" if case == "read-only-disk" else "no permission") in line
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0555 folder: the case above fakes the refusal")
def test_a_read_only_parent_fails_before_quantizing(model_copy, tmp_path, capsys, no_quantization):
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o555)
    try:
        assert main(["quantize", str(model_copy), str(parent / "out"), *FAST]) == 2
        assert "no permission" in one_error_line(capsys)
    finally:
        parent.chmod(0o755)


# --- 8. temporary folders and permissions -----------------------------------------------------------
def test_a_killed_export_leaves_a_named_folder_that_the_next_run_removes(packed_copy, tmp_path):
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import os, signal
        import hf_vlm_gptq.export_vllm as ev
        real = ev.save_file
        def save_then_die(tensors, path, **kwargs):
            real(tensors, path, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        ev.save_file = save_then_die
        ev.export_vllm({str(packed_copy)!r}, {str(out)!r}, dense_unsupported=True)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == -9, run.stderr
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert len(left) == 1 and TMP_NAME.match(left[0]), left
    # not ours to remove: a live run's folder (pid 1 is alive), another OUT's, a user's folder
    keep = [".out.hf_vlm_gptq-tmp-1-abcd", ".other.hf_vlm_gptq-tmp-999999999-abcd", ".out.backup"]
    for name in keep:
        (tmp_path / name).mkdir()
    old_umask = os.umask(0o022)  # the umask decides OUT's mode
    try:
        assert export(packed_copy, out) == 0
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt", "out", *keep])
    assert_normal_modes(out)


@pytest.mark.parametrize("writer", ["compressed-tensors", "demo"])
def test_every_writer_removes_stale_temporaries_and_writes_normal_modes(packed_copy, tmp_path, writer):
    out = tmp_path / "out"
    stale = tmp_path / ".out.hf_vlm_gptq-tmp-999999999-abcd"  # a killed run's (no such process)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a file")
    old_umask = os.umask(0o022)
    try:
        if writer == "demo":
            from hf_vlm_gptq.demo import run_demo

            run_demo(out_dir=out, num_samples=2)
        else:
            assert export(packed_copy, out, fmt=writer) == 0
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]
    assert_normal_modes(out)


# --- 9. full disk, read-only disk -------------------------------------------------------------------
def _fill_disk(monkeypatch, target):
    """`target`'s save_file writes half a file, then the disk is full."""
    def save_file(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as handle:
            handle.write(b"\0" * 1024)
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(target, save_file)


@FORMATS
@pytest.mark.parametrize("fault", ["full-disk", "read-only-disk"])
def test_export_on_a_full_or_read_only_disk_gives_one_error_line(packed_copy, tmp_path, capsys, monkeypatch,
                                                                 fault, fmt):
    if fault == "full-disk":
        _fill_disk(monkeypatch, f"hf_vlm_gptq.{'export_vllm' if fmt == 'gptq' else 'export_ct'}.save_file")
    else:
        fail_mkdir_in(monkeypatch, tmp_path, errno.EROFS)
    assert export(packed_copy, tmp_path / "out", fmt=fmt) == 2
    line = one_error_line(capsys)
    assert ("No space left on device" if fault == "full-disk" else "Read-only file system") in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_quantize_on_a_full_disk_gives_one_error_line_and_no_out(model_copy, tmp_path, capsys, monkeypatch):
    _fill_disk(monkeypatch, "transformers.modeling_utils.safe_save_file")
    assert main(["quantize", str(model_copy), str(tmp_path / "out"), *FAST]) == 2
    assert "No space left on device" in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_quantize_replaces_a_previous_checkpoint_of_ours_with_normal_permissions(model_copy, packed_copy,
                                                                                 tmp_path, capsys):
    # packed_copy was written by save_pretrained (vlm_gptq config, no marker): a previous output of ours
    (tmp_path / ".ckpt.hf_vlm_gptq-tmp-999999999-abcd").mkdir()  # a killed quantize's (no such process)
    old_umask = os.umask(0o022)
    try:
        assert main(["quantize", str(model_copy), str(packed_copy), "--overwrite", *FAST]) == 0
    finally:
        os.umask(old_umask)
    capsys.readouterr()
    assert (packed_copy / MARKER).is_file() and (packed_copy / "quantization_report.json").is_file()
    assert_normal_modes(packed_copy)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "model"]

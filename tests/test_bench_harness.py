"""The bench harness: scratch folders gone when a bench ends, however it ends; result file names."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench import harness
from bench.harness import REPO, scratch_dir


def test_scratch_dir_is_removed_after_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with pytest.raises(RuntimeError, match="a bench failed"), scratch_dir("bench_x_") as root:
        (root / "model").mkdir()
        (root / "model" / "weights.bin").write_bytes(b"0" * 1024)
        assert root.parent == tmp_path
        raise RuntimeError("a bench failed")
    assert not list(tmp_path.iterdir())


def test_scratch_dir_is_removed_when_the_bench_is_terminated(tmp_path):
    """`timeout` (bench/cuda_all.sh) ends a bench with SIGTERM: its folder goes too, and the exit status
    still says it was terminated."""
    child = textwrap.dedent("""
        import os, signal, time
        from bench.harness import scratch_dir
        with scratch_dir("bench_x_") as root:
            (root / "checkpoint.safetensors").write_bytes(b"0" * 4096)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        print("not reached")
    """)
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 128 + 15, done.stderr
    assert "not reached" not in done.stdout
    assert not list(Path(tmp_path).iterdir())


def test_a_results_tag_goes_into_the_file_names(tmp_path, monkeypatch):
    """BENCH_RESULTS_TAG: a run on another kind of CPU is written beside the usual files, not over them."""
    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    plain = harness.write_results("ops", {"x": 1}, "# plain")
    monkeypatch.setenv("BENCH_RESULTS_TAG", "amx")
    tagged = harness.write_results("ops", {"x": 2}, "# tagged")
    assert plain.name == f"ops_{harness.device_tag()}.md" and tagged.name == f"ops_amx_{harness.device_tag()}.md"
    assert plain.read_text().startswith("# plain") and tagged.with_suffix(".json").exists()

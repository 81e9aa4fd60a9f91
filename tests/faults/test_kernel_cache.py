"""Promises of the fused CPU kernel's cache (``~/.cache/hf_vlm_gptq`` or ``$HF_VLM_GPTQ_CACHE``) and of its
self-check (issue 10, points 10 and 11).

* A cached library is never trusted blindly: a truncated, overwritten or foreign ``.so`` is detected before
  ``dlopen`` (which would kill the process with SIGBUS) and rebuilt. Each entry has a record beside it
  (hash of source + flags + compiler, size and SHA-256 of the library), written with fsync before the
  renames.
* A library that loads but lacks the kernel's symbol never makes a forward raise: the layers use the other
  paths, and the next process rebuilds it.
* The kernel's results are checked once per process against dequantize + matmul before any layer uses it;
  a kernel that disagrees is logged and never used in that process.

Loading a damaged library can crash the interpreter, so those checks run in a child process. The host
running the suite need not have AVX512-BF16: the cache tests then pretend it has (the library is only
built and loaded there, never called), and compile with -O0 to stay fast.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hf_vlm_gptq.ops import QuantLinear, cpu_amx, cpu_kernel, rtn_quantize
from hf_vlm_gptq.ops import cpu_fused as CF
from hf_vlm_gptq.ops import kernel_cache as KC

pytestmark = pytest.mark.skipif(
    KC.compiler() is None or sys.platform != "linux", reason="needs Linux and a C compiler"
)

CPU_RUNS_KERNEL = set(CF.REQUIRED_CPU_FLAGS) <= KC.cpu_flags()

# The child: for each damage named on its command line (none: just once), damage the cache entry, then look
# for the kernel the way the first fused forward does (the cache is checked before each look, even when this
# process has loaded the library already), and, where the CPU can run it, compare a layer with the reference.
# Prints one JSON line per look.
CHILD = textwrap.dedent(
    """
    import json, logging, subprocess, sys, torch
    from pathlib import Path
    from hf_vlm_gptq.ops import QuantLinear, rtn_quantize
    from hf_vlm_gptq.ops import cpu_fused as CF
    from hf_vlm_gptq.ops import kernel_cache as KC

    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # the cache's warnings go to stderr
    CF.CFLAGS = tuple("-O0" if f == "-O3" else f for f in CF.CFLAGS)  # fast builds; still the real source
    runs = set(CF.REQUIRED_CPU_FLAGS) <= KC.cpu_flags()
    if not runs:  # this CPU cannot run the kernel: pretend it can, and only build / check / load it
        KC.cpu_flags = lambda: set(CF.REQUIRED_CPU_FLAGS)
        CF._self_check = lambda fn: None

    def damage(kind):
        # a new file in the entry's place (this process has the old one mapped: changing it in place would
        # crash this process, which is not what is tested)
        (library,) = KC.cache_dir().glob(CF.SOURCE.stem + "-*.so")
        good, bad = library.read_bytes(), library.with_suffix(".bad")
        if kind == "truncated":  # what a full disk or a killed copy leaves; dlopen of it dies with SIGBUS
            bad.write_bytes(good[: len(good) // 2])
        elif kind == "overwritten":  # same size, other bytes
            bad.write_bytes(good[:4096] + bytes(len(good) - 8192) + good[-4096:])
        elif kind == "another library":  # a valid library, but not the kernel
            src = KC.cache_dir().parent / "other.c"
            src.write_text("int some_other_function(void) { return 1; }")
            subprocess.run([KC.compiler(), "-shared", "-fPIC", "-o", str(bad), str(src)], check=True)
        if kind == "no record":
            for record in KC.cache_dir().glob("*.json"):
                record.unlink()
        else:
            bad.replace(library)

    for kind in sys.argv[1:] or [None]:
        if kind:
            damage(kind)
            CF._state.clear()
        reason = CF.kernel_unavailable_reason()
        out = {"damage": kind, "reason": reason, "libraries": [p.name for p in KC.cache_dir().glob(CF.SOURCE.stem + "-*.so")]}
        if runs and reason is None:
            layer = QuantLinear.from_result(rtn_quantize(torch.randn(32, 64), bits=4, group_size=32), None,
                                            torch.bfloat16)
            x = torch.randn(5, 64).to(torch.bfloat16)
            ref = layer.forward_reference(x).float()
            out["rel_err"] = float((layer(x).float() - ref).norm() / ref.norm())
        print(json.dumps(out), flush=True)
    """
)


def run_child(cache: Path, *damages: str, script: str = CHILD) -> tuple[list[dict], str]:
    """Run the child on ``cache``; returns its JSON lines and its log. It must not die."""
    env = {**os.environ, "HF_VLM_GPTQ_CACHE": str(cache)}
    env.pop(KC.ENV_SWITCH, None)
    done = subprocess.run([sys.executable, "-c", script, *damages], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"child died with {done.returncode}: {done.stderr[-2000:]}"
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")], done.stderr


def entry_problem(cache: Path, monkeypatch) -> str | None:
    """The cache entry checked in this process, with the child's flags."""
    monkeypatch.setenv("HF_VLM_GPTQ_CACHE", str(cache))
    monkeypatch.setattr(CF, "CFLAGS", tuple("-O0" if f == "-O3" else f for f in CF.CFLAGS))
    src = CF.kernel_source()
    inputs = KC.build_inputs(KC.compiler(), src)
    return KC.entry_problem(*KC.entry_paths(inputs["key"], src), inputs, src)


def libraries(cache: Path) -> list[Path]:
    """The fused kernel's builds in the cache (its self-check may build the dequantization kernel beside it)."""
    return sorted(cache.glob(CF.SOURCE.stem + "-*.so"))


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory) -> Path:
    """A cache folder holding one good build (made by a child process)."""
    cache = tmp_path_factory.mktemp("kernel_cache") / "cache"
    (result,), _ = run_child(cache)
    assert result["reason"] is None and len(libraries(cache)) == 1
    return cache


@pytest.fixture
def cache(built_cache, tmp_path) -> Path:
    """A private copy of the good cache, for one test to damage."""
    copy = tmp_path / "cache"
    copy.mkdir()
    for path in built_cache.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    return copy


def test_a_good_cache_entry_is_reused_not_rebuilt(cache, monkeypatch):
    (library,) = libraries(cache)
    stamp = library.stat().st_mtime_ns
    (result,), log = run_child(cache)
    assert result["reason"] is None and result.get("rel_err", 0.0) < 1e-2
    assert libraries(cache) == [library] and library.stat().st_mtime_ns == stamp
    assert "failed its check" not in log
    assert entry_problem(cache, monkeypatch) is None


def test_a_damaged_library_is_detected_before_loading_and_rebuilt(cache, monkeypatch):
    (library,) = libraries(cache)
    damages = ["truncated", "overwritten", "no record", "another library"]
    results, log = run_child(cache, *damages)  # the child survives every one
    assert [r["damage"] for r in results] == damages
    for result in results:
        assert result["reason"] is None, result  # the kernel is available: rebuilt
        assert result["libraries"] == [library.name]
        assert result.get("rel_err", 0.0) < 1e-2
    assert log.count("failed its check") == len(damages), log
    for why in ("truncated", "SHA-256", "no record", "SHA-256"):
        assert why in log
    assert entry_problem(cache, monkeypatch) is None  # and the rebuilt entry passes its check


def test_a_loaded_library_without_the_symbol_leaves_forwards_working(cache, tmp_path, monkeypatch):
    """Even when the record matches (the file is what was recorded), a library without the symbol only makes
    the kernel unavailable in that process: forwards use the other paths, and the entry is removed so the
    next process builds a good one."""
    (library,) = libraries(cache)
    src = tmp_path / "other.c"
    src.write_text(f'int some_other_function(void) {{ return 1; }}\nconst char *name = "{CF.SYMBOL}";\n')
    subprocess.run([KC.compiler(), "-shared", "-fPIC", "-o", str(library), str(src)], check=True)
    other = library.read_bytes()
    record = library.with_suffix(".json")
    entry = json.loads(record.read_text())
    entry.update(size=len(other), sha256=KC.sha256(other))
    record.write_text(json.dumps(entry))
    child = textwrap.dedent(
        """
        import json, torch
        from hf_vlm_gptq.ops import QuantLinear, rtn_quantize
        from hf_vlm_gptq.ops import cpu_fused as CF
        from hf_vlm_gptq.ops import kernel_cache as KC
        CF.CFLAGS = tuple("-O0" if f == "-O3" else f for f in CF.CFLAGS)
        KC.cpu_flags = lambda: set(CF.REQUIRED_CPU_FLAGS)
        layer = QuantLinear.from_result(rtn_quantize(torch.randn(32, 64), bits=4, group_size=32), None,
                                        torch.bfloat16)
        x = torch.randn(5, 64).to(torch.bfloat16)
        ref = layer.forward_reference(x).float()
        for _ in range(2):
            assert float((layer(x).float() - ref).norm() / ref.norm()) < 1e-2
        print(json.dumps({"reason": CF.kernel_unavailable_reason()}))
        """
    )
    (result,), _ = run_child(cache, script=child)
    assert "no symbol" in result["reason"] and CF.SYMBOL in result["reason"]
    assert not library.exists()
    assert entry_problem(cache, monkeypatch) == "missing"  # the next process rebuilds


def test_a_build_is_fsynced_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_VLM_GPTQ_CACHE", str(tmp_path))
    monkeypatch.setattr(CF, "CFLAGS", tuple("-O0" if f == "-O3" else f for f in CF.CFLAGS))
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(src)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    library = KC.build(KC.compiler(), CF.kernel_source())
    monkeypatch.undo()
    renamed = [name for kind, name in events if kind == "replace"]
    assert len(renamed) == 2  # the library, then its record
    for name in renamed:
        assert events.index(("fsync", name)) < events.index(("replace", name))
    assert renamed[0].startswith(library.name) and renamed[1].startswith(library.with_suffix(".json").name)


def test_an_edited_header_makes_another_cache_entry(tmp_path):
    """The bf16 kernels include csrc/lowbit_dequant.h: an edit there must rebuild them, not reuse the old build."""
    source, header = tmp_path / "k.c", tmp_path / "k.h"
    source.write_text('#include "k.h"\nint hvg_probe(void) { return VALUE; }\n')
    header.write_text("#define VALUE 1\n")
    src = KC.KernelSource(source, ("-O0", "-shared", "-fPIC"), "hvg_probe", (), (), "probe kernel",
                          headers=(header,))
    first = KC.build_inputs(KC.compiler(), src)["key"]
    header.write_text("#define VALUE 2\n")
    assert KC.build_inputs(KC.compiler(), src)["key"] != first
    assert CF.kernel_source().headers == CF.HEADERS
    assert [h.name for h in CF.HEADERS] == ["lowbit_dequant.h"] and all(h.exists() for h in CF.HEADERS)


def test_every_kernel_source_and_header_ships_in_the_package():
    """A wheel (non-editable install) holds setup.cfg's package data only: a header left out there would make
    every kernel that includes it fail to build on users' machines, while editable installs (CI) still work."""
    import configparser
    import fnmatch

    config = configparser.ConfigParser()
    config.read(Path(__file__).resolve().parents[2] / "setup.cfg")
    patterns = [p.strip() for p in config["options.package_data"]["hf_vlm_gptq"].replace(",", "\n").split()]
    package = Path(CF.__file__).resolve().parents[1]
    shipped = [f for f in (package / "ops" / "csrc").iterdir()
               if not any(fnmatch.fnmatch(str(f.relative_to(package)), p) for p in patterns)]
    assert not shipped, f"not in setup.cfg's package_data: {shipped}"
    for header in CF.HEADERS:
        assert header.parent == package / "ops" / "csrc"


# --- point 11: the self-check --------------------------------------------------------------------------


def _layer() -> QuantLinear:
    torch.manual_seed(0)
    res = rtn_quantize(torch.randn(64, 256), bits=4, group_size=64)
    return QuantLinear.from_result(res, torch.randn(64), torch.bfloat16)  # kernel="auto"


def test_a_kernel_that_disagrees_with_dequantize_matmul_is_never_used(monkeypatch, caplog):
    calls = []

    def wrong_kernel(x, m, k, qweight, scales, zeros, g_idx, n, bias, y, threads, regular_group, bits):
        calls.append(m)
        ctypes.memset(y, 0x3F, m * n * 2)  # every output 0.746: plausible numbers, wrong ones
        return 0

    x = torch.randn(16, 256).to(torch.bfloat16)
    monkeypatch.setattr(cpu_amx, "_state", {"reason": "set aside: this test follows the fused kernel", "ready": True})
    monkeypatch.setattr(CF, "_state", {"reason": "off", "ready": True})
    without_kernel = _layer()(x)  # what the other paths give
    monkeypatch.setattr(CF, "_state", {"lib": wrong_kernel})  # as if the library had just been loaded
    layer = _layer()
    with caplog.at_level(logging.WARNING, logger=CF.__name__):
        y = layer(x)
    assert torch.equal(y, without_kernel)
    assert "self-check" in caplog.text
    checked = len(calls)
    assert checked >= 1  # the check ran the kernel...
    for rows in (1, 4, 300):
        layer(torch.randn(rows, 256).to(torch.bfloat16))
    assert len(calls) == checked  # ...and nothing else did
    assert "self-check" in CF.kernel_unavailable_reason()


def test_a_kernel_that_agrees_passes_its_self_check_once(monkeypatch):
    """The self-check accepts the kernel's two ways of rounding (GEMM path: weights rounded to bf16 like
    the reference's; 1-4 row path: not rounded), emulated here in torch, and runs once per process."""
    from hf_vlm_gptq.ops.packing import unpack_codes

    def emulated(fn, x2, w, bias):
        fn()
        g = w.g_idx.long()
        codes = unpack_codes(w.qweight, w.bits, w.in_features).float()
        weight = (codes - w.zeros.float().T[:, g]) * w.scales.float().T[:, g]
        if not (x2.shape[0] <= 4 and w.small_batch_path):
            weight = weight.bfloat16().float()
        return (x2.float() @ weight.T + (0 if bias is None else bias.float())).bfloat16()

    runs = []
    monkeypatch.setattr(CF, "_state", {"lib": lambda: runs.append(1)})
    monkeypatch.setattr(CF, "call_bf16_kernel", emulated)
    monkeypatch.setattr(cpu_amx, "_state", {"reason": "set aside: this test counts the fused kernel's calls",
                                            "ready": True})
    layer = _layer()
    for rows in (1, 3, 16):
        x = torch.randn(rows, 256).to(torch.bfloat16)
        ref = layer.forward_reference(x).float()
        assert float((layer(x).float() - ref).norm() / ref.norm()) < 1e-2
    assert CF._state.get("lib") is not None and "reason" not in CF._state
    probe_calls = sum(len(rows) for *_, rows in cpu_kernel.PROBES)
    assert len(runs) == probe_calls + 3  # the probes once, then one call per forward

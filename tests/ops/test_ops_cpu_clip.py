"""The clip-search kernel (ops/cpu_clip.py + csrc/clip_search.c, an AVX2 and an AVX-512 build): the same grid as
the torch search, used only after its self-check, never when it disagrees, and the torch search where it is
unavailable."""

from __future__ import annotations

import ctypes
import time

import pytest
import torch

from hf_vlm_gptq.ops import cpu_clip, find_params
from hf_vlm_gptq.ops import grid as G
from hf_vlm_gptq.ops import kernel_cache as KC

REASON = cpu_clip.unavailable_reason(G._clip_kernel_check)
needs_kernel = pytest.mark.skipif(REASON is not None, reason=f"clip-search kernel unavailable: {REASON}")


def _torch_search(w: torch.Tensor, bits: int, sym: bool, full_range: bool = False):
    xmin = torch.minimum(w.amin(dim=1), torch.zeros(()))
    xmax = torch.maximum(w.amax(dim=1), torch.zeros(()))
    scales, zeros = G.clip_candidates(xmin, xmax, bits, sym, full_range)
    errors = G.clip_errors(w, scales, zeros, 2**bits - 1)
    best = errors.argmin(0)
    rows = torch.arange(w.shape[0])
    return scales[best, rows], zeros[best, rows], errors


@pytest.fixture
def fresh_state(monkeypatch):
    monkeypatch.setattr(cpu_clip, "_state", {})


@needs_kernel
@pytest.mark.parametrize(("bits", "sym", "full_range"), [(4, True, False), (3, False, False), (2, True, True),
                                                        (8, True, False)])
@pytest.mark.parametrize("shape", [(300, 128), (7, 5), (64, 2048)])
def test_the_kernel_picks_a_least_error_grid(bits, sym, full_range, shape):
    gen = torch.Generator().manual_seed(bits + shape[1])
    w = torch.randn(*shape, generator=gen) * torch.rand(shape[0], 1, generator=gen).add_(0.01)
    w[0, 0] = 40.0
    scale, zero = find_params(w, bits, sym, clip=True, full_range=full_range)  # through the kernel
    ref_scale, ref_zero, errors = _torch_search(w, bits, sym, full_range)
    same = scale == ref_scale
    assert float(same.float().mean()) > 0.98  # other choices only between candidates of equal error
    xmin = torch.minimum(w.amin(dim=1), torch.zeros(()))
    xmax = torch.maximum(w.amax(dim=1), torch.zeros(()))
    scales, _ = G.clip_candidates(xmin, xmax, bits, sym, full_range)
    picked = (scales == scale.unsqueeze(0)).float().argmax(0)
    got = errors.gather(0, picked.unsqueeze(0)).squeeze(0)
    assert bool((got <= errors.min(0).values * (1 + 1e-5)).all())
    assert torch.equal(zero[same], ref_zero[same])


def test_the_faster_build_is_measured_not_assumed(monkeypatch):
    """Where the CPU runs both builds, the one the probe times faster serves (here the AVX2 one, made faster);
    where it runs one, that one, without a probe; the builds keep separate cache entries."""
    slow_then_fast = {"clip_search_avx512": 0.02, "clip_search_avx2": 0.0}

    def fake(name):
        def fn(*args):
            time.sleep(slow_then_fast[name])
            return 0
        return fn

    fns = {name: fake(name) for name in slow_then_fast}
    assert cpu_clip.fastest(fns) == "clip_search_avx2"
    state: dict = {}
    monkeypatch.setattr(KC, "load_kernel", lambda src, one: one.update(lib=fns[src.entry_name]))
    KC.load_fastest([cpu_clip.AVX2, cpu_clip.AVX512], state, cpu_clip.fastest)
    assert state["build"] == "clip_search_avx2" and state["lib"] is fns["clip_search_avx2"]
    monkeypatch.setattr(KC, "load_kernel", lambda src, one: (one.update(lib=fns[src.entry_name]) if src is cpu_clip.AVX2
                                                             else one.update(reason="this CPU lacks avx512f")))
    state = {}
    KC.load_fastest([cpu_clip.AVX2, cpu_clip.AVX512], state, lambda found: pytest.fail("no probe for one build"))
    assert state["build"] == "clip_search_avx2"
    assert cpu_clip.AVX2.entry_name != cpu_clip.AVX512.entry_name


@needs_kernel
def test_both_builds_pass_the_check_and_pick_alike():
    """Each build this CPU can run (the AVX2 one on an AVX-512 CPU too) passes the self-check and picks the
    same candidates as the other on a layer's groups."""
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(512, 128, generator=gen) * torch.rand(512, 1, generator=gen).add_(0.05)
    xmin = torch.minimum(w.amin(dim=1), torch.zeros(()))
    xmax = torch.maximum(w.amax(dim=1), torch.zeros(()))
    scales, zeros = G.clip_candidates(xmin, xmax, 4, True, False)
    picks = {}
    for build in (cpu_clip.AVX2, cpu_clip.AVX512):
        state: dict = {}
        KC.load_kernel(build, state)
        if "lib" not in state:
            assert "lacks" in state["reason"], state["reason"]  # only a CPU without its flags may skip it
            continue
        assert G._clip_kernel_check(state["lib"]) is None
        picks[build.name] = cpu_clip.call(state["lib"], w, scales, zeros, 15, G.CLIP_NORM)
    assert cpu_clip.AVX2.name in picks
    for picked in picks.values():
        assert float((picked == picks[cpu_clip.AVX2.name]).float().mean()) > 0.99


@needs_kernel
def test_candidates_that_do_not_shrink_one_range_are_all_searched():
    """The kernel stops early only for candidates that shrink one range; in any other order (here the grid's
    candidates shuffled, so later ones may be wider) it still finds the first one of least error."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(200, 128, generator=gen)
    w[:, 0] *= 8  # an outlier per row: clipping pays
    xmin = torch.minimum(w.amin(dim=1), torch.zeros(()))
    xmax = torch.maximum(w.amax(dim=1), torch.zeros(()))
    scales, zeros = G.clip_candidates(xmin, xmax, 4, False, False)
    order = torch.randperm(scales.shape[0], generator=gen)
    scales, zeros = scales[order].contiguous(), zeros[order].contiguous()
    errors = G.clip_errors(w.double(), scales.double(), zeros.double(), 15)
    fn = cpu_clip.checked_kernel(G._clip_kernel_check)
    picked = cpu_clip.call(fn, w, scales, zeros, 15, G.CLIP_NORM)
    got = errors.gather(0, picked.unsqueeze(0)).squeeze(0)
    assert bool((got <= errors.min(0).values * (1 + 1e-6)).all())
    assert float((picked == errors.argmin(0)).float().mean()) > 0.98


@needs_kernel
def test_a_kernel_that_picks_wrong_is_never_used(fresh_state, monkeypatch, caplog):
    calls = []

    def wrong(x, rows, cols, scales, zeros, steps, maxq, norm, best, threads):
        calls.append(rows)
        ctypes.memset(best, 0, rows * 8)  # always the unclipped candidate: plausible, often not the least
        return 0

    monkeypatch.setattr(cpu_clip, "_state", {"lib": wrong})
    w = torch.randn(50, 64)
    w[:, 0] = 30.0
    with caplog.at_level("WARNING"):
        scale, _ = find_params(w, 4, True, clip=True)
    ref_scale, _, _ = _torch_search(w, 4, True)
    assert torch.equal(scale, ref_scale)  # the torch search served
    assert "self-check" in caplog.text and calls
    checked = len(calls)
    find_params(w, 4, True, clip=True)
    assert len(calls) == checked  # not called again
    assert "self-check" in cpu_clip.unavailable_reason(G._clip_kernel_check)


def test_without_the_kernel_the_torch_search_serves(fresh_state, monkeypatch):
    monkeypatch.setenv(KC.ENV_SWITCH, "0")
    w = torch.randn(40, 96)
    w[3, 3] = 20.0
    scale, zero = find_params(w, 4, False, clip=True)
    ref_scale, ref_zero, _ = _torch_search(w, 4, False)
    assert torch.equal(scale, ref_scale) and torch.equal(zero, ref_zero)
    assert "disabled" in cpu_clip.unavailable_reason(G._clip_kernel_check)


@needs_kernel
def test_loading_the_kernel_leaves_denormals_alone(tmp_path):
    """A library built with -ffast-math brings crtfastmath.o, which sets flush-to-zero for the thread that
    loads it: torch's CPU math would change behind the user's back once a clip search ran."""
    import os
    import subprocess
    import sys

    code = ("import torch\n"
            "from hf_vlm_gptq.ops import cpu_clip, find_params\n"
            "find_params(torch.randn(64, 128), 4, True, clip=True)\n"
            "assert 'lib' in cpu_clip._state, cpu_clip._state\n"
            "tiny = torch.tensor(1e-38)\n"
            "print(float(tiny * 1e-3) != 0.0, 1e-308 * 1e-10 != 0.0)\n")
    env = {**os.environ, "HF_VLM_GPTQ_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]

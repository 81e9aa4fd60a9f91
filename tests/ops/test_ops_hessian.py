"""Hessian accumulation for Linear and Conv inputs."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_vlm_gptq.ops import HessianAccumulator, unfold_conv_input


def test_one_pass_is_two_over_n_xtx():
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    acc = HessianAccumulator(16, dtype=torch.float64)
    acc.add_batch(x)
    rows = x.reshape(-1, 16)
    assert acc.nsamples == 21
    assert torch.allclose(acc.hessian, 2 / 21 * rows.T @ rows, rtol=1e-12, atol=1e-14)


def test_chunked_equals_one_pass():
    x = torch.randn(50, 24) * torch.linspace(0.1, 3, 24)
    one = HessianAccumulator(24)
    one.add_batch(x)
    chunked = HessianAccumulator(24)
    for part in (x[:1], x[1:20], x[20:20], x[20:49], x[49:]):
        chunked.add_batch(part)
    assert chunked.nsamples == one.nsamples == 50
    assert chunked.hessian.dtype == torch.float32
    assert torch.allclose(chunked.hessian, one.hessian, rtol=1e-5, atol=1e-6)


def test_low_precision_inputs_accumulate_in_fp32():
    acc = HessianAccumulator(8)
    x = torch.randn(10, 8).to(torch.bfloat16)
    acc.add_batch(x)
    xf = x.float()
    assert acc.hessian.dtype == torch.float32
    assert torch.allclose(acc.hessian, 2 / 10 * xf.T @ xf, rtol=1e-5, atol=1e-6)


def test_starts_at_zero_and_rejects_bad_input():
    acc = HessianAccumulator(4)
    assert acc.nsamples == 0 and not bool(acc.hessian.any())
    with pytest.raises(ValueError, match="4"):
        acc.add_batch(torch.randn(2, 5))
    with pytest.raises(ValueError, match="non-finite"):
        acc.add_batch(torch.tensor([[1.0, math.nan, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="columns"):
        HessianAccumulator(0)


def _explicit_patches(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """Patch rows by brute force: loop over output positions (independent of the library's unfold)."""
    k, s, d = conv.kernel_size, conv.stride, conv.dilation
    pad = [p for p in conv.padding for _ in range(2)][::-1]  # symmetric, last dim first
    xp = F.pad(x, pad)
    spatial = xp.shape[2:]
    outs = [(sz - dd * (kk - 1) - 1) // ss + 1 for sz, kk, ss, dd in zip(spatial, k, s, d)]
    rows = []
    for b in range(x.shape[0]):
        for pos in itertools.product(*[range(o) for o in outs]):
            idx = [slice(p * ss, p * ss + dd * (kk - 1) + 1, dd) for p, kk, ss, dd in zip(pos, k, s, d)]
            rows.append(xp[(b, slice(None), *idx)].reshape(-1))
    return torch.stack(rows)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 5, 3, stride=2, padding=1),
        nn.Conv2d(2, 4, (2, 3), stride=(1, 2), dilation=(2, 1)),
        nn.Conv3d(2, 4, (2, 3, 3), stride=(1, 2, 2), padding=(1, 0, 1)),
        nn.Conv3d(3, 8, (2, 4, 4), stride=(2, 4, 4)),
    ],
)
def test_conv_hessian_matches_explicit_unfold(conv):
    nd = len(conv.kernel_size)
    x = torch.randn(2, conv.in_channels, *([9] * nd), dtype=torch.float64)
    patches = _explicit_patches(x, conv)
    assert torch.equal(unfold_conv_input(x, conv), patches)
    acc = HessianAccumulator(patches.shape[1], dtype=torch.float64)
    acc.add_conv_batch(x[:1], conv)
    acc.add_conv_batch(x[1:], conv)
    assert acc.nsamples == patches.shape[0]
    assert torch.allclose(acc.hessian, 2 / patches.shape[0] * patches.T @ patches, rtol=1e-10, atol=1e-12)
    # patches @ W^T reproduces the convolution itself, so the column order matches weight.reshape(out, -1)
    conv = conv.double()
    y = conv(x).movedim(1, -1).reshape(-1, conv.out_channels)
    assert torch.allclose(patches @ conv.weight.reshape(conv.out_channels, -1).T + conv.bias, y, atol=1e-10)


def test_qwen2_vl_patch_rows_are_accepted_as_is():
    conv = nn.Conv3d(3, 16, (2, 14, 14), stride=(2, 14, 14), bias=False)
    rows = torch.randn(12, 3 * 2 * 14 * 14)
    assert unfold_conv_input(rows, conv) is rows
    from_5d = HessianAccumulator(rows.shape[1])
    from_5d.add_conv_batch(rows.view(-1, 3, 2, 14, 14), conv)
    from_rows = HessianAccumulator(rows.shape[1])
    from_rows.add_conv_batch(rows, conv)
    assert torch.equal(from_5d.hessian, from_rows.hessian)
    with pytest.raises(ValueError, match="width"):
        unfold_conv_input(torch.randn(4, 100), conv)


def test_unbatched_and_same_padding_and_reflect_mode():
    conv = nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect").double()
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    patches = unfold_conv_input(x, conv)
    y = conv(x).movedim(0, -1).reshape(-1, 3)
    assert torch.allclose(patches @ conv.weight.reshape(3, -1).T + conv.bias, y, atol=1e-10)


def test_grouped_conv_is_rejected():
    with pytest.raises(ValueError, match="groups"):
        unfold_conv_input(torch.randn(1, 4, 5, 5), nn.Conv2d(4, 4, 3, groups=2))

"""bench/reference_gptq.py is the yardstick of bench/quantize_speed.py: it must be a faithful GPTQ, so on the
same Hessian it gives (nearly) the same quantized weight and proxy loss as ours."""

from __future__ import annotations

import pytest
import torch

from bench.reference_gptq import fasterquant, proxy_loss
from hf_vlm_gptq.ops import gptq_quantize


@pytest.mark.parametrize(("group_size", "clip"), [(128, True), (32, False), (-1, True)])
def test_reference_matches_ours_on_the_same_hessian(group_size, clip):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 32, generator=gen) @ torch.randn(32, 256, generator=gen) + 0.3 * torch.randn(2048, 256, generator=gen)
    hessian = 2 / x.shape[0] * x.T @ x
    weight = torch.randn(96, 256, generator=gen)
    q_ref = fasterquant(weight, hessian, bits=4, group_size=group_size, clip=clip)
    ours = gptq_quantize(weight, hessian, bits=4, group_size=group_size, clip=clip)
    same = (q_ref - ours.dequantize()).abs() <= 1e-5 * weight.abs().max()
    assert same.float().mean() > 0.97
    assert proxy_loss(weight, q_ref, hessian) == pytest.approx(ours.loss, rel=0.03)

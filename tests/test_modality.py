"""Per-modality Hessians and losses of one group (``modality.py``), against float64 sums over the rows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_vlm_gptq.modality import GroupInputs, TokenInfo
from hf_vlm_gptq.ops import gptq_quantize


def _calls(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(48, 48, generator=gen) / 7
    calls, labels = [], []
    for rows, kinds in ((30, (0, 2)), (25, (1, 2)), (40, (0, 2)), (12, (2,))):
        calls.append(torch.randn(rows, 48, generator=gen) @ mix)
        labels.append(torch.tensor([kinds[i % len(kinds)] for i in range(rows)]))
    counts = [sum(int((lab == m).sum()) for lab in labels) for m in range(3)]
    return calls, labels, counts


def test_the_group_hessian_and_each_modality_loss_are_their_rows_own():
    """Unweighted: the group's Hessian is every row's ``2/n x x^T``, and each modality's loss (the one with
    the most rows derived as the layer's loss minus the others') is its own rows' share."""
    calls, labels, counts = _calls()
    info = TokenInfo(labels, counts)
    inputs = GroupInputs(nn.Linear(48, 20), is_conv=False, drop_first_channel=False, tokens=info, before_call=True)
    for x in calls:
        inputs.add_call((x,))
    hessian, _ = inputs.close()
    rows = torch.cat(calls).double()
    expected = 2 * rows.t() @ rows / rows.shape[0]
    torch.testing.assert_close(hessian.double(), expected, rtol=1e-5, atol=1e-6)

    weight = torch.randn(20, 48, generator=torch.Generator().manual_seed(1))
    result = gptq_quantize(weight, hessian, bits=3, group_size=16)
    losses = inputs.modality_losses(weight, result)
    d = weight.double() - result.dequantize().double()
    mods = torch.cat(labels)
    for m, name in enumerate(("image", "video", "text")):
        picked = rows[mods == m]
        direct = float(((d @ picked.t()) ** 2).sum()) * 2 / rows.shape[0]  # its rows' share of the layer loss
        assert losses[f"loss_{name}"] == pytest.approx(direct, rel=1e-4), name
    assert sum(losses.values()) == pytest.approx(result.loss, rel=1e-5)


@pytest.mark.parametrize("gptaq", [False, True])
def test_weighted_modalities_give_the_weighted_hessian_and_plain_losses(gptaq):
    """Modality weights: the solve's Hessian is every row's ``2/n w x x^T``; each modality's loss is still its
    plain rows' share (its part of the Hessian divided by its weight), with GPTAQ's cross term kept apart."""
    calls, labels, counts = _calls(seed=2)
    info = TokenInfo(labels, counts, weighting="modality", modality_weights={"image": 3.0, "text": 0.5})
    inputs = GroupInputs(nn.Linear(48, 20), is_conv=False, drop_first_channel=False, tokens=info,
                         float_module=nn.Linear(48, 20) if gptaq else None, before_call=True)
    for x in calls:
        if gptaq:
            inputs.add_float_call((x * 1.01,))
        inputs.add_call((x,))
    hessian, cross = inputs.close()
    rows, mods = torch.cat(calls).double(), torch.cat(labels)
    w = torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64)[mods]
    torch.testing.assert_close(hessian.double(), 2 * (rows * w[:, None]).t() @ rows / rows.shape[0],
                               rtol=1e-5, atol=1e-6)
    if gptaq:
        torch.testing.assert_close(cross.double(), 2 * (0.01 * rows * w[:, None]).t() @ rows / rows.shape[0],
                                   rtol=1e-4, atol=1e-6)
    else:
        assert cross is None
    weight = torch.randn(20, 48, generator=torch.Generator().manual_seed(3))
    result = gptq_quantize(weight, hessian, bits=3, group_size=16)
    losses = inputs.modality_losses(weight, result)
    d = weight.double() - result.dequantize().double()
    for m, name in enumerate(("image", "video", "text")):
        direct = float(((d @ rows[mods == m].t()) ** 2).sum()) * 2 / rows.shape[0]
        assert losses[f"loss_{name}"] == pytest.approx(direct, rel=1e-4), name

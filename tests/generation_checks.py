"""A check shared by the generation tests: what `generate` returned against one full forward pass."""

from __future__ import annotations

import torch


def assert_greedy(model: torch.nn.Module, inputs: dict, out: torch.Tensor, atol: float = 1e-4) -> None:
    """`out` (greedy `generate` on `inputs`, batch 1) starts with the prompt, and each new token is, up to a
    near tie of `atol`, the argmax of one full forward pass over `out` after the tokens before it: generating
    with the cache and the media inputs agrees with the model run on the whole sequence."""
    prompt = inputs["input_ids"].shape[1]
    assert out.shape[1] > prompt and torch.equal(out[0, :prompt], inputs["input_ids"][0])
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    for key, value in extra.items():  # per-token inputs (mm_token_type_ids): the new tokens are text (0)
        if isinstance(value, torch.Tensor) and value.shape == inputs["input_ids"].shape:
            extra[key] = torch.cat([value, value.new_zeros(1, out.shape[1] - prompt)], 1)
    with torch.no_grad():
        full = model(input_ids=out, attention_mask=torch.ones_like(out), **extra).logits[0, prompt - 1:-1].float()
    chosen = full.gather(1, out[0, prompt:, None])[:, 0]
    gap = (full.max(-1).values - chosen).max()
    assert gap < atol, f"a generated token is {float(gap):.3g} below the argmax of the full forward pass"

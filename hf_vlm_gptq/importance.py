"""Token importance from a backward pass of the float model's answer loss (``hessian_weighting="gradient"``).

A plain GPTQ Hessian weights every calibration row the same. A row whose block output barely moves the
answer (a padding-like patch, the last token of a turn) counts as much as one the answer depends on. Here
each row of each block gets the weight ``1/2 + 1/2 * g / mean(g)``, ``g = ||dL/dy||^2`` of the block's
output ``y`` at that row, ``L`` the model's next-token loss on the sample's text tokens (media placeholders
and padding are not predicted). The weights of one block have mean 1 over all its rows, so damping
(relative to the Hessian's diagonal) means what it means without weights.

One forward and backward pass of the float model per calibration batch, before any layer is quantized;
parameters get no gradients (they are frozen for the pass). The weights follow the call order in which the
pipeline's replays see each block (the model's own forward order), one tensor of rows per call.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.nn as nn

from .capture import first_output
from .offload import move_to

logger = logging.getLogger(__name__)

__all__ = ["answer_labels", "gradient_token_weights"]

_MEDIA_INPUTS = ("pixel_values", "pixel_values_videos")
# Half of each row's weight is uniform: pure ||dL/dy||^2 leaves most rows near 0 and the Hessian close to
# rank-deficient (on the trained tiny models it lost to the half-and-half mix at W3 and W2,
# bench/results/accuracy_gradient_cpu.md).
_UNIFORM_SHARE = 0.5


def answer_labels(batch: dict, media_token_ids: Iterable[int | None]) -> torch.Tensor:
    """The labels of the next-token loss: the batch's input ids, with media placeholders and padding -100."""
    labels = batch["input_ids"].clone()
    for token_id in media_token_ids:
        if token_id is not None:
            labels[labels == token_id] = -100
    mask = batch.get("attention_mask")
    if mask is not None:
        labels[mask == 0] = -100
    return labels


class _RowGradients:
    """Forward hooks on blocks: each call's output registers a hook that keeps ``||grad||^2`` per row."""

    def __init__(self, blocks: dict[str, nn.Module]) -> None:
        self.rows: dict[str, list[torch.Tensor | None]] = {path: [] for path in blocks}
        self.handles = [block.register_forward_hook(self._hook_for(path)) for path, block in blocks.items()]

    def _hook_for(self, path: str):
        slots = self.rows[path]

        def hook(_module, _args, out):
            hidden = first_output(out)
            index = len(slots)
            slots.append(None)
            if hidden.requires_grad:
                def keep(grad: torch.Tensor) -> None:
                    slots[index] = grad.detach().float().pow(2).sum(-1).reshape(-1).cpu()
                hidden.register_hook(keep)
        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def gradient_token_weights(model: nn.Module, blocks: dict[str, nn.Module], batches: list[dict],
                           device: torch.device | None = None) -> dict[str, list[torch.Tensor | None]]:
    """Per block path, per call (in forward order): the mean-1 importance weight of each output row.

    A call whose output got no gradient (it does not reach the loss) gets None: its rows stay unweighted.
    Raises ValueError naming the batch when a batch has no text token to predict.
    """
    config = model.config
    media_ids = (getattr(config, "image_token_id", None), getattr(config, "video_token_id", None))
    device = device or next(model.parameters()).device
    frozen = [p for p in model.parameters() if p.requires_grad]
    for param in frozen:
        param.requires_grad_(False)
    embeddings = model.get_input_embeddings()
    grad_from_embeddings = embeddings.register_forward_hook(lambda _m, _a, out: out.requires_grad_(True))
    recorder = _RowGradients(blocks)
    try:
        with torch.enable_grad():
            for number, batch in enumerate(batches):
                batch = move_to(batch, device)
                labels = answer_labels(batch, media_ids)
                if not bool((labels[:, 1:] != -100).any()):
                    raise ValueError(f"hessian_weighting='gradient': calibration batch {number} has no text token "
                                     "to predict (only media placeholders or padding); drop it or use another "
                                     "weighting.")
                for key in _MEDIA_INPUTS:  # the vision blocks' outputs reach the loss through the pixels too
                    if isinstance(batch.get(key), torch.Tensor) and batch[key].is_floating_point():
                        batch = {**batch, key: batch[key].detach().requires_grad_(True)}
                out = model(**batch, labels=labels, use_cache=False)
                out.loss.backward()
    finally:
        recorder.close()
        grad_from_embeddings.remove()
        for param in frozen:
            param.requires_grad_(True)
    weights: dict[str, list[torch.Tensor | None]] = {}
    for path, rows in recorder.rows.items():
        seen = [r for r in rows if r is not None]
        mean = float(torch.cat(seen).mean()) if seen else 0.0
        weights[path] = [_UNIFORM_SHARE + (1 - _UNIFORM_SHARE) * r / mean if r is not None and mean > 0 else None
                         for r in rows]
        if not seen or mean <= 0:
            logger.warning("hessian_weighting='gradient': no gradient reached %s; its rows stay unweighted", path)
    return weights

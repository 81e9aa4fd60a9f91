"""Which modality each calibration row is (image, video or text token), the token weights the config asks
for, and the Hessian feed of one sequential group that uses them.

The rows a layer sees come call by call in the order of the calibration batches (``capture.py``): the
vision parts run once per kind of media in a batch (pictures first, then clips: the order of
``ArchSpec.media_inputs``), so every row of such a call is of one modality; the language model runs once
per batch and its rows are the batch's tokens, whose ids say what they are (the config's
``image_token_id`` / ``video_token_id``; anything else is text).

Token weights (``VLMGPTQConfig.hessian_weighting``): "modality" gives each row the weight of its
modality; "balanced" weights each modality present in a part's calibration data by
``total / (modalities * its own count)`` (counted in tokens for the LLM and in patches for the vision
parts, which every vision layer sees in proportion), so each contributes the same total weight;
"gradient" gives each row of a block the importance ``importance.py`` measured for it (the conv stem takes
its part's first block's weights when the rows match).

Per-modality proxy losses: ``loss_<modality> = tr(dW H_m dW^T) * n_m / n`` (``H_m`` the plain Hessian of that
modality's ``n_m`` rows); with no weighting they add up to the layer's loss, so the modality with the most rows
gets the layer's loss minus the others' (no product of its own; not when some rows were unlabelled). Where a
group's rows hold more than one modality, each row goes into its modality's Hessian only (weighted as the
solve wants; unlabelled rows into one more) and the solve's Hessian is their row-weighted mean
``sum_m n_m H_m / n``: every row is multiplied once, and every path (unweighted, modality weights, GPTAQ's
cross term kept apart) sums the same parts in the same order, so all-ones weights give the unweighted Hessian
bit for bit. A modality weighted by 0 has no plain Hessian to recover; per-row importance weights
("gradient") are not constant per modality: those keep one accumulator for the solve and plain ones beside it.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn as nn

from .ops import AsymmetricAccumulator, HessianAccumulator, QuantResult
from .ops.conv_rows import unfold_conv_input
from .ops.result import proxy_loss
from .ops.scratch import MatrixPool

__all__ = ["MODALITIES", "GroupInputs", "TokenInfo"]

MODALITIES = ("image", "video", "text")
_MEDIA_KIND = {"pixel_values": 0, "pixel_values_videos": 1}


class TokenInfo:
    """Per call of a component (in call order): the modality of its rows, and the weight table."""

    def __init__(self, labels: list[int | torch.Tensor | None], counts: list[int], weighting: str = "none",
                 modality_weights: dict[str, float] | None = None) -> None:
        self.labels = labels  # an int (every row of the call) or a LongTensor [tokens]; None: unknown
        self.counts = counts  # rows (tokens / patches) per modality over all calls
        self.present = [m for m in range(len(MODALITIES)) if counts[m] > 0]
        self.table: torch.Tensor | None = None
        self.call_weights: list[torch.Tensor | None] | None = None  # "gradient": per call, one weight per row
        if weighting == "modality":
            table = modality_weights or {}
            self.table = torch.tensor([float(table.get(m, 1.0)) for m in MODALITIES], dtype=torch.float64)
        elif weighting == "balanced" and self.present:
            total = sum(counts)
            self.table = torch.tensor([total / (len(self.present) * c) if c else 0.0 for c in counts],
                                      dtype=torch.float64)

    @classmethod
    def for_component(cls, spec: Any, comp: Any, model_config: Any, batches: list[dict],
                      weighting: str = "none", modality_weights: dict[str, float] | None = None) -> TokenInfo:
        """Labels of every call `comp`'s blocks (and stem) get when the model runs on `batches`."""
        image_id = getattr(model_config, "image_token_id", None)
        video_id = getattr(model_config, "video_token_id", None)
        labels: list[int | torch.Tensor | None] = []
        counts = [0, 0, 0]
        for batch in batches:
            n_calls = spec.calls_per_batch(comp, batch)
            if n_calls <= 0:
                continue
            if comp.calls_per_media:
                kinds = [key for key in spec.media_inputs if batch.get(key) is not None]
                for key in kinds[:n_calls]:
                    m = _MEDIA_KIND.get(key)
                    labels.append(m)
                    if m is not None:
                        counts[m] += int(batch[key].shape[0])
                labels.extend([None] * (n_calls - len(kinds)))
                continue
            ids = batch["input_ids"].reshape(-1)
            lab = torch.full_like(ids, 2)
            if image_id is not None:
                lab[ids == image_id] = 0
            if video_id is not None:
                lab[ids == video_id] = 1
            for m in range(3):
                counts[m] += int((lab == m).sum()) * n_calls
            labels.extend([lab] * n_calls)
        return cls(labels, counts, weighting, modality_weights)

    def rows(self, call: int, n: int) -> torch.Tensor | None:
        """Modality index of each of the `n` rows of call number `call` (None when unknown)."""
        if call >= len(self.labels) or self.labels[call] is None:
            return None
        lab = self.labels[call]
        if isinstance(lab, int):
            return torch.full((n,), lab, dtype=torch.long)
        return lab if lab.numel() == n else None

    def with_call_weights(self, weights: list[torch.Tensor | None] | None) -> TokenInfo:
        """The same labels with per-call row weights (one block's, from ``importance.py``)."""
        other = copy.copy(self)
        other.call_weights = weights
        return other

    def weights(self, call: int, n: int) -> torch.Tensor | None:
        """Token weights of the `n` rows of call number `call`, or None (no weighting, or rows unknown)."""
        if self.call_weights is not None:
            found = self.call_weights[call] if call < len(self.call_weights) else None
            return found if found is not None and found.numel() == n else None
        if self.table is None:
            return None
        mods = self.rows(call, n)
        return None if mods is None else self.table[mods]


class GroupInputs:
    """Feeds one group's Hessian from the inputs of its first linear (or the conv stem): token weights
    from `tokens`, one plain Hessian per modality for the per-modality losses, and with `float_module`
    (the same layer in a float copy of the block, run on the float model's inputs just before each call)
    GPTAQ's cross term."""

    def __init__(self, module: nn.Module, is_conv: bool, drop_first_channel: bool,
                 device: torch.device | None = None, tokens: TokenInfo | None = None,
                 float_module: nn.Module | None = None, before_call: bool = False,
                 pool: MatrixPool | None = None) -> None:
        self.is_conv = is_conv
        self.drop_first_channel = drop_first_channel
        self.module = module
        self.info = tokens
        columns = module.weight[0].numel() - (1 if drop_first_channel else 0)
        device = self.device = device or module.weight.device
        present = tokens.present if tokens is not None else []
        table = tokens.table if tokens is not None else None
        self.pool = pool if pool is not None else MatrixPool()  # the accumulators' matrices; back in release()
        # the group's Hessian from one accumulator per modality (key None, made when needed: unlabelled rows),
        # see the module doc
        self.parts: dict[int | None, HessianAccumulator] = {}
        if (len(present) > 1 and tokens.call_weights is None
                and (table is None or all(float(table[m]) > 0 for m in present))):
            self.parts = {m: HessianAccumulator(columns, device=device, pool=self.pool) for m in present}
        self.accumulator = None
        if float_module is not None:
            self.accumulator = AsymmetricAccumulator(columns, device=device, with_hessian=not self.parts,
                                                     pool=self.pool)
        elif not self.parts:
            self.accumulator = HessianAccumulator(columns, device=device, pool=self.pool)
        self.by_modality = ({m: HessianAccumulator(columns, device=device, pool=self.pool) for m in present}
                            if len(present) > 1 and not self.parts else {})
        # Unweighted, the modality with the most rows needs no product of its own (its loss is the rest)
        self.derived: int | None = None
        if len(present) > 1 and table is None and tokens.call_weights is None:
            self.derived = max(present, key=lambda m: tokens.counts[m])
            self.by_modality.pop(self.derived, None)
        self.derived_rows = 0
        self.unlabelled_rows = 0
        self.modality_hessians: dict[int, tuple[torch.Tensor, int]] = {}  # after close(): (H_m, n_m)
        self._matrices: list[torch.Tensor | None] = []  # after close(): every matrix it filled
        self.samples = 0  # calls seen
        self.tokens = 0  # rows seen
        self._pending: torch.Tensor | None = None
        # before_call: fed by the caller through add_call (stepped.py: the inputs are wanted before the module runs)
        self.handles = [] if before_call else [module.register_forward_hook(self._hook)]
        if float_module is not None and not before_call:
            self.handles.append(float_module.register_forward_hook(self._float_hook))

    def _rows(self, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        if self.is_conv:
            return unfold_conv_input(x, module)
        if self.drop_first_channel:
            x = x[..., 1:]
        return x.reshape(-1, x.shape[-1])

    def _float_hook(self, module, args, _out):
        self._pending = self._rows(args[0].detach(), module)

    def add_call(self, args: tuple) -> None:
        """Feed one call's arguments of the watched module (``before_call``)."""
        self._hook(self.module, args, None)

    def add_float_call(self, args: tuple) -> None:
        """GPTAQ, ``before_call``: the float copy's arguments for the same call, just before :meth:`add_call`."""
        self._float_hook(self.module, args, None)

    def _hook(self, module, args, _out):
        rows = self._rows(args[0].detach(), module)
        call, n = self.samples, rows.shape[0]
        weights = self.info.weights(call, n) if self.info is not None else None
        if isinstance(self.accumulator, AsymmetricAccumulator):
            float_rows = self._pending if self._pending is not None else rows
            self.accumulator.add_pair(rows, float_rows, weights)
            self._pending = None
        elif self.accumulator is not None:
            self.accumulator.add_batch(rows, weights=weights)
        if self.parts or self.by_modality:
            mods = self.info.rows(call, n)
            if mods is None:
                self.unlabelled_rows += n
                if self.parts:
                    if None not in self.parts:
                        self.parts[None] = HessianAccumulator(rows.shape[-1], device=self.device, pool=self.pool)
                    self.parts[None].add_batch(rows, weights=weights)
            else:
                self._add_by_modality(rows, mods.to(rows.device))
        self.tokens += n
        self.samples += 1

    def _add_by_modality(self, rows: torch.Tensor, mods: torch.Tensor) -> None:
        table = self.info.table
        for m, acc in (self.parts or self.by_modality).items():
            if m is None:
                continue
            picked = rows[mods == m]
            if picked.shape[0]:
                # the solve's weight for the split parts (one number per modality); plain beside a solve's own
                acc.add_batch(picked, weights=None if not self.parts or table is None else float(table[m]))
        if self.derived is not None:
            self.derived_rows += int((mods == self.derived).sum())

    def close(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stop listening; hand over the Hessian and GPTAQ's cross term (None without GPTAQ)."""
        for handle in self.handles:
            handle.remove()
        cross = self.accumulator.cross if isinstance(self.accumulator, AsymmetricAccumulator) else None
        accumulators = [self.accumulator, *self.parts.values(), *self.by_modality.values()]
        if self.parts:
            hessian = self._mean_of_parts()
        else:
            hessian = self.accumulator.hessian
            self.modality_hessians = {m: (acc.hessian, acc.nsamples) for m, acc in self.by_modality.items()
                                      if acc.nsamples}
        self._matrices = [hessian, *(m for acc in accumulators if acc is not None for m in acc.matrices())]
        self.accumulator, self.by_modality, self.parts = None, {}, {}
        return hessian, cross

    def release(self) -> None:
        """After the group's solve and :meth:`modality_losses`: its matrices go back to the pool (and may be
        overwritten by the next group's)."""
        self.pool.give(*self._matrices)
        self._matrices, self.modality_hessians = [], {}

    def _mean_of_parts(self) -> torch.Tensor:
        """``sum_m n_m H_m / n`` over the parts, in their fixed order; keeps the plain ``H_m`` of the labelled
        modalities that need a product of their own (the weighted ones divided by their weight)."""
        table, total = self.info.table, sum(acc.nsamples for acc in self.parts.values())
        hessian = None
        for m, acc in self.parts.items():
            if not acc.nsamples:
                continue
            part = acc.hessian
            if hessian is None:
                hessian = torch.mul(part, acc.nsamples / total, out=self.pool.take(part.shape, part.dtype, part.device))
            else:
                hessian.add_(part, alpha=acc.nsamples / total)
            if m is not None and m != self.derived:
                self.modality_hessians[m] = (part if table is None else part.div_(float(table[m])), acc.nsamples)
        return hessian if hessian is not None else next(iter(self.parts.values())).hessian

    @property
    def derived_rows_all(self) -> bool:
        """Every row labelled and some of the derived modality's: H is then the row-weighted mean of the
        modalities' Hessians, so that modality's loss is the layer's loss minus the others' (no matrix, no
        product of its own)."""
        return bool(self.derived is not None and self.derived_rows and not self.unlabelled_rows)

    def modality_losses(self, weight: torch.Tensor, result: QuantResult) -> dict[str, float]:
        """``loss_image`` / ``loss_video`` / ``loss_text`` of one solved layer (``weight`` as solved; the
        modality derived from the others gets ``result.loss`` minus theirs)."""
        if not self.tokens or not (self.modality_hessians or self.derived_rows_all):
            return {}
        quantized = result.dequantize() if self.modality_hessians else None
        by_modality = {m: proxy_loss(weight, quantized, h.to(weight.device)) * n / self.tokens
                       for m, (h, n) in self.modality_hessians.items()}
        if self.derived_rows_all:
            rest = result.loss - sum(by_modality.values())  # NaN stays NaN (no usable input)
            by_modality[self.derived] = rest if math.isnan(rest) else max(0.0, rest)
        return {f"loss_{MODALITIES[m]}": by_modality[m] for m in sorted(by_modality)}

"""The interface every kernel backend of the packed modules implements (one file per backend beside this one)."""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import torch


class Layer(Protocol):
    """What a backend needs to know of a layer to say whether it can serve it (a packed module is one)."""

    bits: int
    group_size: int
    in_features: int
    out_features: int


class LayerShape(NamedTuple):
    """A :class:`Layer` without weights, to ask a backend about a layer before one exists."""

    bits: int
    group_size: int
    in_features: int
    out_features: int


class Backend:
    """One way to compute ``x2[M, in] @ W^T + bias`` for a packed module (``qbase.PackedWeightModule``).

    * :attr:`name`: the value of ``module.kernel`` that forces this backend;
    * :meth:`unavailable_reason`: why it cannot serve a layer for inputs of a dtype on a device, on this
      host (None when it can); cheap after the first call;
    * :meth:`prepare`: its weight layout for inputs like ``x2`` (self-checked where the kernel cannot be
      tested on CPU hosts), or why it cannot serve this module after all; the module caches the answer
      per device and dtype until its buffers change (unless :attr:`caches` is False);
    * :meth:`matmul`: the product with what :meth:`prepare` returned;
    * :attr:`variants` / :meth:`variant`: its columns in ``backends.MAX_BATCH``, where other backends'
      batch ranges are measured against it.
    """

    name: str = ""
    variants: tuple[str, ...] = ()
    caches: bool = True

    def unavailable_reason(self, layer: Layer, dtype: torch.dtype, device: torch.device) -> str | None:
        raise NotImplementedError

    def prepare(self, module: Any, x2: torch.Tensor) -> Any:
        raise NotImplementedError

    def matmul(self, module: Any, x2: torch.Tensor, weights: Any, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def variant(self, module: Any, weights: Any) -> str:
        """The column of ``MAX_BATCH`` this backend stands for when it is the alternative (one of
        :attr:`variants`)."""
        return self.name

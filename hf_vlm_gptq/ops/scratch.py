"""Large CPU matrices kept between the solves of one run and handed out again (``MatrixPool``).

On CPU a large tensor is fresh memory from the OS each time (glibc maps blocks above its threshold and unmaps
them when they are freed), and its first touch faults every page in. On the VMs we measured, filling a fresh
2048x2048 float32 matrix took ~30 ms against ~1 ms for memory already touched. The solves of a model repeat
a few shapes (every block has the same layers), so the Hessians, their symmetric copies and factors of one
block can serve the next. Other devices have caching allocators: there the pool hands out fresh tensors and
keeps nothing.
"""

from __future__ import annotations

import torch

__all__ = ["MatrixPool"]

MIN_BYTES = 1 << 20  # smaller blocks come from the allocator's own free lists
MAX_PER_SHAPE = 8  # matrices kept per shape: about what one block holds at once (per-modality and GPTAQ
# accumulators, a solve's symmetric copy, factor, cross term and correction)


class MatrixPool:
    """Matrices given back (:meth:`give`) when their owner is done with them, handed out again by :meth:`take`
    for the same shape, dtype and device. The giver promises that nothing else refers to the tensor or its
    storage; only whole CPU tensors of at least ``MIN_BYTES`` are kept. :meth:`clear` drops them all (the run's
    end)."""

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self.reused = 0  # takes served by a given-back matrix
        self.fresh = 0  # takes that allocated

    @staticmethod
    def _key(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> tuple:
        return tuple(int(s) for s in shape), dtype, torch.device(device)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """A contiguous tensor of ``shape`` with undefined contents: a given-back one when there is one."""
        free = self._free.get(self._key(shape, dtype, device))
        if free:
            self.reused += 1
            return free.pop()
        self.fresh += 1
        return torch.empty(shape, dtype=dtype, device=device)

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """:meth:`take`, zero-filled."""
        return self.take(shape, dtype, device).zero_()

    def give(self, *tensors: torch.Tensor | None) -> None:
        """Keep these tensors for a later :meth:`take` (None, views, small and non-CPU tensors are skipped)."""
        for t in tensors:
            if not self._keepable(t):
                continue
            free = self._free.setdefault(self._key(t.shape, t.dtype, t.device), [])
            if len(free) < MAX_PER_SHAPE and all(f.data_ptr() != t.data_ptr() for f in free):
                free.append(t)

    @staticmethod
    def _keepable(t: torch.Tensor | None) -> bool:
        if t is None or t.device.type != "cpu" or t._base is not None or not t.is_contiguous():
            return False
        nbytes = t.numel() * t.element_size()
        return nbytes >= MIN_BYTES and t.storage_offset() == 0 and t.untyped_storage().nbytes() == nbytes

    def clear(self) -> None:
        """Drop every kept matrix."""
        self._free.clear()

    @property
    def kept_bytes(self) -> int:
        """Bytes held for later takes."""
        return sum(t.numel() * t.element_size() for free in self._free.values() for t in free)

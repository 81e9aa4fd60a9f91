"""Progress bars of a quantization run, driven by its events: one bar per component, one step per block."""

from __future__ import annotations

from tqdm.auto import tqdm

from .events import BlockEnd, ComponentStart, Event


class ProgressBars:
    """Listener (see events.py): a bar named after the component, `total` = its blocks, shown from its
    `ComponentStart` until its last `BlockEnd` (not left on screen). `close()` removes a bar a failed run
    left open."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: tqdm | None = None

    def __call__(self, event: Event) -> None:
        if not self.enabled:
            return
        if isinstance(event, ComponentStart):
            self.close()
            if event.blocks:
                self.bar = tqdm(total=event.blocks, desc=event.component, unit="block", leave=False)
        elif isinstance(event, BlockEnd) and self.bar is not None:
            self.bar.update(1)
            if event.index + 1 == event.total:
                self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

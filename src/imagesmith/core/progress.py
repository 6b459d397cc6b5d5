"""Progress reporting and cancellation, shared by the CLI bar, the Python API and the service."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .errors import Cancelled


@dataclass
class ProgressEvent:
    step: int            # steps done in this whole job
    total: int           # steps the whole job will take
    phase: str           # "txt2img", "img2img", "inpaint", "hires", "upscale", ...
    image_index: int = 0  # first image of the running batch
    latents: Any = None  # the current latents (for previews); None where not available

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total) if self.total else 0.0


ProgressCallback = Callable[[ProgressEvent], None]


class CancelToken:
    """Set from anywhere (another thread, a signal handler, the service); honoured at the next step."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = "cancelled"

    def cancel(self, reason: str = "cancelled") -> None:
        self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled(self.reason)


class StepCounter:
    """Counts steps over several pipeline calls and turns diffusers' per-step callback into events."""

    def __init__(self, total: int, progress: Optional[ProgressCallback], cancel: Optional[CancelToken]):
        self.total = max(1, total)
        self.done = 0
        self.progress = progress
        self.cancel = cancel

    def step(self, phase: str, image_index: int = 0, latents=None) -> None:
        """One sampler step done: report it, then honour a cancel (the sampling layer calls this per step)."""
        self.done += 1
        if self.progress is not None:
            self.progress(ProgressEvent(self.done, self.total, phase, image_index, latents))
        if self.cancel is not None:
            self.cancel.raise_if_cancelled()

    def callback(self, phase: str, image_index: int = 0):
        def on_step_end(pipe, step, timestep, callback_kwargs):
            self.done += 1
            if self.progress is not None:
                self.progress(ProgressEvent(self.done, self.total, phase, image_index,
                                            callback_kwargs.get("latents")))
            if self.cancel is not None:
                self.cancel.raise_if_cancelled()
            return callback_kwargs
        return on_step_end

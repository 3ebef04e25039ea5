"""Wall time per stage of ``decoupleq run``, printed at the end of the run (BENCHMARKS.md §5).

Stages: loading the model and text, the forward passes that capture H (the first one also keeps
the float block's outputs as the block-wise target), the layer solves, the block-wise stage's
forward, backward and optimizer steps (+ its loss checks), propagating the committed block to
the next block's inputs (and the float hidden states, when kept), the model-level stage's steps
and KL checks, and writing/reading the checkpoint. On a GPU every stage ends with a
synchronize, so the figures are where the time went, not where kernels were queued.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

STAGES = ("load", "capture", "solve", "blockwise forward", "blockwise backward", "blockwise optimizer",
          "blockwise loss", "propagate", "model forward", "model backward", "model optimizer", "model loss", "commit")


class StageTimes:
    """Seconds per stage; ``with times("solve"): ...`` adds the block's wall time to the stage."""

    def __init__(self, device: object = None) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self._sync = None
        if getattr(device, "type", None) == "cuda":
            import torch

            self._sync = torch.cuda.synchronize

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if stage not in self.seconds:
            raise KeyError(f"unknown stage {stage!r}; one of {STAGES}")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._sync is not None:
                self._sync()
            self.seconds[stage] += time.perf_counter() - t0

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] += seconds

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def table(self, wall: float | None = None) -> str:
        """One line per stage that took time: seconds and share of ``wall`` (default: the sum)."""
        wall = wall or self.total or 1.0
        rows = [f"  {name:<20} {s:8.1f}s {100 * s / wall:5.1f}%" for name, s in self.seconds.items() if s > 0]
        rest = wall - self.total
        if rest > 0.05 * wall:
            rows.append(f"  {'other':<20} {rest:8.1f}s {100 * rest / wall:5.1f}%")
        return "\n".join(rows)

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}

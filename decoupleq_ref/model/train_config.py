"""Settings of the trained stages of ``decoupleq run`` (model/blockwise.py, model/model_stage.py),
without torch: the CLI reads their defaults at import time, and ``decoupleq quantize`` never
imports torch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

TARGETS = ("quantized", "float")
PRECISIONS = ("fp32", "bf16")
#: --train-precision's choices: auto resolves to one of PRECISIONS for the device
#: (torch_model.training_precision) before a config is made.
PRECISION_CHOICES = ("auto", *PRECISIONS)
SCHEDULES = ("constant", "cosine")
#: The official code's stage: 4 epochs of constant-lr Adam in float32 towards the float block on
#: the quantized prefix's outputs, once.
OFFICIAL = {"epochs": 4, "lr": 1e-5, "targets": "quantized", "precision": "fp32", "schedule": "constant",
            "retries": 0}


def retry_rates(lr: float, retries: int) -> Iterator[float]:
    """The learning rate of each try of a trained stage: ``lr``, then up to ``retries`` more, each a
    tenth of the previous (tried only while the stage's loss rose)."""
    yield lr
    for _ in range(retries):
        lr /= 10
        yield lr


def cosine_lr(lr: float, step: int, steps: int) -> float:
    """``lr`` decayed by a half cosine: lr at step 0, lr/2 midway, towards 0 at the last step."""
    return lr * 0.5 * (1 + math.cos(math.pi * step / steps))


@dataclass(frozen=True)
class BlockwiseConfig:
    """Settings of the block-wise stage: ``epochs`` passes over the calibration windows, one window
    per Adam step, peak learning rate ``lr`` (``schedule``), ``targets`` and ``precision`` as in
    model/blockwise.py; when a block's output loss rose, up to ``retries`` more tries from the
    layer-wise state, each at a tenth of the previous rate. ``epochs == 0`` or ``lr == 0`` turns
    the stage off. The defaults are this project's (BENCHMARKS.md §5);
    ``BlockwiseConfig.official()`` is the official code's."""

    epochs: int = 1
    lr: float = 3e-4
    targets: str = "float"
    precision: str = "fp32"  # the CLI's default is auto (bf16 where the device has it natively)
    schedule: str = "constant"
    retries: int = 1

    def __post_init__(self) -> None:
        for option, name, allowed, shown in (("--block-targets", "targets", TARGETS, TARGETS),
                                             ("--train-precision", "precision", PRECISIONS, PRECISION_CHOICES),
                                             ("--block-schedule", "schedule", SCHEDULES, SCHEDULES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{option}: {getattr(self, name)!r} is not one of {', '.join(shown)}")
        if self.epochs < 0 or not self.lr >= 0 or not math.isfinite(self.lr):
            raise ValueError("--block-epochs/--block-lr: must be >= 0 (0 turns the block-wise stage off)")
        if self.retries < 0:
            raise ValueError("--block-retries: must be >= 0")

    @property
    def on(self) -> bool:
        return self.epochs > 0 and self.lr > 0

    def lr_at(self, step: int, steps: int) -> float:
        """Learning rate of Adam step ``step`` (0-based) of ``steps``."""
        return cosine_lr(self.lr, step, steps) if self.schedule == "cosine" else self.lr

    @classmethod
    def official(cls) -> "BlockwiseConfig":
        return cls(**OFFICIAL)

    def settings(self) -> dict:
        """What a checkpoint records (and a resume must match): epochs and lr, and each other
        setting where it is not the official one (files written before those settings existed
        keep resuming)."""
        out = {"epochs": self.epochs, "lr": self.lr}
        out.update({k: getattr(self, k) for k in ("targets", "precision", "schedule", "retries")
                    if getattr(self, k) != OFFICIAL[k]})
        return out


@dataclass(frozen=True)
class ModelStageConfig:
    """Settings of the model-level stage (model/model_stage.py): ``epochs`` passes over the
    calibration windows, one window per Adam step, learning rate ``lr`` decayed to zero by a
    cosine, forward/backward in ``precision``; when the KL rose, up to ``retries`` more tries from
    the start, each at a tenth of the previous rate. ``epochs == 0`` or ``lr == 0`` turns it off (the
    official procedure has no such stage)."""

    epochs: int = 1
    lr: float = 1e-4
    precision: str = "fp32"  # the CLI's default is auto, as for the block-wise stage
    retries: int = 1

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"--train-precision: {self.precision!r} is not one of {', '.join(PRECISION_CHOICES)}")
        if self.epochs < 0 or not self.lr >= 0 or not math.isfinite(self.lr):
            raise ValueError("--model-epochs/--model-lr: must be >= 0 (0 turns the model-level stage off)")
        if self.retries < 0:
            raise ValueError("--model-retries: must be >= 0")

    @property
    def on(self) -> bool:
        return self.epochs > 0 and self.lr > 0

    def lr_at(self, step: int, steps: int) -> float:
        return cosine_lr(self.lr, step, steps)

    def settings(self) -> dict:
        return {"epochs": self.epochs, "lr": self.lr, "precision": self.precision, "retries": self.retries}

"""Quantization configuration shared by every backend.

Defaults follow the published decoupleQ run (``run_llama.sh`` of the official code):
asymmetric, act-order, 1 % damping, 4 alternations, GPTQ rounding without the Adam
relaxation (the official ``round_fn="gptq"`` sets the relaxation's iteration count to 0).
docs/ALGORITHM.md explains each default.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

Method = Literal["rtn", "gptq", "decoupleq"]
METHODS: tuple[str, ...] = ("rtn", "gptq", "decoupleq")
#: How the high-precision branch picks its input channels (decoupleq_ref/hp_branch.py).
HP_SELECT: tuple[str, ...] = ("hessian", "obs", "magnitude", "error")

#: This project's improved solver: polish + 8 grid placements. On tiny exact cases the
#: loss lands at the global optimum in >80 % of rows (p90 1.21×), on SmolLM2 layers about 0.85×
#: the official-settings objective, for ~6× its solve time (BENCHMARKS.md §2).
IMPROVED: dict[str, Any] = {"refine_sweeps": 3, "n_starts": 8}

#: Fields older versions recorded that no longer exist; from_dict ignores them, so their
#: checkpoints still load ("seed": no choice of the solver was ever random).
RETIRED: tuple[str, ...] = ("seed",)


def is_int(x: object) -> bool:
    """An integer, Python or numpy, but not a bool (True is not 1 bit)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def is_real(x: object) -> bool:
    """A finite real number, Python or numpy, but not a bool."""
    return (isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))
            and math.isfinite(x))


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize one linear layer.

    bits          integer width b, q in [0, 2**b - 1]            (1..8)
    group_size    input columns sharing one (scale, zero); -1 = whole row (per-channel)
    method        "rtn" | "gptq" | "decoupleq"
    iters         decoupleq alternations (integer step + float step each)
    symmetric     zero fixed at -scale * 2**(b-1) (Ŵ = s·(q - 2**(b-1)))
    damp          fraction of mean(diag H) added to diag H; the solver minimises on H + damp
    grid          shrink grid resolution of the init search (0 = plain min-max)
    max_shrink    smallest shrink factor tried is 1 - max_shrink
    act_order     GPTQ rounds columns by decreasing diag(H)
    relax_iters   Adam steps of the box-relaxed integer step before rounding (official: 0)
    relax_lr      Adam learning rate of that step, in weight units
    refine_sweeps decoupleq only: after the alternation, polish q by exact ±1 descent at fixed
                  (s, z), at most this many sweeps per round; 0 = off (official behaviour)
    refine_rounds at most this many (descent → float step) polish rounds; stops earlier when
                  a round moves no code. See decoupleq_ref/refine.py and BENCHMARKS.md.
    n_starts      run the method from this many grid placements and keep each row's best
                  (1 = official single init; extra starts: init.placement_starts)
    lower_bound   also compute a certified lower bound of the optimum (res.gap_bound); costs
                  O(2^b·g²) per group of g columns (seconds per-channel on 1536 columns)
    block_size    GPTQ lazy-update block width (changes speed only, not the result)
    min_improvement  stop when fewer than this fraction of rows improved in a half-step
    hp_channels   k input channels kept in an fp16 branch B solved jointly with the quantized
                  part (Ŵ = s·q + z + B, B non-zero on k columns); 0 = off (hp_branch.py)
    hp_select     how those channels are chosen: "hessian" (diag(H)·‖W_col‖²), "obs"
                  (‖W_col‖² / [H⁻¹]_jj), "magnitude" (‖W_col‖²) or "error" (RTN residual)
    """

    bits: int = 2
    group_size: int = -1
    method: Method = "decoupleq"
    iters: int = 4
    symmetric: bool = False
    damp: float = 0.01
    grid: int = 200
    max_shrink: float = 0.8
    act_order: bool = True
    relax_iters: int = 0
    relax_lr: float = 1e-3
    refine_sweeps: int = 0
    refine_rounds: int = 16
    n_starts: int = 1
    lower_bound: bool = False
    block_size: int = 128
    min_improvement: float = 1e-4
    hp_channels: int = 0
    hp_select: str = "hessian"

    def __post_init__(self) -> None:
        for name, kind in _FIELD_KINDS.items():  # numpy scalars become Python ones (JSON, hashing)
            value = getattr(self, name)
            if kind == "int" and is_int(value):
                object.__setattr__(self, name, int(value))
            elif kind == "bool" and isinstance(value, (bool, np.bool_)):
                object.__setattr__(self, name, bool(value))
            elif kind == "real" and is_real(value):
                object.__setattr__(self, name, float(value))
            elif kind in ("int", "bool", "real"):
                allowed = {"int": "an integer (not a bool)", "bool": "True or False (not a string or number)",
                           "real": "a finite number (not a bool or string)"}[kind]
                raise ValueError(f"QuantConfig.{name}: must be {allowed}, got {value!r} ({type(value).__name__})")

        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"QuantConfig.{name}: {msg}")

        need(1 <= self.bits <= 8, "bits", f"must be an integer in 1..8, got {self.bits!r}")
        need(self.group_size == -1 or self.group_size >= 1,
             "group_size", f"must be -1 (per-channel) or a positive integer, got {self.group_size!r}")
        need(isinstance(self.method, str) and self.method in METHODS, "method",
             f"must be one of {METHODS}, got {self.method!r}")
        need(self.iters >= 0, "iters", f"must be a non-negative integer, got {self.iters!r}")
        need(0 <= self.damp < 1e6, "damp", f"must be a number in [0, 1e6), got {self.damp!r}")
        need(self.grid >= 0, "grid", f"must be a non-negative integer, got {self.grid!r}")
        need(0 <= self.max_shrink < 1, "max_shrink", f"must be in [0, 1), got {self.max_shrink!r}")
        need(self.relax_iters >= 0, "relax_iters", f"must be a non-negative integer, got {self.relax_iters!r}")
        need(self.relax_lr > 0, "relax_lr", f"must be positive, got {self.relax_lr!r}")
        need(self.refine_sweeps >= 0, "refine_sweeps",
             f"must be a non-negative integer, got {self.refine_sweeps!r}")
        need(self.refine_rounds >= 0, "refine_rounds",
             f"must be a non-negative integer, got {self.refine_rounds!r}")
        need(self.n_starts >= 1, "n_starts", f"must be a positive integer, got {self.n_starts!r}")
        need(self.block_size >= 1, "block_size", f"must be a positive integer, got {self.block_size!r}")
        need(0 <= self.min_improvement <= 1, "min_improvement",
             f"must be in [0, 1], got {self.min_improvement!r}")
        need(self.hp_channels >= 0, "hp_channels",
             f"must be a non-negative integer (0 = no fp16 branch), got {self.hp_channels!r}")
        need(isinstance(self.hp_select, str) and self.hp_select in HP_SELECT, "hp_select",
             f"must be one of {HP_SELECT}, got {self.hp_select!r}")
        need(not (self.hp_channels and self.lower_bound), "lower_bound",
             "the certified bound does not cover the fp16 branch; set lower_bound=False or hp_channels=0")

    @property
    def maxq(self) -> int:
        """Largest integer code, 2**bits - 1."""
        return (1 << self.bits) - 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def improved(cls, **overrides: Any) -> "QuantConfig":
        """The improved preset (``IMPROVED``: refinement + extra starts) with any field overridden."""
        return cls(**{**IMPROVED, **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        d = {k: v for k, v in d.items() if k not in RETIRED}
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"config: unknown field(s) {unknown}; known: {sorted(cls().to_dict())}")
        return cls(**known)


#: The type each QuantConfig field must have ("str" fields are checked against their choices).
_FIELD_KINDS: dict[str, str] = {
    "bits": "int", "group_size": "int", "method": "str", "iters": "int", "symmetric": "bool",
    "damp": "real", "grid": "int", "max_shrink": "real", "act_order": "bool", "relax_iters": "int",
    "relax_lr": "real", "refine_sweeps": "int", "refine_rounds": "int", "n_starts": "int",
    "lower_bound": "bool", "block_size": "int", "min_improvement": "real",
    "hp_channels": "int", "hp_select": "str",
}

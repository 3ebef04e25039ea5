"""The tolerance policy: how close is close enough, for every comparison validate makes.

``Policy``     the conformance checks of one result (check_result, run_suite): levels
               "reference" and "quality" (docs/VALIDATION.md, "Tolerance policy")
``Agreement``  what "backend B agrees with backend A" means (compare, assert_agree), with the
               bound each backend is held to: ``Agreement()`` for any backend on the suite,
               ``NUMBA`` and ``CUDA`` for the compiled backends against the reference

Only numbers and their meaning live here; the measurements are in check.py and compare.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

#: Per-case limit of objective / reference objective − 1, by level. "quality" is loose per case
#: (heuristics legitimately differ by 10-25 % on single tiny or degenerate layers) and strict on
#: the suite's geometric mean (SUITE_LEVELS): docs/VALIDATION.md, "Tolerance policy".
LEVELS: dict[str, float] = {"reference": 1e-6, "quality": 0.5}
SUITE_LEVELS: dict[str, float] = {"reference": 1e-6, "quality": 0.05}


@dataclass(frozen=True)
class Policy:
    """Tolerances of every conformance check (docs/VALIDATION.md, "Tolerance policy").

    level          "reference" (rtol 1e-6 per case and over the suite: as good as the reference
                   up to float64 noise) or "quality" (a legitimate variant, e.g. float32 or the
                   official solver's decisions: ≤ 1.5× per case, geometric mean over a suite ≤ 1.05×)
    reference_rtol overrides the level's per-case rtol when set
    claimed_rtol   relative tolerance of claimed loss / row_loss / objective vs recomputed
    optimum_rtol   how far below the global optimum a row may be (float noise of both sides)
    energy_atol    absolute slack, as a fraction of the energy Σ_i W_i H_d W_iᵀ (the
                   objective of Ŵ = 0): makes losses that should be 0 comparable
    storage_ulps   slack for the precision of the returned scale/zero: a value rounded to the
                   returned dtype moves the objective by ≤ 2·u·sqrt(objective·energy) (u the
                   dtype's unit roundoff); this many u are allowed (float64: negligible)
    symmetric_rtol relative tolerance of zero = −scale·2^(b−1) in symmetric mode
    """

    level: str = "quality"
    reference_rtol: float | None = None
    claimed_rtol: float = 1e-6
    optimum_rtol: float = 1e-9
    energy_atol: float = 1e-12
    storage_ulps: float = 4.0
    symmetric_rtol: float = 1e-6

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"level: {self.level!r} is not one of {sorted(LEVELS)}")

    @property
    def rtol(self) -> float:
        return LEVELS[self.level] if self.reference_rtol is None else self.reference_rtol

    @property
    def suite_rtol(self) -> float:
        """Limit of the geometric mean over a suite's cases of objective / reference − 1."""
        return SUITE_LEVELS[self.level]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rtol": self.rtol, "suite_rtol": self.suite_rtol}


def policy_section() -> dict[str, Any]:
    """The tolerance contract as recorded in a suite's manifest (docs/VALIDATION.md explains each)."""
    p = Policy()
    return {
        "structure": {"tolerance": "exact", "what": "q (out, in) integer in [0, 2^b-1]; scale, zero (out, G) "
                      "float and finite; symmetric: zero = -scale*2^(b-1)", "symmetric_rtol": p.symmetric_rtol},
        "loss.claimed": {"rtol": p.claimed_rtol, "what": "claimed loss / row_loss / objective equal the values "
                         "recomputed from (q, scale, zero)"},
        "loss.reference": {"levels": LEVELS, "default_level": p.level,
                           "what": "objective (on H + damp*mean(diag H)*I) <= (1 + rtol) x the reference's, in total "
                           "and averaged over rows normalised by W_i H_d W_i^T"},
        "suite.reference": {"levels": SUITE_LEVELS, "what": "geometric mean over the cases with a reference "
                            "of objective / reference objective <= 1 + rtol"},
        "loss.optimum": {"rtol": p.optimum_rtol, "what": "no row's objective below the exact global optimum "
                         "(tiny per-channel cases)"},
        "slack": {"energy_atol": p.energy_atol, "storage_ulps": p.storage_ulps,
                  "what": "absolute slack energy_atol * sum_i W_i H_d W_i^T, plus storage_ulps * u * "
                  "2*sqrt(objective*energy) for scale/zero returned in a dtype of unit roundoff u"},
        "ties": "rounding ties (x.5 exactly) may be decided either way; only the loss tolerances judge them",
    }


@dataclass(frozen=True)
class Agreement:
    """What "backend B agrees with backend A" means; every bound is checked by
    ``validate.compare.agreement`` (a bound of ``math.inf`` or None switches a check off).

    min_agreement    fraction of equal integer codes (on rows that are not float ties)
    tie_rtol         None: no ties. Else a row whose codes differ but whose claimed row_loss
                     is equal to this relative tolerance (np.isclose, atol tie_atol) is a
                     float tie — two codings of one Ŵ, e.g. q and q + 1 with z − s — and
                     may be decided either way; at most ``max_tie_rows`` of the rows may be ties
    loss_rtol        |objective_B − objective_A| (recomputed from each side's q/scale/zero on
                     the damped H) ≤ loss_rtol·max + energy_atol·energy; the claimed ``loss``
                     and ``objective`` likewise, ≤ loss_rtol·|A| + loss_atol
    max_param_diff   scale/zero difference on rows with identical codes, relative to the
                     case's largest |scale| (|zero|)
    same_dtypes      q, scale, zero, row_loss: the same dtype on both sides (shapes always)
    history_rtol     loss_history elementwise |B − A| ≤ history_rtol·|A| + loss_atol, the
                     same number of alternation steps (None: not compared)
    branch_rtol, branch_atol
                     fp16 branch: the same hp_index, hp_weight elementwise within
                     branch_rtol·|A| + branch_atol·max|A|
    bound_rtol       lower_bound: present on both or neither, equal to this relative tolerance
    """

    min_agreement: float = 0.99
    loss_rtol: float = 1e-6
    max_param_diff: float = 1e-6
    energy_atol: float = 1e-12
    loss_atol: float = 1e-300
    tie_rtol: float | None = None
    tie_atol: float = 1e-15
    max_tie_rows: float = 0.05
    same_dtypes: bool = False
    history_rtol: float | None = None
    branch_rtol: float = math.inf
    branch_atol: float = 0.0
    bound_rtol: float | None = None


#: kernels_numba vs the reference: the same codes outside float ties (the backend computes the
#: step losses by other formulas, so it may break a tie the other way), losses to 1e-6.
NUMBA = Agreement(min_agreement=0.999, loss_rtol=1e-6, loss_atol=1e-15, tie_rtol=1e-9, same_dtypes=True,
                  history_rtol=1e-6, branch_rtol=1e-6, branch_atol=1e-9, bound_rtol=1e-9)
#: gpu vs the reference: codes on ≥ 99.9 % of entries, losses, (s, z), the fp16 branch and the
#: bound to 1e-5 relative (compiled for a GPU, fused multiply-adds round differently from NumPy).
CUDA = Agreement(min_agreement=0.999, loss_rtol=1e-5, max_param_diff=1e-5, same_dtypes=True,
                 history_rtol=1e-5, branch_rtol=0.0, branch_atol=1e-5, bound_rtol=1e-5)

"""The decoupled representation Ŵ = scale·q + zero and the result object.

Layout (docs/FORMAT.md): q is uint8 (out, in) with values in [0, 2**bits - 1]; scale and zero
are (out, n_groups); column j of row i belongs to group j // group_size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import QuantConfig


def n_groups(n_in: int, group_size: int) -> int:
    """Number of groups per row; group_size = -1 means one group (per-channel)."""
    return 1 if group_size == -1 else n_in // group_size


def effective_group_size(n_in: int, group_size: int) -> int:
    return n_in if group_size == -1 else group_size


def expand_groups(per_group: np.ndarray, n_in: int) -> np.ndarray:
    """(out, G) -> (out, in): repeat each group's value over its columns."""
    return np.repeat(per_group, n_in // per_group.shape[1], axis=1)


def dequantize_parts(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """Ŵ = s·q + z, element-wise after expanding (s, z) over the groups (float64)."""
    n_in = q.shape[1]
    return expand_groups(scale, n_in) * q + expand_groups(zero, n_in)


def bits_per_weight(out: int, n_in: int, bits: int, group_size: int, symmetric: bool = False,
                    hp_channels: int = 0) -> float:
    """Storage per weight: (out·in·b + out·G·16·(1 + asym) + out·k·16 + k·32) / (out·in).

    Scales (and zeros, when asymmetric; symmetric zeros follow from the scale) count as fp16,
    the branch as an fp16 (out, k) block plus k int32 column indices (docs/FORMAT.md).
    """
    G = n_groups(n_in, group_size)
    total = out * n_in * bits + out * G * 16 * (1 if symmetric else 2) + out * hp_channels * 16 + hp_channels * 32
    return total / (out * n_in)


@dataclass
class QuantResult:
    """Outcome of one layer solve, in the spirit of scipy.optimize.OptimizeResult.

    q             uint8 (out, in), values in [0, 2**bits - 1]
    scale, zero   float64 (out, n_groups)
    loss          Σ_i (Ŵ_i − W_i) H (Ŵ_i − W_i)ᵀ on the H passed in (undamped)
    row_loss      the same per row (out,)
    objective     the solver's objective: the loss on the damped H (what decisions were made on)
    loss_history  objective after init and after every half-step (never increases)
    history_steps name of each history entry ("init", "integer[0]", "float[0]", ...)
    improved_rows rows that took each half-step's proposal (same length as history_steps)
    config        the QuantConfig used
    lower_bound   with config.lower_bound: certified lower bound of the optimal objective
                  (decoupleq_ref/bounds.py), so objective / lower_bound bounds the optimality gap
    hp_index      with config.hp_channels = k: int64 (k,) ascending columns of the fp16 branch
    hp_weight     float64 (out, k) branch block B; Ŵ = s·q + z, plus B on the columns hp_index
    status        why the solve stopped, as scipy.optimize's ``status`` (decoupleq_ref.solver):
                  0 the alternation used all its rounds, 1 a half-step improved fewer than
                  min_improvement of the rows, 2 the polish converged (a round moved no code),
                  3 the polish used all refine_rounds; with extra starts, the first start's
    message       the same in words, with the round it stopped in
    """

    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    loss: float
    row_loss: np.ndarray
    objective: float
    loss_history: list[float]
    history_steps: list[str]
    improved_rows: list[int]
    config: QuantConfig
    lower_bound: float | None = None
    hp_index: np.ndarray | None = None
    hp_weight: np.ndarray | None = None
    status: int = 0
    message: str = ""

    @property
    def gap_bound(self) -> float | None:
        """objective / certified lower bound: the solution is at most this factor from optimal."""
        if self.lower_bound is None:
            return None
        return self.objective / self.lower_bound if self.lower_bound > 0 else float("inf")

    @property
    def bits(self) -> int:
        return self.config.bits

    @property
    def group_size(self) -> int:
        return effective_group_size(self.q.shape[1], self.config.group_size)

    @property
    def hp_channels(self) -> int:
        return 0 if self.hp_index is None else len(self.hp_index)

    @property
    def bits_per_weight(self) -> float:
        """Effective storage per weight including scales, zeros and the fp16 branch."""
        out, n_in = self.q.shape
        return bits_per_weight(out, n_in, self.bits, self.config.group_size, self.config.symmetric,
                               self.hp_channels)

    def dequantize(self) -> np.ndarray:
        W_hat = dequantize_parts(self.q, self.scale, self.zero)
        if self.hp_channels:
            W_hat[:, self.hp_index] += self.hp_weight
        return W_hat

    def __repr__(self) -> str:  # short: arrays are large
        out, n_in = self.q.shape
        return (
            f"QuantResult(shape=({out}, {n_in}), bits={self.bits}, group_size={self.config.group_size}, "
            f"method={self.config.method!r}, loss={self.loss:.6g}, objective={self.objective:.6g}, "
            f"steps={len(self.loss_history)})"
        )


def dequantize(result: QuantResult) -> np.ndarray:
    """Ŵ for a QuantResult (float64, (out, in))."""
    return result.dequantize()

"""The operations object: what a backend supplies to decoupleQ's one solver loop.

``decoupleq_ref.solver`` holds every decision of a solve (the official start, the alternation's
early exit, gptq[init], the polish rounds, extra starts, the fp16 branch, the result); it never
touches an array itself. Each backend provides one class with the interface of ``LayerOps``
below, built once per layer from (W, H_d, cfg), which keeps whatever the backend precomputes or
holds on its device (W·H_d, GPTQ's factor, device copies) and supplies:

* the start: ``init`` (grid search), ``start`` (RTN codes of a grid, ``rtn``, as a ``Run``);
* the steps, each returning a ``Proposal`` — a candidate (q, s, z) together with the losses the
  step already knows (or None) — : ``float_step``, ``integer_step``, ``refine``,
  ``refine_profiled``;
* the judge: ``proposal_losses`` (ℓ by the residual product) and ``accept`` (keep-if-better);
* the result: ``host`` arrays and ``reported_losses`` on the undamped H.

This module's ``LayerOps`` is the reference backend (NumPy, float64, every loss by the product);
kernels_numba.solver.NumbaOps and gpu.solver.CudaOps are the others (docs/ALGORITHM.md,
"Adding a backend").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import QuantConfig
from .float_step import closed_form_scale_zero
from .format import dequantize_parts
from .init import init_scale_zero, quantize_rtn
from .integer_step import gptq_factor, integer_step
from .objective import residual_norms, row_losses, undamped_losses
from .refine import refine_integers, refine_profiled


def proposal_losses(W: np.ndarray, q: np.ndarray, scale: np.ndarray, zero: np.ndarray, H: np.ndarray) -> np.ndarray:
    """ℓ_i of the proposal (q, s, z): row_losses(W, s·q + z, H), the objective every step is judged on."""
    return row_losses(W, dequantize_parts(q, scale, zero), H)


def keep_better(best: np.ndarray, proposal: np.ndarray) -> np.ndarray:
    """Rows where the proposal strictly lowers the objective (ties keep the incumbent)."""
    return proposal < best


@dataclass
class Proposal:
    """A candidate (q, s, z) for every row, as a step returns it (arrays of the backend's kind).

    losses  ℓ per row where the step computed it on the way (None: the loop evaluates the
            proposal by ``proposal_losses``). A backend that fills it must give, for a row whose
            proposal is the incumbent's own (q, s, z), the incumbent's objective: a formula value
            differs from it by rounding and would count as an improvement.
    fitted  (s, z) is the float step's exact fit of q.
    moved   bool per row: rows whose codes may differ from the incumbent's (None: any row may).
    """

    q: Any
    scale: Any
    zero: Any
    losses: Any = None
    fitted: bool = False
    moved: np.ndarray | None = None


@dataclass
class Run:
    """The incumbent of one solve (current (q, s, z) and per-row objective) and its history.

    stale: bool per row, rows where a float step on the incumbent's codes may still lower the
    objective: set where any other proposal is taken, cleared by a float step's offer. A backend
    may solve only these rows (kernels_numba); None where a backend does not track it."""

    q: Any
    scale: Any
    zero: Any
    obj: Any
    stale: np.ndarray | None = None
    history: list[float] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    improved: list[int] = field(default_factory=list)
    status: int = 0
    message: str = ""

    @property
    def rows(self) -> int:
        return self.obj.shape[0]


class LayerOps:
    """The reference backend's operations on one layer (W, H_d), and the interface of every backend.

    ``damp_in_place``: the caller may damp H in place (the solve never needs the undamped H,
    ``reported_losses`` gets the undamped loss from the damped one); a backend that wants the
    undamped H for its reported loss sets it False and receives H there."""

    damp_in_place = True

    def __init__(self, W: np.ndarray, Hd: np.ndarray, cfg: QuantConfig):
        self.W, self.Hd, self.cfg = W, Hd, cfg
        self._factor: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def factor(self) -> tuple[np.ndarray, np.ndarray]:
        """GPTQ's (perm, U) for H_d, computed once per layer on first use."""
        if self._factor is None:
            self._factor = gptq_factor(self.Hd, self.cfg.act_order, self.cfg.damp)
        return self._factor

    # --- the start ----------------------------------------------------------------------------
    def init(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The shrink-grid search's host (scale, zero) and, if known, the losses of RTN on it."""
        c = self.cfg
        scale, zero, _ = init_scale_zero(self.W, self.Hd, c.bits, c.group_size, c.symmetric, c.grid, c.max_shrink)
        return scale, zero, None

    def start(self, scale: np.ndarray, zero: np.ndarray, losses: np.ndarray | None = None) -> Run:
        """The incumbent RTN(W; s, z) on the host grid (scale, zero), with its losses if known."""
        q = self.rtn(scale, zero)
        obj = losses if losses is not None else self.proposal_losses(q, scale, zero)
        return Run(q, scale.copy(), zero.copy(), obj, stale=np.ones(self.W.shape[0], bool))

    def rtn(self, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
        """RTN codes of W on the host grid (scale, zero), in the backend's code dtype."""
        return quantize_rtn(self.W, scale, zero, self.cfg.bits)

    # --- the steps ----------------------------------------------------------------------------
    def proposal_losses(self, q: Any, scale: Any, zero: Any) -> Any:
        return proposal_losses(self.W, q, scale, zero, self.Hd)

    def float_step(self, run: Run, q: Any = None, moved: np.ndarray | None = None) -> Proposal:
        """The exact (s, z) for the codes q (the incumbent's when None; then no row moved);
        ``moved``: rows where q may differ from the incumbent's codes (None: any)."""
        c = self.cfg
        if q is None:
            q, moved = run.q, np.zeros(run.rows, bool)
        s, z = closed_form_scale_zero(q, self.W, self.Hd, c.bits, c.group_size, c.symmetric, run.scale)
        return Proposal(q, s, z, fitted=True, moved=moved)

    def integer_step(self, run: Run) -> Proposal:
        """New codes on the incumbent's grid (GPTQ, after the box relaxation when asked for)."""
        c = self.cfg
        q = integer_step(self.W, run.scale, run.zero, self.Hd, c.bits, c.act_order, c.block_size, c.damp,
                         c.relax_iters, c.relax_lr, self.factor)
        return Proposal(q, run.scale.copy(), run.zero.copy())

    def refine(self, run: Run) -> tuple[Proposal, int]:
        """Exact ±1 descent on the codes at the incumbent's (s, z); (proposal, moves made)."""
        c = self.cfg
        q, moves = refine_integers(run.q, self.W, run.scale, run.zero, self.Hd, c.bits, c.refine_sweeps)
        return Proposal(q, run.scale, run.zero), moves

    def refine_profiled(self, run: Run) -> tuple[Any, np.ndarray | None, int]:
        """Per-channel descent on min_{s,z} ℓ: (codes, rows that moved or None, moves made)."""
        c = self.cfg
        q, moves = refine_profiled(run.q, self.W, self.Hd, c.bits, c.symmetric, c.refine_sweeps)
        return q, None, moves

    # --- the judge ----------------------------------------------------------------------------
    def accept(self, run: Run, p: Proposal, losses: Any) -> tuple[int, float]:
        """Rows whose objective the proposal lowers take it (in place); (rows taken, Σ objective)."""
        better = keep_better(run.obj, losses)
        run.q[better], run.scale[better], run.zero[better], run.obj[better] = (
            p.q[better], p.scale[better], p.zero[better], losses[better])
        if run.stale is not None:
            if p.fitted:  # rows a float step was offered on the incumbent's codes are settled
                run.stale &= ~better & (True if p.moved is None else p.moved)
            else:
                run.stale |= better
        return int(better.sum()), self.total(run.obj)

    def total(self, obj: Any) -> float:
        return float(obj.sum())

    # --- the result ---------------------------------------------------------------------------
    def host(self, run: Run) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(q, scale, zero, obj) of the incumbent as host arrays."""
        return run.q, run.scale, run.zero, run.obj

    def reported_losses(self, q: np.ndarray, scale: np.ndarray, zero: np.ndarray, lam: float,
                        H: np.ndarray | None) -> np.ndarray:
        """ℓ_i on the undamped H of the host result: r H rᵀ = r H_d rᵀ − λ‖r‖² (always by the
        residual product on H_d, never a step's formula)."""
        return undamped_losses(proposal_losses(self.W, q, scale, zero, self.Hd),
                               residual_norms(self.W, q, scale, zero), lam)

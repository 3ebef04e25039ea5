"""kernels_numba.quantize_layer: the reference's solver loop (decoupleq_ref.solver) with this
package's compiled kernels, through the operations object ``NumbaOps``.

Every decision (keep-if-better, early exit, gptq[init], refinement rounds, extra starts, the fp16
branch) is the reference's code; only the operations differ, so the backend agrees with the
reference by construction up to float rounding in the losses. What the operations add:

* W·H_d and c_i = W_i H_d W_iᵀ are computed once per layer (the init, every float step and the
  profiled descent need them; the reference recomputes W·H_d each time).
* Proposals come with the losses their step already knows (docs/ALGORITHM.md §4, "Evaluating a
  proposal"): the init's grid score, the float step's normal equations (ℓ = θᵀPθ − 2θᵀy + c, O(G²)
  per row), GPTQ's rounding errors (ℓ = ‖e‖² − λ‖ŵ − w‖²); each replaces an (out, in)·(in, in)
  product. Rows whose proposal is the incumbent's own take the incumbent's objective.
* The float step solves only the rows the incumbent's ``stale`` mask and the proposal's moved
  rows name; the others are the incumbent's fit already.
"""

from __future__ import annotations

import numpy as np

from decoupleq_ref.config import QuantConfig
from decoupleq_ref.format import QuantResult
from decoupleq_ref.layer_ops import LayerOps, Proposal, Run
from decoupleq_ref.objective import undamped_losses
from decoupleq_ref.solver import quantize_layer as reference_quantize_layer

from ._blas import matmul, one_blas_thread
from ._compat import njit, prange, require
from .float_step import solve_scale_zero
from .init import grid_search, quantize_rtn
from .integer_step import gptq_codes, gptq_losses, lean_factor, relax_box
from .objective import exact_losses, losses_of_rows, residual_norms
from .refine import descend_fixed, descend_profiled

#: A formula loss counts only where it is this large relative to the terms it came from: below,
#: cancellation leaves mostly rounding (constant or exactly representable rows, ℓ ≈ 0), and the
#: comparison with the incumbent would be decided by noise; such rows get the residual product.
RELIABLE = 1e-9


@njit(parallel=True)
def rows_differ(a, b):
    """Per row: do the uint8 code arrays a and b differ anywhere."""
    out = np.zeros(a.shape[0], np.bool_)
    for i in prange(a.shape[0]):
        for j in range(a.shape[1]):
            if a[i, j] != b[i, j]:
                out[i] = True
                break
    return out


class NumbaOps(LayerOps):
    """The compiled backend's operations on one layer (see the module docstring)."""

    def __init__(self, W: np.ndarray, Hd: np.ndarray, cfg: QuantConfig):
        super().__init__(W, Hd, cfg)
        self.L = matmul(W, Hd)  # W·H_d
        self.c = np.einsum("ij,ij->i", W, self.L)  # W_i H_d W_iᵀ: the constant term of every row's loss
        self._lean: tuple[np.ndarray, np.ndarray, float] | None = None

    @property
    def factor(self) -> tuple[np.ndarray, np.ndarray]:
        if self._lean is None:
            self._lean = lean_factor(self.Hd, self.cfg.act_order, self.cfg.damp)
        return self._lean[:2]

    def _checked(self, losses: np.ndarray, size: np.ndarray, q, scale, zero, rows: np.ndarray) -> np.ndarray:
        """Formula losses of the rows ``rows``, with those below RELIABLE·size (mostly rounding)
        replaced by the residual product."""
        redo = np.nonzero(~(losses > RELIABLE * size))[0]
        if redo.size:
            losses[redo] = losses_of_rows(self.W, q, scale, zero, self.Hd, rows[redo])
        return losses

    def _on_moved(self, run: Run, p: Proposal, moved: np.ndarray, losses: np.ndarray | None = None,
                  size: np.ndarray | None = None) -> Proposal:
        """p with its losses: the incumbent's objective on unmoved rows (their proposal is the
        incumbent's own), on moved rows the formula ``losses`` (checked) or else the product."""
        rows = np.nonzero(moved)[0]
        obj = run.obj.copy()
        if losses is None:
            obj[rows] = losses_of_rows(self.W, p.q, p.scale, p.zero, self.Hd, rows)
        else:
            obj[rows] = self._checked(losses[rows], size[rows], p.q, p.scale, p.zero, rows)
        p.losses, p.moved = obj, moved
        return p

    def init(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        c = self.cfg
        scale, zero, losses = grid_search(self.W, self.Hd, self.L, c.bits, c.group_size, c.symmetric, c.grid,
                                          c.max_shrink)
        return scale, zero, self._checked(losses, np.abs(self.c), self.rtn(scale, zero), scale, zero,
                                          np.arange(self.W.shape[0]))

    def rtn(self, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
        return quantize_rtn(self.W, scale, zero, self.cfg.bits)  # uint8, no (out, in) float64 temporaries

    def proposal_losses(self, q, scale, zero) -> np.ndarray:
        return exact_losses(self.W, q, scale, zero, self.Hd)

    def float_step(self, run: Run, q=None, moved: np.ndarray | None = None) -> Proposal:
        c = self.cfg
        if q is None:  # a refit of the incumbent's codes: only rows a step changed since the last one
            q, moved = run.q, np.zeros(run.rows, bool)
        todo = np.nonzero(run.stale | moved if moved is not None else np.ones(run.rows, bool))[0]
        s, z, obj = run.scale.copy(), run.zero.copy(), run.obj.copy()
        s[todo], z[todo], losses = solve_scale_zero(q, self.W, self.Hd, self.L, c.bits, c.group_size, c.symmetric,
                                                    run.scale, todo, self.c)
        obj[todo] = self._checked(losses, np.abs(self.c[todo]), q, s, z, todo)
        # a solved row that reproduces the incumbent's (s, z) on its codes is the incumbent
        own = ~moved[todo] if moved is not None else np.zeros(todo.size, bool)
        own &= (s[todo] == run.scale[todo]).all(axis=1) & (z[todo] == run.zero[todo]).all(axis=1)
        obj[todo[own]] = run.obj[todo[own]]
        return Proposal(q, s, z, losses=obj, fitted=True, moved=moved)

    def integer_step(self, run: Run) -> Proposal:
        c = self.cfg
        perm, U = self.factor
        start = self.W
        if c.relax_iters > 0:
            reps = self.W.shape[1] // run.scale.shape[1]
            start = relax_box(self.W, np.repeat(run.scale, reps, axis=1), np.repeat(run.zero, reps, axis=1), self.Hd,
                              c.bits, c.relax_iters, c.relax_lr)
        formula = c.relax_iters == 0  # GPTQ's loss identity holds for rounding W itself
        q, err_sq = gptq_codes(start, run.scale, run.zero, c.bits, perm, U, c.block_size, errors=formula)
        p = Proposal(q, run.scale.copy(), run.zero.copy())
        if not formula:
            return self._on_moved(run, p, rows_differ(q, run.q))
        losses = gptq_losses(err_sq, self._lean[2], residual_norms(self.W, q, p.scale, p.zero))
        return self._on_moved(run, p, rows_differ(q, run.q), losses, err_sq)

    def refine(self, run: Run) -> tuple[Proposal, int]:
        c = self.cfg
        q, moves = descend_fixed(run.q, self.W, run.scale, run.zero, self.Hd, c.bits, c.refine_sweeps)
        return self._on_moved(run, Proposal(q, run.scale, run.zero), moves > 0), int(moves.sum())

    def refine_profiled(self, run: Run) -> tuple[np.ndarray, np.ndarray, int]:
        c = self.cfg
        q, moves = descend_profiled(run.q, self.W, self.Hd, self.L, c.bits, c.symmetric, c.refine_sweeps)
        return q, moves > 0, int(moves.sum())

    def reported_losses(self, q, scale, zero, lam: float, H: np.ndarray | None) -> np.ndarray:
        return undamped_losses(exact_losses(self.W, q, scale, zero, self.Hd), residual_norms(self.W, q, scale, zero),
                               lam)


def quantize_layer(W: np.ndarray, H: np.ndarray, cfg: QuantConfig | None = None) -> QuantResult:
    """Quantize one linear layer with the compiled kernels; same signature, config and result
    as decoupleq_ref.quantize_layer (raises ImportError naming the fix when numba is missing)."""
    require()
    with one_blas_thread():
        return reference_quantize_layer(W, H, cfg, backend=NumbaOps)

"""decoupleQ's layer solver: alternate the integer and float steps, per row keeping only what
lowers the objective.  rtn, gptq and decoupleq share this one code path:

    rtn       = init
    gptq      = init → integer step
    decoupleq = init → float step → (integer step → float step) × iters [→ (refinement → float step) × rounds]

Two additions of this project, both off by default (official behaviour): the refinement
(``refine_sweeps > 0``) and extra starts (``n_starts > 1``): the whole path is run again from
other grid placements and each row keeps its best run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .bounds import row_lower_bound
from .config import QuantConfig
from .float_step import closed_form_scale_zero
from .format import QuantResult, dequantize_parts
from .hp_branch import Branch, add_branch, branch_weight
from .init import init_scale_zero, placement_starts, quantize_rtn
from .integer_step import gptq_factor, integer_step
from .layer_input import solve_layer
from .objective import damp_hessian, damping, residual_norms, row_losses, undamped_losses
from .refine import refine_integers, refine_profiled


def proposal_losses(W: np.ndarray, q: np.ndarray, scale: np.ndarray, zero: np.ndarray, H: np.ndarray) -> np.ndarray:
    """ℓ_i of the proposal (q, s, z): row_losses(W, s·q + z, H), the objective every step is judged on."""
    return row_losses(W, dequantize_parts(q, scale, zero), H)


@dataclass(frozen=True)
class SolverOps:
    """The hot functions of a solve. The orchestration below is written once; a backend
    (kernels_numba) passes its own same-named kernels, so it follows the same decisions."""

    init_scale_zero: Callable = init_scale_zero
    placement_starts: Callable = placement_starts
    quantize_rtn: Callable = quantize_rtn
    proposal_losses: Callable = proposal_losses
    row_losses: Callable = row_losses
    closed_form_scale_zero: Callable = closed_form_scale_zero
    gptq_factor: Callable = gptq_factor
    integer_step: Callable = integer_step
    refine_integers: Callable = refine_integers
    refine_profiled: Callable = refine_profiled
    residual_norms: Callable = residual_norms
    exact_losses: Callable = proposal_losses  # the reported loss: always the product, never a formula


REFERENCE_OPS = SolverOps()


def keep_better(best: np.ndarray, proposal: np.ndarray) -> np.ndarray:
    """Rows where the proposal strictly lowers the objective (ties keep the incumbent)."""
    return proposal < best


def unchanged_rows(q: np.ndarray, scale: np.ndarray, zero: np.ndarray,
                   q_new: np.ndarray, s_new: np.ndarray, z_new: np.ndarray) -> np.ndarray:
    """Rows whose proposal (q, s, z) equals the incumbent's bit for bit.

    Such a row has the incumbent's objective by definition. For the reference this changes
    nothing (equal inputs give an equal loss); a backend that evaluates a proposal's loss by an
    equivalent formula (kernels_numba: from the float step's normal equations or GPTQ's errors)
    differs from the incumbent's value by rounding, and must not count that as an improvement:
    the improved-row count drives the early exit."""
    return ((q_new == q).all(axis=1) & (s_new == scale).all(axis=1) & (z_new == zero).all(axis=1))


@dataclass
class Run:
    """The state of one solve: current (q, s, z), per-row objective, and its history."""

    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    obj: np.ndarray
    history: list[float] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    improved: list[int] = field(default_factory=list)

    def offer(self, name: str, q: np.ndarray, scale: np.ndarray, zero: np.ndarray, obj: np.ndarray) -> float:
        """Rows whose objective the proposal lowers take it; returns the fraction that did."""
        obj = np.where(unchanged_rows(self.q, self.scale, self.zero, q, scale, zero), self.obj, obj)
        better = keep_better(self.obj, obj)
        self.q[better], self.scale[better], self.zero[better], self.obj[better] = (
            q[better], scale[better], zero[better], obj[better])
        self.history.append(float(self.obj.sum()))
        self.steps.append(name)
        self.improved.append(int(better.sum()))
        return float(better.mean())


def alternate(W: np.ndarray, Hd: np.ndarray, scale: np.ndarray, zero: np.ndarray, cfg: QuantConfig,
              refit_first: bool = True, factor: tuple[np.ndarray, np.ndarray] | None = None,
              ops: SolverOps = REFERENCE_OPS) -> Run:
    """The method's whole path from an initial (s, z): RTN, then the steps ``cfg.method`` asks for.

    ``refit_first``: decoupleq's float step before the first integer step (the official start).
    ``factor``: GPTQ's (perm, U) for Hd (``gptq_factor``), computed here if not given.
    ``ops``: the hot functions (``SolverOps``); the reference's own by default."""
    b = cfg.bits
    q = ops.quantize_rtn(W, scale, zero, b)
    run = Run(q, scale.copy(), zero.copy(), ops.proposal_losses(W, q, scale, zero, Hd))
    run.history, run.steps, run.improved = [float(run.obj.sum())], ["init"], [W.shape[0]]

    def propose(name: str, q_new: np.ndarray, s_new: np.ndarray, z_new: np.ndarray) -> float:
        return run.offer(name, q_new, s_new, z_new, ops.proposal_losses(W, q_new, s_new, z_new, Hd))

    def float_step(name: str) -> float:
        s_new, z_new = ops.closed_form_scale_zero(run.q, W, Hd, b, cfg.group_size, cfg.symmetric, run.scale)
        return propose(name, run.q, s_new, z_new)

    rounds = {"rtn": 0, "gptq": 1, "decoupleq": cfg.iters}[cfg.method]
    if rounds and factor is None:
        factor = ops.gptq_factor(Hd, cfg.act_order, cfg.damp)
    def integer(s_: np.ndarray, z_: np.ndarray) -> np.ndarray:
        return ops.integer_step(W, s_, z_, Hd, b, cfg.act_order, cfg.block_size, cfg.damp,
                            cfg.relax_iters, cfg.relax_lr, factor)

    gptq_on_init = None
    if cfg.method == "decoupleq" and refit_first:
        # The official solver's first GPTQ grid is the least-squares (s, z) of the grid-searched RTN
        # codes, not the grid-searched (s, z) itself: on real layers this start is worth 1-6 %.
        # The gptq baseline's result (GPTQ on the searched grid) is kept aside and offered after
        # the alternation, so that decoupleq ≤ gptq holds row by row on the same init.
        gptq_on_init = (integer(run.scale, run.zero), run.scale.copy(), run.zero.copy())
        float_step("float[init]")
    for it in range(rounds):
        rate = propose(f"integer[{it}]", integer(run.scale, run.zero), run.scale, run.zero)
        if cfg.method == "gptq" or (it > 0 and rate < cfg.min_improvement):
            break
        if float_step(f"float[{it}]") < cfg.min_improvement:
            break
    if gptq_on_init is not None:
        propose("gptq[init]", *gptq_on_init)

    # Polish: exact ±1 descent on q, then the exact float step, until no code moves. Starting it
    # after the alternation reaches lower losses than interleaving it with GPTQ (BENCHMARKS.md).
    # Per-channel, the descent runs on the profiled loss min_{s,z} ℓ (O(1) per move), so (s, z)
    # follow every move; with groups it runs at fixed (s, z).
    if cfg.method == "decoupleq" and cfg.refine_sweeps:
        for r in range(cfg.refine_rounds):
            if cfg.group_size == -1:
                q_new, moves = ops.refine_profiled(run.q, W, Hd, b, cfg.symmetric, cfg.refine_sweeps)
                s_new, z_new = ops.closed_form_scale_zero(q_new, W, Hd, b, -1, cfg.symmetric, run.scale)
                propose(f"refine[{r}]", q_new, s_new, z_new)
            else:
                q_new, moves = ops.refine_integers(run.q, W, run.scale, run.zero, Hd, b, cfg.refine_sweeps)
                propose(f"refine[{r}]", q_new, run.scale, run.zero)
                float_step(f"refit[{r}]")
            if moves == 0:
                break
    return run


def quantize_layer(W: np.ndarray, H: np.ndarray, cfg: QuantConfig | None = None,
                   ops: SolverOps = REFERENCE_OPS) -> QuantResult:
    """Quantize one linear layer W (out, in) under the H-weighted loss; H (in, in) is XᵀX/N.

    Returns a QuantResult with q (uint8), scale and zero (out, n_groups), the loss on H, and the
    objective history on the damped H. With ``cfg.hp_channels = k`` also the fp16 branch
    (hp_index, hp_weight); the history is then that of the quantized part on the Schur-complement
    Hessian (hp_branch.py) and ``objective`` the joint one, history[-1] − λ‖Q_S − W_S‖².
    Raises ValueError for malformed input, an H that is not positive semi-definite, or a layer
    whose numbers do not fit float64 (layer_input.py). ``ops``: see ``SolverOps``.
    """
    return solve_layer(lambda W_, H_, cfg_: solve_checked_layer(W_, H_, cfg_, ops), W, H, cfg)


def solve_checked_layer(W: np.ndarray, H: np.ndarray, cfg: QuantConfig, ops: SolverOps) -> QuantResult:
    """quantize_layer on input that layer_input.solve_layer has validated and scaled; H is a
    fresh symmetrised copy, ours to modify."""
    lam = damping(H, cfg.damp)
    branch = None
    if not cfg.hp_channels:
        # Damp in place: the solve never needs the undamped H, only the final loss on it, which
        # r H rᵀ = r H_d rᵀ − λ‖r‖² gives (one (in, in) array less: 128 MiB at in = 4096).
        H[np.diag_indices_from(H)] += lam
        H_obj = Hd = H
        H = None
    else:
        H_obj = Hd = damp_hessian(H, cfg.damp)
        # The fp16 branch's columns are free: the quantized part is solved on the Schur-complement
        # Hessian (hp_branch.py), and B is its closed-form completion afterwards.
        branch = Branch.prepare(W, H_obj, cfg.hp_channels, cfg.hp_select, cfg.bits, cfg.group_size)
        Hd = branch.hessian
    scale, zero, _ = ops.init_scale_zero(W, Hd, cfg.bits, cfg.group_size, cfg.symmetric, cfg.grid, cfg.max_shrink)
    factor = ops.gptq_factor(Hd, cfg.act_order, cfg.damp) if cfg.method != "rtn" else None
    run = alternate(W, Hd, scale, zero, cfg, factor=factor, ops=ops)
    if cfg.n_starts > 1 and cfg.method != "rtn":
        for k, (s0, z0) in enumerate(ops.placement_starts(W, Hd, cfg.bits, cfg.group_size, cfg.symmetric,
                                                      cfg.n_starts - 1), start=1):
            # Extra starts run GPTQ on the placement grid itself: placements are scored with their
            # refit already (placement_starts), and skipping it keeps the starts diverse.
            other = alternate(W, Hd, s0, z0, cfg, refit_first=False, factor=factor, ops=ops)
            run.offer(f"start[{k}]", other.q, other.scale, other.zero, other.obj)

    objective = float(run.obj.sum())
    hp_index = hp_weight = None
    if branch is None:
        row_loss = undamped_losses(ops.exact_losses(W, run.q, run.scale, run.zero, Hd),
                                   ops.residual_norms(W, run.q, run.scale, run.zero), lam)
    else:
        W_hat = dequantize_parts(run.q, run.scale, run.zero)
        hp_index, hp_weight = branch.index, branch_weight(W, W_hat, H_obj, branch.index)
        W_hat = add_branch(W_hat, hp_index, hp_weight)
        objective = float(ops.row_losses(W, W_hat, H_obj).sum())
        row_loss = ops.row_losses(W, W_hat, H)
    return QuantResult(
        q=run.q.astype(np.uint8),
        scale=run.scale,
        zero=run.zero,
        loss=float(row_loss.sum()),
        row_loss=row_loss,
        objective=objective,
        loss_history=run.history,
        history_steps=run.steps,
        improved_rows=run.improved,
        config=cfg,
        lower_bound=float(row_lower_bound(W, Hd, cfg.bits, cfg.group_size).sum()) if cfg.lower_bound else None,
        hp_index=hp_index,
        hp_weight=hp_weight,
    )

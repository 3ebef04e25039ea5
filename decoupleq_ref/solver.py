"""decoupleQ's layer solver: alternate the integer and float steps, per row keeping only what
lowers the objective.  rtn, gptq and decoupleq share this one code path:

    rtn       = init
    gptq      = init → integer step
    decoupleq = init → float step → (integer step → float step) × iters [→ (refinement → float step) × rounds]

Two additions of this project, both off by default (official behaviour): the refinement
(``refine_sweeps > 0``) and extra starts (``n_starts > 1``): the whole path is run again from
other grid placements and each row keeps its best run.

This is the only copy of the method: every backend runs it, supplying the array work through a
per-layer operations object (layer_ops.LayerOps; docs/ALGORITHM.md §4, "The operations object").
"""

from __future__ import annotations

from typing import Type

import numpy as np

from .bounds import row_lower_bound
from .config import QuantConfig
from .format import QuantResult, dequantize_parts
from .hp_branch import Branch, add_branch, branch_weight
from .init import placement_starts
from .layer_input import solve_layer
from .layer_ops import LayerOps, Proposal, Run
from .objective import damp_hessian, damping, row_losses

#: QuantResult.status: why the solve stopped (SciPy-style; QuantResult.message says it in words).
USED_ALL_ITERATIONS = 0  # the alternation ran every round it was given (rtn: none, gptq: one)
NO_IMPROVEMENT = 1       # a half-step improved fewer than min_improvement of the rows
POLISH_CONVERGED = 2     # the polish stopped: a round moved no code
POLISH_ROUNDS_USED = 3   # the polish ran all refine_rounds rounds and codes still moved


def offer(ops: LayerOps, run: Run, name: str, p: Proposal) -> float:
    """Offer a step's proposal to the incumbent: rows whose objective it lowers take it (the
    losses the step knows, else the residual product). Returns the fraction of rows that did."""
    losses = p.losses if p.losses is not None else ops.proposal_losses(p.q, p.scale, p.zero)
    improved, total = ops.accept(run, p, losses)
    run.history.append(total)
    run.steps.append(name)
    run.improved.append(improved)
    return improved / run.rows


def alternate(ops: LayerOps, scale: np.ndarray, zero: np.ndarray, losses: np.ndarray | None = None,
              refit_first: bool = True) -> Run:
    """The method's whole path from an initial host grid (s, z): RTN, then the steps
    ``cfg.method`` asks for, every array operation through ``ops`` (layer_ops.LayerOps).

    ``losses``: RTN's losses on that grid when the init knows them. ``refit_first``: decoupleq's
    float step before the first integer step (the official start). Sets run.status/message."""
    cfg = ops.cfg
    run = ops.start(scale, zero, losses)
    run.history, run.steps, run.improved = [ops.total(run.obj)], ["init"], [run.rows]

    rounds = {"rtn": 0, "gptq": 1, "decoupleq": cfg.iters}[cfg.method]
    run.status = USED_ALL_ITERATIONS
    run.message = {"rtn": "rtn: round to nearest on the searched grid, no step",
                   "gptq": "gptq: one integer step"}.get(cfg.method, f"decoupleq: used all {rounds} rounds")
    gptq_on_init = None
    if cfg.method == "decoupleq" and refit_first:
        # The official solver's first GPTQ grid is the least-squares (s, z) of the grid-searched RTN
        # codes, not the grid-searched (s, z) itself: on real layers this start is worth 1-6 %.
        # The gptq baseline's result (GPTQ on the searched grid) is kept aside and offered after
        # the alternation, so that decoupleq ≤ gptq holds row by row on the same init.
        gptq_on_init = ops.integer_step(run)
        offer(ops, run, "float[init]", ops.float_step(run))
    for it in range(rounds):
        rate = offer(ops, run, f"integer[{it}]", ops.integer_step(run))
        if cfg.method == "gptq":
            break
        if not (it > 0 and rate < cfg.min_improvement):  # round 0 always gets its float step
            rate = offer(ops, run, f"float[{it}]", ops.float_step(run))
        if rate < cfg.min_improvement:
            run.status = NO_IMPROVEMENT
            run.message = (f"decoupleq: stopped in round {it + 1} of {rounds}: fewer than "
                           f"min_improvement = {cfg.min_improvement:g} of the rows improved")
            break
    if gptq_on_init is not None:
        offer(ops, run, "gptq[init]", gptq_on_init)

    # Polish: exact ±1 descent on q, then the exact float step, until no code moves. Starting it
    # after the alternation reaches lower losses than interleaving it with GPTQ (BENCHMARKS.md).
    # Per-channel, the descent runs on the profiled loss min_{s,z} ℓ (O(1) per move), so (s, z)
    # follow every move; with groups it runs at fixed (s, z).
    if cfg.method == "decoupleq" and cfg.refine_sweeps:
        run.status, polish = POLISH_ROUNDS_USED, f"polish used all {cfg.refine_rounds} rounds"
        for r in range(cfg.refine_rounds):
            if cfg.group_size == -1:
                q_new, moved, moves = ops.refine_profiled(run)
                offer(ops, run, f"refine[{r}]", ops.float_step(run, q_new, moved))
            else:
                p, moves = ops.refine(run)
                offer(ops, run, f"refine[{r}]", p)
                offer(ops, run, f"refit[{r}]", ops.float_step(run))
            if moves == 0:
                run.status, polish = POLISH_CONVERGED, f"polish converged in round {r + 1}: no code moved"
                break
        run.message += f"; {polish}"
    return run


def quantize_layer(W: np.ndarray, H: np.ndarray, cfg: QuantConfig | None = None,
                   backend: Type[LayerOps] = LayerOps) -> QuantResult:
    """Quantize one linear layer W (out, in) under the H-weighted loss; H (in, in) is XᵀX/N.

    Returns a QuantResult with q (uint8), scale and zero (out, n_groups), the loss on H, and the
    objective history on the damped H. With ``cfg.hp_channels = k`` also the fp16 branch
    (hp_index, hp_weight); the history is then that of the quantized part on the Schur-complement
    Hessian (hp_branch.py) and ``objective`` the joint one, history[-1] − λ‖Q_S − W_S‖².
    Raises ValueError for malformed input, an H that is not positive semi-definite, or a layer
    whose numbers do not fit float64 (layer_input.py). ``backend``: the operations class
    (layer_ops.LayerOps, the reference's, by default; kernels_numba and gpu pass their own).
    """
    return solve_layer(lambda W_, H_, cfg_: solve_checked_layer(W_, H_, cfg_, backend), W, H, cfg)


def solve_checked_layer(W: np.ndarray, H: np.ndarray, cfg: QuantConfig, backend: Type[LayerOps]) -> QuantResult:
    """quantize_layer on input that layer_input.solve_layer has validated and scaled; H is a
    fresh symmetrised copy, ours to modify."""
    lam = damping(H, cfg.damp)
    branch = None
    if not cfg.hp_channels and backend.damp_in_place:
        # Damp in place: the solve never needs the undamped H, only the final loss on it, which
        # r H rᵀ = r H_d rᵀ − λ‖r‖² gives (one (in, in) array less: 128 MiB at in = 4096).
        H[np.diag_indices_from(H)] += lam
        H_obj = Hd = H
        H = None
    else:
        H_obj = Hd = damp_hessian(H, cfg.damp)
    if cfg.hp_channels:
        # The fp16 branch's columns are free: the quantized part is solved on the Schur-complement
        # Hessian (hp_branch.py), and B is its closed-form completion afterwards.
        branch = Branch.prepare(W, H_obj, cfg.hp_channels, cfg.hp_select, cfg.bits, cfg.group_size)
        Hd = branch.hessian
    ops = backend(W, Hd, cfg)
    run = alternate(ops, *ops.init())
    if cfg.n_starts > 1 and cfg.method != "rtn":
        for k, (s0, z0) in enumerate(placement_starts(W, Hd, cfg.bits, cfg.group_size, cfg.symmetric,
                                                      cfg.n_starts - 1), start=1):
            # Extra starts run GPTQ on the placement grid itself: placements are scored with their
            # refit already (placement_starts), and skipping it keeps the starts diverse.
            other = alternate(ops, s0, z0, refit_first=False)
            offer(ops, run, f"start[{k}]", Proposal(other.q, other.scale, other.zero, other.obj))
        run.message += f"; best of {cfg.n_starts} starts per row (status: the first start's)"

    q, scale, zero, obj = ops.host(run)
    objective = float(obj.sum())
    hp_index = hp_weight = None
    if branch is None:
        row_loss = ops.reported_losses(q, scale, zero, lam, H)
    else:
        W_hat = dequantize_parts(q, scale, zero)
        hp_index, hp_weight = branch.index, branch_weight(W, W_hat, H_obj, branch.index)
        W_hat = add_branch(W_hat, hp_index, hp_weight)
        objective = float(row_losses(W, W_hat, H_obj).sum())
        row_loss = row_losses(W, W_hat, H)
    return QuantResult(
        q=q.astype(np.uint8),
        scale=scale,
        zero=zero,
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
        status=run.status,
        message=run.message,
    )

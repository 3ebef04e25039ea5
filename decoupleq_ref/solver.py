"""decoupleQ's layer solver: alternate the integer and float steps, per row keeping only what
lowers the objective.  rtn, gptq and decoupleq share this one code path:

    rtn       = init
    gptq      = init → integer step
    decoupleq = init → (integer step → float step) × iters [→ (refinement → float step) × rounds]

The refinement (refine_sweeps > 0) is this project's addition, off by default (official behaviour).
"""

from __future__ import annotations

import numpy as np

from .checks import check_layer
from .config import QuantConfig
from .float_step import closed_form_scale_zero
from .format import QuantResult, dequantize_parts
from .init import init_scale_zero, quantize_rtn
from .integer_step import integer_step
from .objective import damp_hessian, row_losses
from .bounds import row_lower_bound
from .refine import refine_integers


def keep_better(best: np.ndarray, proposal: np.ndarray) -> np.ndarray:
    """Rows where the proposal strictly lowers the objective (ties keep the incumbent)."""
    return proposal < best


def quantize_layer(W: np.ndarray, H: np.ndarray, cfg: QuantConfig | None = None) -> QuantResult:
    """Quantize one linear layer W (out, in) under the H-weighted loss; H (in, in) is XᵀX/N.

    Returns a QuantResult with q (uint8), scale and zero (out, n_groups), the loss on H, and the
    objective history on the damped H. Raises ValueError for malformed input (see checks.py).
    """
    cfg = cfg or QuantConfig()
    W, H = check_layer(W, H, cfg.group_size)
    Hd = damp_hessian(H, cfg.damp)
    b = cfg.bits

    scale, zero, obj = init_scale_zero(W, Hd, b, cfg.group_size, cfg.symmetric, cfg.grid, cfg.max_shrink)
    q = quantize_rtn(W, scale, zero, b)
    history, steps, improved = [float(obj.sum())], ["init"], [W.shape[0]]

    def half_step(name: str, q_new: np.ndarray, s_new: np.ndarray, z_new: np.ndarray) -> float:
        """Rows whose objective the proposal lowers take it; returns the fraction that did."""
        obj_new = row_losses(W, dequantize_parts(q_new, s_new, z_new), Hd)
        better = keep_better(obj, obj_new)
        q[better], scale[better], zero[better], obj[better] = (
            q_new[better], s_new[better], z_new[better], obj_new[better])
        history.append(float(obj.sum()))
        steps.append(name)
        improved.append(int(better.sum()))
        return float(better.mean())

    rounds = {"rtn": 0, "gptq": 1, "decoupleq": cfg.iters}[cfg.method]
    for it in range(rounds):
        q_new = integer_step(W, scale, zero, Hd, b, cfg.act_order, cfg.block_size, cfg.damp,
                             cfg.relax_iters, cfg.relax_lr)
        rate = half_step(f"integer[{it}]", q_new, scale, zero)
        if cfg.method == "gptq":
            break
        if it > 0 and rate < cfg.min_improvement:
            break
        s_new, z_new = closed_form_scale_zero(q, W, Hd, b, cfg.group_size, cfg.symmetric, scale)
        if half_step(f"float[{it}]", q, s_new, z_new) < cfg.min_improvement:
            break

    # Polish (this project's addition): exact ±1 descent on q, then the exact float step, until
    # no code moves. Starting it after the alternation matters: polishing the alternation's
    # final (s, z) reaches lower losses than interleaving it with GPTQ (BENCHMARKS.md).
    if cfg.method == "decoupleq" and cfg.refine_sweeps:
        for r in range(cfg.refine_rounds):
            q_new, moves = refine_integers(q, W, scale, zero, Hd, b, cfg.refine_sweeps)
            half_step(f"refine[{r}]", q_new, scale, zero)
            s_new, z_new = closed_form_scale_zero(q, W, Hd, b, cfg.group_size, cfg.symmetric, scale)
            half_step(f"refit[{r}]", q, s_new, z_new)
            if moves == 0:
                break

    W_hat = dequantize_parts(q, scale, zero)
    row_loss = row_losses(W, W_hat, H)
    return QuantResult(
        q=q.astype(np.uint8),
        scale=scale,
        zero=zero,
        loss=float(row_loss.sum()),
        row_loss=row_loss,
        objective=float(obj.sum()),
        loss_history=history,
        history_steps=steps,
        improved_rows=improved,
        config=cfg,
        lower_bound=float(row_lower_bound(W, Hd, b, cfg.group_size).sum()) if cfg.lower_bound else None,
    )

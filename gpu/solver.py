"""decoupleQ's layer solver on the device (mirrors decoupleq_ref/solver.py step for step).

W, H_d, L = W·H_d, GPTQ's factor and the block sums of H_d go to the device once per layer; the
state (q, s, z, per-row objective) stays there for the whole alternation. Per half-step only two
numbers come back (the objective's sum for ``loss_history`` and the count of improved rows for
the early-exit rule); the result is copied back once at the end. Host glue (input checks,
damping, min-max ranges, shrink factors, extra-start candidates) is the reference's own code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from decoupleq_ref.bounds import row_lower_bound
from decoupleq_ref.config import QuantConfig
from decoupleq_ref.format import QuantResult, dequantize_parts
from decoupleq_ref.hp_branch import Branch, add_branch, branch_weight
from decoupleq_ref.init import placement_starts
from decoupleq_ref.layer_input import solve_layer
from decoupleq_ref.objective import damp_hessian, row_losses

from ._cuda import blocks, cuda, jit, require
from .float_step import FloatStepData, float_step_on_device
from .init import init_on_device, rtn_codes
from .integer_step import GptqFactor, integer_step_on_device
from .linalg import launch_2d, sum_and_count, transpose
from .objective import layer_row_losses
from .refine import refine_integers_on_device, refine_profiled_on_device


@jit
def _better_kernel(obj_new, obj, better):
    """keep_better: a row takes the proposal only if it strictly lowers its objective."""
    i = cuda.grid(1)
    if i < obj.shape[0]:
        better[i] = 1 if obj_new[i] < obj[i] else 0


@jit
def _take_rows_kernel(better, dst, src):
    """dst[i, :] = src[i, :] for the rows flagged in better."""
    j, i = cuda.grid(2)
    if i < dst.shape[0] and j < dst.shape[1] and better[i] != 0:
        dst[i, j] = src[i, j]


def _take_rows(better, dst, src) -> None:
    grid, block = launch_2d(dst.shape)
    _take_rows_kernel[grid, block](better, dst, src)


@dataclass
class DeviceRun:
    """The state of one solve on the device, and its history on the host."""

    q: object
    scale: object
    zero: object
    obj: object
    history: list[float] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    improved: list[int] = field(default_factory=list)

    def offer(self, name: str, q, scale, zero, obj) -> float:
        """Rows whose objective the proposal lowers take it; returns the fraction that did."""
        out = self.obj.shape[0]
        better = cuda.device_array(out, np.int32)
        _better_kernel[blocks(out, 128), 128](obj, self.obj, better)
        if q is not self.q:
            _take_rows(better, self.q, q)
        _take_rows(better, self.scale, scale)
        _take_rows(better, self.zero, zero)
        _take_rows(better, self.obj.reshape(out, 1), obj.reshape(out, 1))
        total, count = sum_and_count(self.obj, better)
        self.history.append(total)
        self.steps.append(name)
        self.improved.append(count)
        return count / out


class LayerOnDevice:
    """One layer's constant data on the device."""

    def __init__(self, W: np.ndarray, Hd: np.ndarray, cfg: QuantConfig):
        self.W, self.Hd, self.cfg = W, Hd, cfg
        self.dW = cuda.to_device(W)
        self.dHd = cuda.to_device(Hd)
        self.float_data = FloatStepData(W, Hd, self.dW, self.dHd, cfg.group_size)
        self.factor = GptqFactor(Hd, cfg.act_order, cfg.damp) if cfg.method != "rtn" else None
        self._profile = None

    def profile_constants(self):
        """(W·H_d)ᵀ, H_d·1 on the device and 1ᵀH_d1: refine_profiled's per-layer constants."""
        if self._profile is None:
            h1 = self.Hd.sum(axis=1)
            self._profile = (transpose(self.float_data.L), cuda.to_device(h1), float(h1.sum()))
        return self._profile

    def objective(self, q, scale, zero):
        return layer_row_losses(self.dW, q, scale, zero, self.dHd)


def alternate(layer: LayerOnDevice, scale: np.ndarray, zero: np.ndarray, refit_first: bool = True) -> DeviceRun:
    """The method's whole path from an initial (s, z), as decoupleq_ref.solver.alternate."""
    cfg, b = layer.cfg, layer.cfg.bits
    s0, z0 = cuda.to_device(np.ascontiguousarray(scale)), cuda.to_device(np.ascontiguousarray(zero))
    q = rtn_codes(layer.dW, s0, z0, b)
    run = DeviceRun(q, s0, z0, layer.objective(q, s0, z0))
    total, _ = sum_and_count(run.obj, run.obj)
    run.history, run.steps, run.improved = [total], ["init"], [layer.W.shape[0]]

    def propose(name: str, q_new, s_new, z_new) -> float:
        return run.offer(name, q_new, s_new, z_new, layer.objective(q_new, s_new, z_new))

    def float_step(name: str) -> float:
        s_new, z_new = float_step_on_device(layer.float_data, run.q, run.scale, b, cfg.group_size, cfg.symmetric)
        return propose(name, run.q, s_new, z_new)

    def integer(s_, z_):
        return integer_step_on_device(layer.dW, s_, z_, layer.dHd, layer.factor, b, cfg.relax_iters, cfg.relax_lr)

    def copy(a):
        c = cuda.device_array_like(a)
        c.copy_to_device(a)
        return c

    rounds = {"rtn": 0, "gptq": 1, "decoupleq": cfg.iters}[cfg.method]
    gptq_on_init = None
    if cfg.method == "decoupleq" and refit_first:
        # the reference's official start: GPTQ on the searched grid is kept aside (offered after
        # the alternation) and the first GPTQ grid is the least-squares refit of the RTN codes
        gptq_on_init = (integer(run.scale, run.zero), copy(run.scale), copy(run.zero))
        float_step("float[init]")
    for it in range(rounds):
        rate = propose(f"integer[{it}]", integer(run.scale, run.zero), run.scale, run.zero)
        if cfg.method == "gptq" or (it > 0 and rate < cfg.min_improvement):
            break
        if float_step(f"float[{it}]") < cfg.min_improvement:
            break
    if gptq_on_init is not None:
        propose("gptq[init]", *gptq_on_init)

    # Polish, as the reference: exact ±1 descent (profiled per-channel, fixed (s, z) with groups),
    # then the exact float step, until no code moves.
    if cfg.method == "decoupleq" and cfg.refine_sweeps:
        for r in range(cfg.refine_rounds):
            if cfg.group_size == -1:
                q_new, moves = refine_profiled_on_device(layer.dW, run.q, layer.dHd, *layer.profile_constants(), b,
                                                         cfg.symmetric, cfg.refine_sweeps)
                s_new, z_new = float_step_on_device(layer.float_data, q_new, run.scale, b, -1, cfg.symmetric)
                propose(f"refine[{r}]", q_new, s_new, z_new)
            else:
                q_new, moves = refine_integers_on_device(layer.dW, run.q, run.scale, run.zero, layer.dHd, b,
                                                         cfg.refine_sweeps)
                propose(f"refine[{r}]", q_new, run.scale, run.zero)
                float_step(f"refit[{r}]")
            if moves == 0:
                break
    return run


def quantize_layer(W: np.ndarray, H: np.ndarray, cfg: QuantConfig | None = None) -> QuantResult:
    """Quantize one linear layer W (out, in) under the H-weighted loss on the GPU.

    Same contract and result as decoupleq_ref.quantize_layer (float64 throughout, so the codes
    agree with the reference's up to rounding-level ties), the polish (``refine_sweeps``) and the
    fp16 branch (``hp_channels``) included. The branch's selection, Schur-complement Hessian and
    closed-form B are the reference's host code (O(out·k·in), once per layer); the device solves
    the quantized part on that Hessian exactly as without a branch."""
    require()
    return solve_layer(solve_checked_layer, W, H, cfg)


def solve_checked_layer(W: np.ndarray, H: np.ndarray, cfg: QuantConfig) -> QuantResult:
    """quantize_layer on input that decoupleq_ref.layer_input.solve_layer (the reference's input
    checks, PSD check and rescaling of extreme magnitudes) has validated and scaled."""
    H_obj = Hd = damp_hessian(H, cfg.damp)
    branch = None
    if cfg.hp_channels:
        branch = Branch.prepare(W, H_obj, cfg.hp_channels, cfg.hp_select, cfg.bits, cfg.group_size)
        Hd = branch.hessian
    layer = LayerOnDevice(W, Hd, cfg)
    (scale, zero), _ = init_on_device(layer.dW, layer.dHd, W, cfg.bits, cfg.group_size, cfg.symmetric,
                                      cfg.grid, cfg.max_shrink)
    run = alternate(layer, scale, zero)
    if cfg.n_starts > 1 and cfg.method != "rtn":
        for k, (s0, z0) in enumerate(placement_starts(W, Hd, cfg.bits, cfg.group_size, cfg.symmetric,
                                                      cfg.n_starts - 1), start=1):
            other = alternate(layer, s0, z0, refit_first=False)
            run.offer(f"start[{k}]", other.q, other.scale, other.zero, other.obj)

    q, scale, zero = run.q.copy_to_host(), run.scale.copy_to_host(), run.zero.copy_to_host()
    objective = float(run.obj.copy_to_host().sum())
    hp_index = hp_weight = None
    if branch is None:
        row_loss = layer_row_losses(layer.dW, run.q, run.scale, run.zero, cuda.to_device(H)).copy_to_host()
    else:
        W_hat = dequantize_parts(q, scale, zero)
        hp_index, hp_weight = branch.index, branch_weight(W, W_hat, H_obj, branch.index)
        W_hat = add_branch(W_hat, hp_index, hp_weight)
        objective = float(row_losses(W, W_hat, H_obj).sum())
        row_loss = row_losses(W, W_hat, H)
    return QuantResult(
        q=q,
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
    )

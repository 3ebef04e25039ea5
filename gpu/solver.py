"""decoupleQ's layer solver on the device: the reference's solver loop (decoupleq_ref.solver)
with the operations object ``CudaOps``.

W, H_d, L = W·H_d, GPTQ's factor and the block sums of H_d go to the device once per layer; the
incumbent (q, s, z, per-row objective) stays there for the whole solve. Per half-step only two
numbers come back (the objective's sum for ``loss_history`` and the count of improved rows for
the early-exit rule); the result is copied back once at the end. Host glue (input checks,
damping, min-max ranges, shrink factors, extra-start candidates, the fp16 branch) is the
reference's own code.
"""

from __future__ import annotations

import numpy as np

from decoupleq_ref.config import QuantConfig
from decoupleq_ref.format import QuantResult
from decoupleq_ref.layer_ops import LayerOps, Proposal, Run
from decoupleq_ref.solver import quantize_layer as reference_quantize_layer

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


def _copy(a):
    c = cuda.device_array_like(a)
    c.copy_to_device(a)
    return c


class CudaOps(LayerOps):
    """The device backend's operations on one layer: every array of a ``Run`` or ``Proposal`` is
    a device array; losses are always the residual product on the device (no step formulas)."""

    damp_in_place = False  # the reported loss is the product on the undamped H, on the device

    def __init__(self, W: np.ndarray, Hd: np.ndarray, cfg: QuantConfig):
        super().__init__(W, Hd, cfg)
        self.dW = cuda.to_device(W)
        self.dHd = cuda.to_device(Hd)
        self.float_data = FloatStepData(W, Hd, self.dW, self.dHd, cfg.group_size)
        self.gptq = GptqFactor(Hd, cfg.act_order, cfg.damp) if cfg.method != "rtn" else None
        self._profile = None

    def profile_constants(self):
        """(W·H_d)ᵀ, H_d·1 on the device and 1ᵀH_d1: refine_profiled's per-layer constants."""
        if self._profile is None:
            h1 = self.Hd.sum(axis=1)
            self._profile = (transpose(self.float_data.L), cuda.to_device(h1), float(h1.sum()))
        return self._profile

    def init(self):
        c = self.cfg
        (scale, zero), _ = init_on_device(self.dW, self.dHd, self.W, c.bits, c.group_size, c.symmetric, c.grid,
                                          c.max_shrink)
        return scale, zero, None

    def start(self, scale, zero, losses=None) -> Run:
        s0, z0 = cuda.to_device(np.ascontiguousarray(scale)), cuda.to_device(np.ascontiguousarray(zero))
        q = rtn_codes(self.dW, s0, z0, self.cfg.bits)
        return Run(q, s0, z0, self.proposal_losses(q, s0, z0))

    def proposal_losses(self, q, scale, zero):
        return layer_row_losses(self.dW, q, scale, zero, self.dHd)

    def float_step(self, run: Run, q=None, moved=None) -> Proposal:
        c = self.cfg
        q = run.q if q is None else q
        s, z = float_step_on_device(self.float_data, q, run.scale, c.bits, c.group_size, c.symmetric)
        return Proposal(q, s, z, fitted=True)

    def integer_step(self, run: Run) -> Proposal:
        c = self.cfg
        q = integer_step_on_device(self.dW, run.scale, run.zero, self.dHd, self.gptq, c.bits, c.relax_iters, c.relax_lr)
        return Proposal(q, _copy(run.scale), _copy(run.zero))

    def refine(self, run: Run) -> tuple[Proposal, int]:
        c = self.cfg
        q, moves = refine_integers_on_device(self.dW, run.q, run.scale, run.zero, self.dHd, c.bits, c.refine_sweeps)
        return Proposal(q, run.scale, run.zero), moves

    def refine_profiled(self, run: Run):
        c = self.cfg
        q, moves = refine_profiled_on_device(self.dW, run.q, self.dHd, *self.profile_constants(), c.bits, c.symmetric,
                                             c.refine_sweeps)
        return q, None, moves

    def accept(self, run: Run, p: Proposal, losses) -> tuple[int, float]:
        out = run.rows
        better = cuda.device_array(out, np.int32)
        _better_kernel[blocks(out, 128), 128](losses, run.obj, better)
        if p.q is not run.q:
            _take_rows(better, run.q, p.q)
        _take_rows(better, run.scale, p.scale)
        _take_rows(better, run.zero, p.zero)
        _take_rows(better, run.obj.reshape(out, 1), losses.reshape(out, 1))
        total, count = sum_and_count(run.obj, better)
        return count, total

    def total(self, obj) -> float:
        return sum_and_count(obj, obj)[0]

    def host(self, run: Run):
        return run.q.copy_to_host(), run.scale.copy_to_host(), run.zero.copy_to_host(), run.obj.copy_to_host()

    def reported_losses(self, q, scale, zero, lam, H):
        return layer_row_losses(self.dW, cuda.to_device(q), cuda.to_device(scale), cuda.to_device(zero),
                                cuda.to_device(H)).copy_to_host()


def quantize_layer(W: np.ndarray, H: np.ndarray, cfg: QuantConfig | None = None) -> QuantResult:
    """Quantize one linear layer W (out, in) under the H-weighted loss on the GPU.

    Same contract and result as decoupleq_ref.quantize_layer (float64 throughout, so the codes
    agree with the reference's up to rounding-level ties), the polish (``refine_sweeps``) and the
    fp16 branch (``hp_channels``) included: the loop is the reference's, the operations
    ``CudaOps``. The branch's selection, Schur-complement Hessian and closed-form B are the
    reference's host code (O(out·k·in), once per layer); the device solves the quantized part on
    that Hessian exactly as without a branch."""
    require()
    return reference_quantize_layer(W, H, cfg, backend=CudaOps)

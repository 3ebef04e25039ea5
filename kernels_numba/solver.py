"""kernels_numba.quantize_layer: the reference's orchestration (decoupleq_ref.solver) driven by
the compiled kernels of this package through its ``SolverOps`` hook.

Every decision (keep-if-better, early exit, gptq[init], refinement rounds, extra starts, the fp16
branch) is the reference's code; only the hot functions are replaced by same-named kernels, so
the backend agrees with the reference by construction up to float rounding in the losses.
"""

from __future__ import annotations

import numpy as np

from decoupleq_ref.config import QuantConfig
from decoupleq_ref.format import QuantResult
from decoupleq_ref.init import placement_starts
from decoupleq_ref.solver import SolverOps
from decoupleq_ref.solver import quantize_layer as _orchestrate

from ._blas import one_blas_thread
from ._compat import require
from ._products import shared_products
from .float_step import closed_form_scale_zero
from .init import init_scale_zero, quantize_rtn
from .integer_step import gptq_factor, integer_step
from .objective import exact_losses, proposal_losses, residual_norms, row_losses
from .refine import refine_integers, refine_profiled

# placement_starts stays the reference's: it ranks 49 grid candidates per row, and candidates
# that give a row the same codes tie to the last bit there; any other rounding of those scores
# (a compiled float step) reorders the ties and sends extra starts elsewhere (measured: 2.5 % of
# the codes differed at n_starts = 3). It runs once per solve, and only with n_starts > 1.
OPS = SolverOps(
    init_scale_zero=init_scale_zero,
    placement_starts=placement_starts,
    quantize_rtn=quantize_rtn,
    proposal_losses=proposal_losses,
    row_losses=row_losses,
    closed_form_scale_zero=closed_form_scale_zero,
    gptq_factor=gptq_factor,
    integer_step=integer_step,
    refine_integers=refine_integers,
    refine_profiled=refine_profiled,
    residual_norms=residual_norms,
    exact_losses=exact_losses,
)


def quantize_layer(W: np.ndarray, H: np.ndarray, cfg: QuantConfig | None = None) -> QuantResult:
    """Quantize one linear layer with the compiled kernels; same signature, config and result
    as decoupleq_ref.quantize_layer (raises ImportError naming the fix when numba is missing)."""
    require()
    with one_blas_thread(), shared_products():
        return _orchestrate(W, H, cfg, ops=OPS)

"""gpu: decoupleQ on CUDA GPUs through Numba CUDA kernels (the reference's functions, same names).

    import gpu
    gpu.available()                 # a real CUDA GPU is usable (False under the simulator)
    res = gpu.quantize_layer(W, H, cfg)      # same contract as decoupleq_ref.quantize_layer
    y = gpu.packed_matmul(x, layer)          # x (batch, in) fp16/fp32 @ Ŵᵀ from a PackedLayer

Kernels run in float64 for the solver (results agree with the reference up to rounding-level
ties) and fp32 accumulation for the matmul. Tests run them in numba's CUDA simulator
(NUMBA_ENABLE_CUDASIM=1), which ``available()`` deliberately ignores.
"""

from ._cuda import available, can_run, simulator
from .float_step import closed_form_scale_zero
from .init import init_scale_zero
from .integer_step import gptq_round, relax_box
from .matmul import DevicePackedLayer, packed_matmul
from .objective import row_losses
from .refine import refine_integers, refine_profiled
from .solver import quantize_layer

__all__ = ["DevicePackedLayer", "available", "can_run", "closed_form_scale_zero", "gptq_round", "init_scale_zero",
           "packed_matmul", "quantize_layer", "refine_integers", "refine_profiled", "relax_box", "row_losses",
           "simulator"]

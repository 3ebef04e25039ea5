"""decoupleq_ref: float64 NumPy/SciPy reference of decoupleQ (arXiv 2404.12759).

    import decoupleq_ref as dq
    res = dq.quantize_layer(W, H, dq.QuantConfig(bits=2, group_size=64))
"""

from .config import METHODS, QuantConfig
from .float_step import closed_form_scale_zero
from .format import QuantResult, dequantize, dequantize_parts, n_groups
from .init import init_scale_zero, minmax_scale_zero, quantize_rtn
from .integer_step import gptq_round, integer_step, relax_box
from .layer_input import HessianNotPSD, project_psd
from .matmul import PackedLayer, matmul
from .objective import damp_hessian, layer_loss, row_losses
from .packing import pack, packed_row_bytes, unpack
from .solver import quantize_layer
from .synthetic import synthetic_layer

__version__ = "0.1.0"

__all__ = [
    "HessianNotPSD", "METHODS", "PackedLayer", "QuantConfig", "QuantResult", "closed_form_scale_zero", "damp_hessian",
    "dequantize", "dequantize_parts", "gptq_round", "init_scale_zero", "integer_step", "layer_loss",
    "matmul", "minmax_scale_zero", "n_groups", "pack", "packed_row_bytes", "project_psd", "quantize_layer",
    "quantize_rtn", "relax_box", "row_losses", "synthetic_layer", "unpack",
]

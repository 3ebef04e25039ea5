"""kernels_numba: the fast CPU backend of decoupleQ (Numba-compiled, float64, same results).

    import kernels_numba as kn
    res = kn.quantize_layer(W, H, dq.QuantConfig(bits=2, group_size=64))   # = decoupleq_ref's
    layer = dq.PackedLayer.from_result(res)
    y = kn.packed_matmul(x.astype(np.float32), layer)                      # x @ Ŵᵀ, float32

Imports without numba (``available()`` is then False and every kernel raises ImportError with
the install command). Kernels are compiled on first call and cached on disk (``cache=True``).
"""

from ._compat import available
from .matmul import dequantize, packed_matmul
from .packing import pack, unpack
from .solver import NumbaOps, quantize_layer

__all__ = ["NumbaOps", "available", "dequantize", "pack", "packed_matmul", "quantize_layer", "unpack"]

"""A packed quantized layer and the reference matmul y = x @ Ŵᵀ (docs/FORMAT.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .checks import as_float_matrix, check_bits, check_group_size
from .format import QuantResult, dequantize_parts, n_groups
from .packing import pack, packed_row_bytes, unpack


@dataclass(frozen=True)
class PackedLayer:
    """Everything a kernel needs: packed codes, per-group scale and zero, the layout.

    packed  uint8 (out, packed_row_bytes(in, bits))
    scale   float32 (out, n_groups)
    zero    float32 (out, n_groups)
    """

    packed: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    bits: int
    group_size: int  # -1 = per-channel
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        out, n_in = self.shape
        check_bits(self.bits)
        check_group_size(self.group_size, n_in)
        G = n_groups(n_in, self.group_size)
        if self.packed.dtype != np.uint8 or self.packed.shape != (out, packed_row_bytes(n_in, self.bits)):
            raise ValueError(f"packed: expected uint8 {(out, packed_row_bytes(n_in, self.bits))}, "
                             f"got {self.packed.dtype} {self.packed.shape}")
        for name in ("scale", "zero"):
            arr = getattr(self, name)
            if arr.shape != (out, G):
                raise ValueError(f"{name}: expected shape {(out, G)} (out, n_groups), got {arr.shape}")

    @classmethod
    def from_result(cls, res: QuantResult, dtype: type = np.float32) -> "PackedLayer":
        return cls(pack(res.q, res.bits), res.scale.astype(dtype), res.zero.astype(dtype),
                   res.bits, res.config.group_size, res.q.shape)

    def codes(self) -> np.ndarray:
        return unpack(self.packed, self.bits, self.shape)

    def dequantize(self) -> np.ndarray:
        """Ŵ in float64 from the stored (possibly float32) scale and zero."""
        return dequantize_parts(self.codes(), self.scale.astype(np.float64), self.zero.astype(np.float64))


def matmul(x: np.ndarray, layer: PackedLayer) -> np.ndarray:
    """y = x @ Ŵᵀ for activations x (batch, in), computed in float64 (the oracle's answer).

    NaN and Inf in x propagate as IEEE arithmetic says (kernels are checked against that)."""
    x = as_float_matrix(x, "x", finite=False)
    if x.shape[1] != layer.shape[1]:
        raise ValueError(f"x: has {x.shape[1]} columns but the layer's input dimension is {layer.shape[1]}")
    return x @ layer.dequantize().T

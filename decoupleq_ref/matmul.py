"""A packed quantized layer and the reference matmul y = x @ Ŵᵀ (docs/FORMAT.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .checks import as_float_matrix, check_bits, check_group_size
from .config import is_int
from .format import QuantResult, dequantize_parts, n_groups
from .packing import pack, packed_row_bytes, unpack


@dataclass(frozen=True)
class PackedLayer:
    """Everything a kernel needs: packed codes, per-group scale and zero, the layout.

    packed     uint8 (out, packed_row_bytes(in, bits))
    scale      float32 (out, n_groups)
    zero       float32 (out, n_groups)
    hp_index   optional int32 (k,) ascending distinct columns of the fp16 branch (hp_branch.py)
    hp_weight  optional float16 (out, k) branch block B; y = x @ (s·q + z)ᵀ + x[:, hp_index] @ Bᵀ
    """

    packed: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    bits: int
    group_size: int  # -1 = per-channel
    shape: tuple[int, int]
    hp_index: np.ndarray | None = None
    hp_weight: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (not isinstance(self.shape, (tuple, list)) or len(self.shape) != 2
                or not all(is_int(d) and d >= 1 for d in self.shape)):
            raise ValueError(f"shape: expected (out, in), two positive integers, got {self.shape!r}")
        for name in ("packed", "scale", "zero", "hp_index", "hp_weight"):
            arr = getattr(self, name)
            if not (arr is None and name.startswith("hp_")) and not isinstance(arr, np.ndarray):
                raise ValueError(f"{name}: expected a numpy array, got {type(arr).__name__}; "
                                 f"convert it with np.asarray(...) and the dtype the field documents")
        out, n_in = self.shape
        check_bits(self.bits)
        check_group_size(self.group_size, n_in)
        G = n_groups(n_in, self.group_size)
        if self.packed.dtype != np.uint8 or self.packed.shape != (out, packed_row_bytes(n_in, self.bits)):
            raise ValueError(f"packed: expected uint8 {(out, packed_row_bytes(n_in, self.bits))}, "
                             f"got {self.packed.dtype} {self.packed.shape}")
        for name in ("scale", "zero"):
            arr = getattr(self, name)
            if arr.shape != (out, G) or arr.dtype.kind != "f":
                raise ValueError(f"{name}: expected a float array of shape {(out, G)} (out, n_groups), "
                                 f"got {arr.dtype} {arr.shape}")
        self._check_branch()

    def _check_branch(self) -> None:
        if (self.hp_index is None) != (self.hp_weight is None):
            raise ValueError("hp_index, hp_weight: give both (the fp16 branch) or neither")
        if self.hp_index is None:
            return
        out, n_in = self.shape
        idx, B = self.hp_index, self.hp_weight
        if idx.ndim != 1 or idx.dtype.kind not in "ui" or len(idx) == 0:
            raise ValueError(f"hp_index: expected a non-empty 1-D integer array, got {idx.dtype} {idx.shape}")
        if idx.min() < 0 or idx.max() >= n_in or np.any(np.diff(idx) <= 0):
            raise ValueError(f"hp_index: must be strictly increasing column indices in [0, {n_in}); "
                             f"sort and deduplicate them (np.unique)")
        if B.shape != (out, len(idx)):
            raise ValueError(f"hp_weight: expected shape {(out, len(idx))} (out, k), got {B.shape}")

    @classmethod
    def from_result(cls, res: QuantResult, dtype: type = np.float32) -> "PackedLayer":
        """Pack a solver result; the fp16 branch, if any, is stored as int32 indices + float16 B."""
        branch = ((res.hp_index.astype(np.int32), res.hp_weight.astype(np.float16))
                  if res.hp_channels else (None, None))
        return cls(pack(res.q, res.bits), res.scale.astype(dtype), res.zero.astype(dtype),
                   res.bits, res.config.group_size, res.q.shape, *branch)

    @property
    def hp_channels(self) -> int:
        return 0 if self.hp_index is None else len(self.hp_index)

    def codes(self) -> np.ndarray:
        return unpack(self.packed, self.bits, self.shape)

    def dequantize_packed(self) -> np.ndarray:
        """The quantized part s·q + z in float64 from the stored (possibly float32) scale and zero."""
        return dequantize_parts(self.codes(), self.scale.astype(np.float64), self.zero.astype(np.float64))

    def dequantize(self) -> np.ndarray:
        """Ŵ in float64: the quantized part plus the fp16 branch on its columns."""
        W_hat = self.dequantize_packed()
        if self.hp_channels:
            W_hat[:, self.hp_index] += self.hp_weight.astype(np.float64)
        return W_hat


def matmul(x: np.ndarray, layer: PackedLayer) -> np.ndarray:
    """y = x @ Ŵᵀ for activations x (batch, in), computed in float64 (the oracle's answer).

    With the fp16 branch: y = x @ (s·q + z)ᵀ + x[:, hp_index] @ Bᵀ, the split kernels compute.

    NaN and Inf in x propagate as IEEE arithmetic says (kernels are checked against that)."""
    x = as_float_matrix(x, "x", finite=False)
    if x.shape[1] != layer.shape[1]:
        raise ValueError(f"x: has {x.shape[1]} columns but the layer's input dimension is {layer.shape[1]}")
    y = x @ layer.dequantize_packed().T
    if layer.hp_channels:
        y += x[:, layer.hp_index] @ layer.hp_weight.astype(np.float64).T
    return y

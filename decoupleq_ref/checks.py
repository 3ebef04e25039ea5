"""Input validation: every public entry point turns bad input into a ValueError that names
the argument and says how to fix it, before any numerical code runs."""

from __future__ import annotations

import numpy as np

from .config import is_int


def is_float_dtype(dtype: np.dtype) -> bool:
    """A NumPy floating dtype, or ml_dtypes' bfloat16 (kind 'V' to NumPy, exact in float32)."""
    return dtype.kind == "f" or dtype.name == "bfloat16"


def as_float_matrix(x: object, name: str, finite: bool = True) -> np.ndarray:
    """Return ``x`` as a non-empty 2-D float64 array (finite unless ``finite=False``) or raise
    ValueError naming it."""
    arr = np.asarray(x)
    if not is_float_dtype(arr.dtype):
        raise ValueError(
            f"{name}: expected a floating-point array, got dtype {arr.dtype}; "
            f"convert it first, e.g. {name}.astype(np.float32)"
        )
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name}: array is empty (shape {arr.shape}); pass a non-empty matrix")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if finite and not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[:3].tolist()
        raise ValueError(f"{name}: contains NaN or Inf (first at index {bad}); clean the input first")
    return arr


def check_layer(W: object, H: object, group_size: int, symmetric_tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Validate a weight ``W`` (out, in) and its Hessian ``H`` (in, in); return W as float64
    (a view when it already is) and a fresh symmetrised float64 copy of H."""
    W = as_float_matrix(W, "W")
    H = as_float_matrix(H, "H")
    if H.shape[0] != H.shape[1]:
        raise ValueError(f"H: must be square (in, in), got shape {H.shape}")
    if H.shape[0] != W.shape[1]:
        raise ValueError(
            f"H: shape {H.shape} does not match W's input dimension {W.shape[1]}; "
            f"H must be (in, in) = ({W.shape[1]}, {W.shape[1]}), e.g. X.T @ X / N"
        )
    scale = max(float(np.abs(H).max()), 1e-300)
    asym = max_asymmetry(H)
    if asym > symmetric_tol * scale:
        raise ValueError(
            f"H: not symmetric (max |H - H.T| = {asym:.3g}, relative {asym / scale:.3g}); "
            f"pass (H + H.T) / 2 if the asymmetry is rounding noise"
        )
    if np.any(np.diag(H) < 0):
        raise ValueError("H: has negative diagonal entries, so it is not positive semi-definite")
    check_group_size(group_size, W.shape[1])
    Hs = H.copy()  # (H + Hᵀ)/2 bit for bit, without (in, in) temporaries besides the result
    if scale < 2.0**1022:
        Hs += H.T
        Hs *= 0.5
    else:  # H + Hᵀ would overflow; halving first gives the same bits (powers of two are exact)
        Hs *= 0.5
        Hs += 0.5 * H.T
    return W, Hs


def max_asymmetry(H: np.ndarray, rows: int = 256) -> float:
    """max |H − Hᵀ|, a block of rows at a time (no (in, in) temporary)."""
    return max(float(np.abs(H[i:i + rows] - H[:, i:i + rows].T).max()) for i in range(0, H.shape[0], rows))


def check_group_size(group_size: int, n_in: int) -> None:
    if not is_int(group_size) or not (group_size == -1 or group_size >= 1):
        raise ValueError(f"group_size: must be -1 (per-channel) or a positive integer (not a bool), "
                         f"got {group_size!r}")
    if group_size != -1 and n_in % group_size != 0:
        divisors = [d for d in (32, 64, 128, 256) if n_in % d == 0]
        raise ValueError(
            f"group_size: {group_size} does not divide the input dimension {n_in} "
            f"(ragged groups are not supported); use -1 (per-channel) or a divisor such as {divisors or [n_in]}"
        )


def check_bits(bits: object) -> int:
    if not is_int(bits) or not 1 <= int(bits) <= 8:
        raise ValueError(f"bits: must be an integer in 1..8, got {bits!r}")
    return int(bits)

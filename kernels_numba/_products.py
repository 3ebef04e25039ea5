"""What the steps of one solve share: W·H, and the losses of proposals the steps already know.

The reference recomputes W·H_d in every float step and in the init, and judges every proposal
with a residual product; inside ``kernels_numba.quantize_layer`` W·H is computed once per (W, H)
pair, and a proposal made by the init, the float step or GPTQ takes the loss that step computed
on the way (docs/ALGORITHM.md §4, "Evaluating a proposal"). Outside a solve (a kernel called on
its own) nothing is cached, so stale values are impossible.
"""

from __future__ import annotations

import hashlib
import threading
from contextlib import contextmanager
from typing import Iterator

import numpy as np

from ._blas import matmul
from ._compat import njit, prange

_LOCAL = threading.local()  # one cache stack per thread: concurrent solves never share entries


def _active() -> list[dict]:
    if not hasattr(_LOCAL, "stack"):
        _LOCAL.stack = []
    return _LOCAL.stack


@contextmanager
def shared_products() -> Iterator[None]:
    """Cache W·H for the duration of one solve (the solver never mutates W or H)."""
    _active().append({})
    try:
        yield
    finally:
        _active().pop()


def wh(W: np.ndarray, H: np.ndarray) -> np.ndarray:
    """W @ H, from the solve's cache when one is active (keyed on the array objects)."""
    stack = _active()
    if not stack:
        return matmul(W, H)
    cache = stack[-1]
    key = (id(W), id(H))
    hit = cache.get(key)
    if hit is None or hit[0] is not W or hit[1] is not H:
        hit = cache[key] = (W, H, matmul(W, H))
    return hit[2]


def wh_row_dots(W: np.ndarray, H: np.ndarray) -> np.ndarray:
    """c_i = W_i H W_iᵀ for every row, from wh (cached for the solve alongside it): the constant
    term of every row's quadratic loss, used by the init's and every float step's loss."""
    stack = _active()
    key = ("rowdots", id(W), id(H))
    hit = stack[-1].get(key) if stack else None
    if hit is None or hit[0] is not W or hit[1] is not H:
        hit = (W, H, np.einsum("ij,ij->i", W, wh(W, H)))
        if stack:
            stack[-1][key] = hit
    return hit[2]


# Proposal losses the steps already know. The float step has the normal equations P θ = y of
# the rows it solved, so ℓ = θᵀPθ − 2θᵀy + w H wᵀ costs O(G²) per row; GPTQ's rounding errors
# e give ℓ = ‖e‖² − λ‖ŵ − w‖² (U H_λ Uᵀ = I for the Cholesky factor U of H_λ⁻¹, H_λ = H + λI).
# Each replaces an (out, in)·(in, in) product in proposal_losses. Entries are keyed on a digest
# of (q, s, z) (the orchestration mutates its incumbent arrays in place, so identity is not
# enough) and on the identity of W and H.

@njit(parallel=True)
def _row_fnv(b):
    """FNV-1a (64-bit) of every row of a 2-D uint8 array, rows in parallel."""
    out = np.empty(b.shape[0], np.uint64)
    for i in prange(b.shape[0]):
        h = np.uint64(14695981039346656037)
        for j in range(b.shape[1]):
            h = (h ^ np.uint64(b[i, j])) * np.uint64(1099511628211)
        out[i] = h
    return out


def _digest(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> bytes:
    """Digest of the values of (q, s, z): the large codes array through a compiled per-row hash
    (blake2b over 16 MiB of codes cost 0.4 s per 4096² solve), the rest through blake2b."""
    h = hashlib.blake2b(digest_size=16)
    for a in (q, scale, zero):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        if a.ndim == 2 and a.size >= 1 << 16:
            h.update(row_fingerprints(a).tobytes())
        elif a.size:
            h.update(a.view(np.uint8).reshape(-1))
    return h.digest()


def in_solve() -> bool:
    """True inside kernels_numba.quantize_layer (shared_products active): losses are worth keeping."""
    return bool(_active())


def remember_losses(W: np.ndarray, H: np.ndarray, q: np.ndarray, scale: np.ndarray, zero: np.ndarray,
                    losses: np.ndarray, size: np.ndarray) -> None:
    """Record ℓ(q, s, z) on (W, H) for proposal_losses later in this solve (no-op outside one).
    ``size``: per row, the magnitude of the terms ℓ was computed from (its rounding error is a few
    ulps of it); rows with ℓ below RELIABLE·size are recomputed by proposal_losses."""
    stack = _active()
    if stack:
        stack[-1].setdefault("losses", {})[_digest(q, scale, zero)] = (W, H, losses, size)


#: A formula loss counts only where it is this large relative to the terms it came from: below,
#: cancellation leaves mostly rounding (constant or exactly representable rows, ℓ ≈ 0), and the
#: comparison with the incumbent would be decided by noise; such rows get the residual product.
RELIABLE = 1e-9


def recall_losses(W: np.ndarray, H: np.ndarray, q: np.ndarray, scale: np.ndarray,
                  zero: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(ℓ, rows to recompute) recorded by remember_losses for exactly these (W, H, q, s, z)
    values, else None."""
    stack = _active()
    if not stack or "losses" not in stack[-1]:
        return None
    entry = stack[-1]["losses"].get(_digest(q, scale, zero))
    if entry is None or entry[0] is not W or entry[1] is not H:
        return None
    losses, size = entry[2], entry[3]
    return losses.copy(), np.nonzero(~(losses > RELIABLE * size))[0]


def remember_shift(U: np.ndarray, shift: float) -> None:
    """Record the λ that GPTQ's factor U = chol((H + λI)⁻¹) was built with (for gptq_losses)."""
    stack = _active()
    if stack:
        stack[-1]["shift"] = (U, shift)


def recall_shift(U: np.ndarray) -> float | None:
    """λ of this factor when it was built in the current solve, else None."""
    stack = _active()
    entry = stack[-1].get("shift") if stack else None
    return entry[1] if entry is not None and entry[0] is U else None


def row_fingerprints(q: np.ndarray) -> np.ndarray:
    """A 64-bit hash of every row of the codes (compiled FNV-1a over the row's bytes)."""
    q = np.ascontiguousarray(q)
    return _row_fnv(q.view(np.uint8).reshape(q.shape[0], -1))


def remember_float_step(W: np.ndarray, H: np.ndarray, key: tuple, rows: dict) -> None:
    """Keep the last float step's per-row results (row fingerprints, s, z, ℓ) for this solve."""
    stack = _active()
    if stack:
        stack[-1]["float_step"] = (W, H, key, rows)


def recall_float_step(W: np.ndarray, H: np.ndarray, key: tuple) -> dict | None:
    """The last float step's per-row results on the same (W, H) and settings, else None."""
    stack = _active()
    entry = stack[-1].get("float_step") if stack else None
    if entry is None or entry[0] is not W or entry[1] is not H or entry[2] != key:
        return None
    return entry[3]

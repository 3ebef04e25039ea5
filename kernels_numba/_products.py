"""W·H, shared by the steps of one solve.

The reference recomputes W·H_d in every float step and in the init; inside
``kernels_numba.quantize_layer`` it is computed once per (W, H) pair and reused. Outside a solve
(a kernel called on its own) nothing is cached, so stale products are impossible.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import numpy as np

from ._blas import matmul

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

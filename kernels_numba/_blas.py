"""BLAS without oversubscription.

NumPy's OpenBLAS and Numba's OpenMP pool each keep a thread per core that spins after use; on a
small machine alternating the two makes each wait for the other's spinning threads (measured on
2 cores: a 64×128 solve 0.8 s → 0.1 s, 576×1536 2× faster, once BLAS is single-threaded). So a
solve runs BLAS single-threaded (``one_blas_thread``) and gets its parallelism from Numba's pool:
``matmul`` splits the rows of A over the pool, one single-threaded BLAS product per thread.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import numpy as np

from ._compat import HAVE_NUMBA, get_num_threads, njit, prange

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # optional: without it BLAS keeps its own threads (correct, slower)
    threadpool_limits = None

__all__ = ["all_blas_threads", "matmul", "one_blas_thread"]


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Limit every loaded BLAS to one thread for the duration of the block."""
    with threadpool_limits(1, user_api="blas") if threadpool_limits is not None else nullcontext():
        yield


@contextmanager
def all_blas_threads() -> Iterator[None]:
    """Give BLAS/LAPACK one thread per Numba thread again inside a one_blas_thread block, for a
    call with no Numba kernel beside it (the O(in³) factorisation: LAPACK's own threading is the
    only parallelism it has)."""
    with threadpool_limits(get_num_threads(), user_api="blas") if threadpool_limits is not None else nullcontext():
        yield


@njit(parallel=True)
def _matmul_rows(A, B, C, parts):
    m = A.shape[0]
    for p in prange(parts):
        r0 = p * m // parts
        r1 = (p + 1) * m // parts
        if r1 > r0:
            C[r0:r1] = np.dot(A[r0:r1], B)


def matmul(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """A @ B (float64, 2-D) with A's rows split over the Numba threads."""
    A = np.ascontiguousarray(A, dtype=np.float64)
    B = np.ascontiguousarray(B, dtype=np.float64)
    if not HAVE_NUMBA or A.shape[0] < 64:
        return A @ B
    C = np.empty((A.shape[0], B.shape[1]))
    _matmul_rows(A, B, C, min(get_num_threads() * 2, A.shape[0] // 32))
    return C

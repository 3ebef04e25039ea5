"""The precision model of check_kernel: how far a *correct* packed matmul may be from x @ Ŵᵀ.

A correct kernel, per activation dtype d (unit roundoff u_d: fp32 2⁻²⁴, fp16 2⁻¹¹, bf16 2⁻⁸):

1. receives x already in d (the reference uses exactly those values, so x adds no error);
2. forms each weight from the stored float32 scale and zero, in fp32 or wider (Ŵ exact up to
   2·u32·M, M = |s|·q + |z|), and may round it to d — or form it in d's arithmetic, the scale
   and zero rounded to d first: |w − Ŵ| ≤ u_d·(M + |Ŵ|) per weight;
3. accumulates the products in fp32 or wider, in any order (blocked, split-K, factored
   s·Σx·q + z·Σx);
4. rounds the output once (to d, or not at all).

Error of one output (b, i), with the probes' zero-mean random activations:

    |y − y_ref| ≤ 10·u_d·|y_ref|                              output rounding (≤ u_d·|y|), 10× margin
               + 4·u_d·sqrt(Σ_j x_j²·(M_ij + |Ŵ_ij|)²)        weight rounding, step 2: a sum of
                                                              zero-mean terms, 4 standard deviations
               + (2 + 6·√n)·u32·Σ_j |x_j|·M_ij               fp32 forming of Ŵ (2·u32·M) and the
                                                              probabilistic fp32 accumulation bound
                                                              λ·√n·u (Higham & Mary 2019), λ = 6
               + the smallest subnormal of d                  underflow of the output

where the distance is the smaller one to two references in float64: y_ref = x @ Ŵᵀ and
y_ref_d = x @ fl_d(fl32(Ŵ))ᵀ (Ŵ formed in fp32 and rounded to d, as step 2 most often does), so
that a kernel rounding Ŵ to d is held to its output rounding only. Accumulating in d itself is
outside the model: its error grows like u_d·sqrt(n)·|y| and fails from a few hundred columns
(docs/VALIDATION.md has the measured margins).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
SMALLEST_SUBNORMAL = {"float32": 2.0 ** -149, "float16": 2.0 ** -24, "bfloat16": 2.0 ** -133}
OUTPUT_MARGIN = 10.0      # × the output rounding u_d·|y|
WEIGHT_SIGMAS = 4.0       # standard deviations of the weight-rounding sum
ACCUMULATION_LAMBDA = 6.0  # λ of the probabilistic fp32 accumulation bound λ·√n·u32


def round_to(a: np.ndarray, dtype: str) -> np.ndarray:
    """a rounded to dtype (round to nearest even), back in float64; bfloat16 through ml_dtypes."""
    if dtype == "float32":
        return a.astype(np.float32).astype(np.float64)
    if dtype == "float16":
        return a.astype(np.float16).astype(np.float64)
    import ml_dtypes

    return a.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


@dataclass
class Expected:
    """What a correct kernel applies: W = Ŵ (out, in) float64 from the stored scale/zero (+ the
    fp16 branch), M = |s|·q + |z| (+ |B|), and per dtype the weight formed in fp32 and rounded."""

    W: np.ndarray
    M: np.ndarray
    W_fp32: np.ndarray  # Ŵ formed in float32 arithmetic (s·q then + z), the branch added in float64
    branch_cols: np.ndarray | None = None
    branch: np.ndarray | None = None
    _rounded: dict | None = None
    _weight_sq: np.ndarray | None = None

    @property
    def weight_sq(self) -> np.ndarray:
        """(M + |Ŵ|)²: the squared per-weight rounding allowance / u_d."""
        if self._weight_sq is None:
            self._weight_sq = (self.M + np.abs(self.W)) ** 2
        return self._weight_sq

    def rounded(self, dtype: str) -> np.ndarray:
        """fl_d(fl32(Ŵ)) (+ fl_d(B) on the branch columns): the second reference's weight."""
        if self._rounded is None:
            self._rounded = {}
        if dtype not in self._rounded:
            Wd = round_to(self.W_fp32, dtype)
            if self.branch is not None:
                Wd[:, self.branch_cols] += round_to(self.branch, dtype)
            self._rounded[dtype] = Wd
        return self._rounded[dtype]


def error_bound(xv: np.ndarray, exp: Expected, dtype: str, y_ref: np.ndarray) -> np.ndarray:
    """Per-output bound (batch, out) of |y − y_ref| for a correct kernel (the module doc)."""
    u, u32 = UNIT_ROUNDOFF[dtype], UNIT_ROUNDOFF["float32"]
    n = xv.shape[1]
    with np.errstate(invalid="ignore", over="ignore"):
        weight = np.sqrt((xv * xv) @ exp.weight_sq.T)
        accum = np.abs(xv) @ exp.M.T
        return (OUTPUT_MARGIN * u * np.abs(y_ref) + WEIGHT_SIGMAS * u * weight
                + (2 + ACCUMULATION_LAMBDA * np.sqrt(n)) * u32 * accum + SMALLEST_SUBNORMAL[dtype])


def entry_bound(W: np.ndarray, M: np.ndarray, dtype: str) -> np.ndarray:
    """The bound for one weight entry, as measured by a one-hot input (x = e_j, so y = Ŵ_ij):
    error_bound with a single unit term."""
    u, u32 = UNIT_ROUNDOFF[dtype], UNIT_ROUNDOFF["float32"]
    return (OUTPUT_MARGIN * u * np.abs(W) + WEIGHT_SIGMAS * u * (M + np.abs(W))
            + (2 + ACCUMULATION_LAMBDA) * u32 * M + SMALLEST_SUBNORMAL[dtype])


def output_error(y: np.ndarray, xv: np.ndarray, exp: Expected, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(|y − reference|, y_ref): the distance to the nearer of x @ Ŵᵀ and x @ fl_d(fl32(Ŵ))ᵀ."""
    with np.errstate(invalid="ignore", over="ignore"):
        y_ref = xv @ exp.W.T
        err = np.abs(y - y_ref)
        if dtype != "float32":
            err = np.fmin(err, np.abs(y - xv @ exp.rounded(dtype).T))
    return err, y_ref

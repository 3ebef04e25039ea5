"""Why a packed kernel is wrong: the catalogue of named mistakes, tried against what it computed.

Two kinds of evidence:

* the effective weight Ŵ' (out, in), measured with one-hot inputs (y(e_j) = Ŵ'[:, j]): every
  mistake of validate.layout / validate.layout_maps is a Ŵ' candidate, and a general detector
  names any permutation of the output rows;
* the failing probe itself (x, y) for mistakes on the activation side, which a one-hot probe
  cannot see or would misread: x read column-major when batch > 1, the first batch row used for
  every row.

A mistake is named only when it reproduces *every* entry within the precision model
(validate.kernel_precision). When none does, the report says so plainly and prints where the
output is wrong (output rows, input column ranges, batch rows) — it never guesses the closest.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from decoupleq_ref.format import effective_group_size
from decoupleq_ref.matmul import PackedLayer

from .kernel_precision import Expected, entry_bound, error_bound
from .layout import layout_mistakes
from .layout_maps import output_permutations
from .report import HINT, INFO, Report, list_groups

MAX_RANGES = 8


def ranges(idx: Iterable[int], limit: int = MAX_RANGES) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8' (the first ``limit`` runs, then how many in all)."""
    idx = sorted({int(i) for i in idx})
    runs: list[list[int]] = []
    for i in idx:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:limit])
    if len(runs) > limit:
        text += f", ... ({len(idx)} in all)"
    return text or "none"


def _matches(W_eff: np.ndarray, W_c: np.ndarray, exp: Expected, dtype: str) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        tol = entry_bound(np.maximum(np.abs(W_c), np.abs(exp.W)), exp.M + np.abs(W_c), dtype)
        return np.abs(W_eff - W_c) <= tol


def _row_permutation(W_eff: np.ndarray, exp: Expected, dtype: str, wrong_rows: list[int],
                     block: int = 256) -> np.ndarray | None:
    """p with W_eff[i] = Ŵ[p(i)] on every row, when the output rows are a permutation of Ŵ's
    (nearest row by one matrix product per block of wrong rows; stops at the first block with a
    row that matches no row of Ŵ)."""
    out = W_eff.shape[0]
    p = np.arange(out)
    norms = (exp.W ** 2).sum(axis=1)
    for b0 in range(0, len(wrong_rows), block):
        rows = np.asarray(wrong_rows[b0:b0 + block])
        with np.errstate(invalid="ignore", over="ignore"):
            nearest = np.argmin(norms[None, :] - 2 * W_eff[rows] @ exp.W.T, axis=1)
        cand = Expected(exp.W[nearest], exp.M[nearest], exp.W_fp32[nearest])
        if not _matches(W_eff[rows], cand.W, cand, dtype).all():
            return None
        p[rows] = nearest
    return p if len(set(p.tolist())) == out else None


def _describe_permutation(p: np.ndarray) -> str:
    for desc, cand in output_permutations(len(p)):
        if np.array_equal(cand, p):
            return desc
    moved = np.nonzero(p != np.arange(len(p)))[0]
    pairs = ", ".join(f"{int(i)}<-{int(p[i])}" for i in moved[:MAX_RANGES])
    more = f", ... ({len(moved)} moved)" if len(moved) > MAX_RANGES else ""
    return f"output rows permuted: channel<-row {pairs}{more}"


def diagnose_weight(rep: Report, W_eff: np.ndarray, layer: PackedLayer, exp: Expected, dtype: str,
                    dense: np.ndarray | None = None) -> list[str] | None:
    """Locate the entries where W_eff differs from Ŵ and name the mistake that explains them all;
    None when W_eff is Ŵ (the weights are read right)."""
    out, n_in = layer.shape
    g = effective_group_size(n_in, layer.group_size)
    wrong = ~_matches(W_eff, exp.W, exp, dtype)
    if not wrong.any():
        return None
    rows = np.nonzero(wrong.any(axis=1))[0].tolist()
    cols = np.nonzero(wrong.any(axis=0))[0].tolist()
    pairs = sorted({(int(r), int(c) // g) for r, c in zip(*np.nonzero(wrong))})
    rep.add("kernel.locate", INFO, f"effective weight differs from Ŵ at {int(wrong.sum())} of {wrong.size} entries: "
            f"output channels {ranges(rows)}; input columns {ranges(cols)} ({len(cols)} of {n_in}); "
            f"{list_groups(pairs)}", rows=rows, groups=pairs)
    named: list[str] = []
    probe = tuple(a[:: max(1, a.size // 512)] for a in np.nonzero(wrong))  # quick rejection on a sample
    sample = Expected(exp.W[probe], exp.M[probe], exp.W_fp32[probe])
    for m in layout_mistakes(layer, dense):
        if m.name in named or not _matches(W_eff[probe], m.W[probe], sample, dtype).all():
            continue
        if _matches(W_eff, m.W, exp, dtype).all():
            named.append(m.name)
            rep.add(f"defect.{m.name}", HINT, m.description, rows=rows, groups=pairs)
    if "output_rows_permuted" not in named:
        p = _row_permutation(W_eff, exp, dtype, rows)
        if p is not None:
            named.append("output_rows_permuted")
            rep.add("defect.output_rows_permuted", HINT, _describe_permutation(p), rows=rows)
    if not named:
        rep.add("kernel.diagnosis", INFO, "no mistake in the catalogue explains the effective weight; where it is "
                f"wrong: output channels {ranges(rows)}, input columns {ranges(cols)}, (row, group) pairs "
                f"{len(pairs)} of {out * (n_in // g)}")
    elif len(named) > 1:
        rep.add("kernel.diagnosis", INFO, f"{len(named)} mistakes give identical weights on this layer "
                f"({', '.join(named)}): a layer with more groups, rows or columns separates them")
    return named


def input_mistakes(xv: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
    """(name, description, the activations x' (batch, in) the kernel effectively uses) for the
    activation-side mistakes on x (batch, in); none at batch 1, where they cannot show."""
    b, n = xv.shape
    if b < 2:
        return []
    return [("batch_layout", "activations are read column-major when batch > 1 (x[r, j] taken from offset "
             "r + j*batch of the row-major (batch, in) buffer)", xv.reshape(-1).reshape(n, b).T),
            ("batch_row_broadcast", "the first batch row's output is used for every row (a batch-1 path "
             "applied to a batch)", np.repeat(xv[:1], b, axis=0))]


def diagnose_input(rep: Report, xv: np.ndarray, y: np.ndarray, exp: Expected, dtype: str) -> list[str]:
    """Name an activation-side mistake that reproduces the failing probe's every output."""
    named = []
    for name, desc, x_c in input_mistakes(xv):
        with np.errstate(invalid="ignore", over="ignore"):
            y_c = x_c @ exp.W.T
            ok = np.abs(y - y_c) <= error_bound(x_c, exp, dtype, y_c)
        if ok.all():
            named.append(name)
            rep.add(f"defect.{name}", HINT, desc)
    return named


def locate_batch_rows(rep: Report, bad: np.ndarray) -> None:
    """The failing probe's pattern when the weights are read right (the one-hot probe matches Ŵ,
    or some batch rows of the probe are right): which batch rows and output channels."""
    brows = np.nonzero(bad.any(axis=1))[0].tolist()
    orows = np.nonzero(bad.any(axis=0))[0].tolist()
    rep.add("kernel.diagnosis", INFO, "the weights are read right (the one-hot probe, or the other batch rows, "
            "match Ŵ); no mistake in the catalogue explains the failing batch: wrong in batch rows "
            f"{ranges(brows)} of {bad.shape[0]}, "
            f"output channels {ranges(orows)} (input dependent: batch size, magnitude or NaN/Inf handling)")

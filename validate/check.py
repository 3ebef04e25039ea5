"""check_result: is one implementation's (q, scale, zero) for one layer right?

Checks, in order (docs/VALIDATION.md has the tolerance policy and why):

1. structure (exact): q present, shape (out, in), integer dtype, 0 ≤ q ≤ 2^b − 1; scale and
   zero (out, G) floating-point and finite; symmetric: zero = −scale·2^(b−1).
2. claimed numbers: ``loss`` / ``row_loss`` / ``objective`` returned by the implementation
   must equal the ones recomputed from (q, scale, zero).
3. vs the reference: the objective (loss on the damped H the solver minimises) must be at most
   (1 + rtol) × the reference solver's on the same input and config, in total and averaged
   over rows with each row normalised by its energy W_i H_d W_iᵀ (so rows of tiny magnitude
   count); rtol = 1e-6 at level "reference", 0.5 at level "quality" (and ≤ 1.05× in geometric
   mean over a suite, SUITE_LEVELS).
4. vs the global optimum (tiny per-channel layers): no row's objective may be below the exact
   optimum; a loss below it proves a structural bug (e.g. more than 2^b levels).

When something fails, a diagnosis tries the usual convention mistakes (scale/zero swapped,
signed codes, zero-point, transposed, negated zero, reciprocal scale) and names, as a hint
``defect.<name>``, each one whose repair brings the objective within 5 % of the reference's or
removes at least 90 % of its excess over the reference (a weaker solver with a convention
mistake: the repair explains most of the gap, the solver the rest).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

import numpy as np

from decoupleq_ref import quantize_layer
from decoupleq_ref.checks import check_layer
from decoupleq_ref.config import QuantConfig
from decoupleq_ref.format import dequantize_parts, n_groups
from decoupleq_ref.objective import damp_hessian, row_losses

from .adapters import branch_of, result_mapping, to_native, w_hat
from .exact import global_optimum
from .policy import Policy
from .report import FAIL, HINT, INFO, PASS, SKIP, Report, list_groups, list_rows, nonzero_rows

DIAGNOSIS_RTOL = 0.05  # a repaired result "explains" a failure when within 5 % of the reference,
DIAGNOSIS_GAP = 0.1    # or when its excess over the reference is at most this share of the unrepaired one
TINY_ENUMERATION = 1 << 16  # global optimum computed automatically when (2^b)^in ≤ this


def as_config(cfg: QuantConfig | Mapping[str, Any] | None) -> QuantConfig:
    if cfg is None:
        return QuantConfig()
    return cfg if isinstance(cfg, QuantConfig) else QuantConfig.from_dict(dict(cfg))


@dataclass
class _Ctx:
    W: np.ndarray
    H: np.ndarray
    Hd: np.ndarray
    cfg: QuantConfig
    pol: Policy
    row_energy: np.ndarray  # W_i Hd W_iᵀ
    norm: np.ndarray        # per-row normaliser (energy, or the mean energy for zero rows)
    u: float                # unit roundoff of the returned scale/zero
    branch: tuple[np.ndarray, np.ndarray] | None = None  # the result's fp16 branch (idx, B)

    def w_hat(self, q: np.ndarray, s: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Ŵ = s·q + z plus the result's fp16 branch on its columns."""
        return w_hat({"q": q, "scale": s, "zero": z}, self.branch)

    @property
    def energy(self) -> float:
        return float(self.row_energy.sum())

    def slack_rows(self, obj_rows: np.ndarray) -> np.ndarray:
        """Absolute per-row slack: energy_atol·norm + storage noise."""
        noise = 2 * self.pol.storage_ulps * self.u * np.sqrt(np.maximum(obj_rows, 0) * self.norm)
        return self.pol.energy_atol * self.norm + noise


def _float_arrays(q: np.ndarray, s: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return q.astype(np.float64), s.astype(np.float64), z.astype(np.float64)


def _structure(rep: Report, ctx: _Ctx, r: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Exact structural checks; returns float64 (q, s, z) if the loss can be computed."""
    W, cfg = ctx.W, ctx.cfg
    out, n_in = W.shape
    G = n_groups(n_in, cfg.group_size)
    b, maxq = cfg.bits, cfg.maxq
    computable = True

    missing = [k for k in ("q", "scale", "zero") if not isinstance(r.get(k), np.ndarray)]
    if missing:
        rep.add("structure.keys", FAIL, f"result lacks {missing}; it needs q, scale and zero "
                f"(got keys {sorted(r)})")
        return None
    rep.add("structure.keys", PASS, "q, scale, zero present")
    q, s, z = r["q"], r["scale"], r["zero"]

    # --- q: shape, dtype, range
    if q.shape != W.shape:
        hint = " (it is W's shape transposed: return q as (out, in))" if q.shape == W.shape[::-1] else ""
        rep.add("structure.q_shape", FAIL, f"q has shape {q.shape}, expected {W.shape} = (out, in){hint}")
        if hint:
            rep.add("defect.transposed_codes", HINT, "q is (in, out): transpose it to (out, in)")
        computable = False
    else:
        rep.add("structure.q_shape", PASS, f"q {q.shape}")
    if q.dtype.kind not in "iu":
        rep.add("structure.q_dtype", FAIL, f"q has dtype {q.dtype}; codes must be an integer dtype "
                "(uint8 in this project)")
        if not (q.dtype.kind == "f" and q.size and np.all(np.isfinite(q)) and np.all(q == np.round(q))):
            computable = False  # integral floats: the loss is still meaningful, so go on
    else:
        rep.add("structure.q_dtype", PASS, f"q dtype {q.dtype}")
    if q.shape == W.shape and q.dtype.kind in "iuf" and q.size:
        qi = q.astype(np.float64)
        bad = (qi < 0) | (qi > maxq) | ~np.isfinite(qi)
        if bad.any():
            lo, hi = float(np.nanmin(qi)), float(np.nanmax(qi))
            rows = nonzero_rows(bad)
            rep.add("structure.q_range", FAIL,
                    f"{int(bad.sum())} codes outside [0, {maxq}] = [0, 2^{b}-1] (observed min {lo:g}, max {hi:g}) "
                    f"in {list_rows(rows)}", rows=rows, value=hi, limit=float(maxq))
            _range_hints(rep, lo, hi, b, q.dtype)
        else:
            rep.add("structure.q_range", PASS, f"codes in [0, {maxq}]")

    # --- scale / zero: shape, dtype, finiteness
    for name, arr in (("scale", s), ("zero", z)):
        if arr.shape != (out, G):
            why = ""
            if arr.shape == (G, out) and G != out:
                why = " (it is (G, out): transposed)"
            elif arr.ndim == 2 and arr.shape[0] == out:
                why = (f" ({arr.shape[1]} groups per row; group_size={cfg.group_size} on in={n_in} "
                       f"needs {G})")
            elif arr.ndim == 1 and arr.shape[0] == out and G == 1:
                why = " (1-D: return it as (out, 1))"
            rep.add(f"structure.{name}_shape", FAIL, f"{name} has shape {arr.shape}, expected "
                    f"{(out, G)} = (out, n_groups){why}")
            if "transposed" in why:
                rep.add("defect.transposed_scale_zero", HINT, f"{name} is stored (G, out): use "
                        "--convention transposed, or return (out, G)")
            computable = False
        else:
            rep.add(f"structure.{name}_shape", PASS, f"{name} {arr.shape}")
        if arr.dtype.kind != "f":
            rep.add(f"structure.{name}_dtype", FAIL, f"{name} has dtype {arr.dtype}; expected a floating-point dtype")
            if name == "zero" and arr.dtype.kind in "iu":
                rep.add("defect.zero_point", HINT, "zero is an integer array: it looks like a GPTQ-style "
                        "zero-point (W_hat = s*(q - zp)); use --convention zero_point")
            if arr.dtype.kind not in "iu":
                computable = False
        else:
            rep.add(f"structure.{name}_dtype", PASS, f"{name} dtype {arr.dtype}")
    if computable:
        bad = ~np.isfinite(s.astype(np.float64)) | ~np.isfinite(z.astype(np.float64))
        if bad.any():
            pairs = list(zip(*np.nonzero(bad)))
            rep.add("structure.finite", FAIL, f"scale or zero is NaN/Inf at {list_groups(pairs)}",
                    rows=nonzero_rows(bad), groups=pairs)
            computable = False
        else:
            rep.add("structure.finite", PASS, "scale and zero finite")
    if computable and cfg.symmetric:
        sf, zf = s.astype(np.float64), z.astype(np.float64)
        half = float(1 << (b - 1))
        dev = np.abs(zf + sf * half)
        bad = dev > ctx.pol.symmetric_rtol * np.abs(sf) * half + 1e-300
        if bad.any():
            pairs = list(zip(*np.nonzero(bad)))
            rep.add("structure.symmetric_zero", FAIL,
                    f"symmetric config but zero != -scale*2^{b - 1} at {list_groups(pairs)}",
                    rows=nonzero_rows(bad), groups=pairs)
        else:
            rep.add("structure.symmetric_zero", PASS, f"zero = -scale*2^{b - 1}")
    computable = _branch_structure(rep, ctx, r) and computable
    if not computable:
        return None
    return _float_arrays(q, s, z)


def _branch_structure(rep: Report, ctx: _Ctx, r: dict[str, Any]) -> bool:
    """The optional fp16 branch (docs/FORMAT.md): both fields or neither, k = cfg.hp_channels,
    strictly increasing columns, B (out, k) finite. Sets ctx.branch; False if malformed."""
    k = ctx.cfg.hp_channels
    has_idx, has_B = r.get("hp_index") is not None, r.get("hp_weight") is not None
    if not has_idx and not has_B:
        if k:
            rep.add("structure.hp_branch", FAIL, f"config asks hp_channels={k} but the result has no fp16 "
                    "branch (hp_index, hp_weight)")
        return True
    if has_idx != has_B:
        rep.add("structure.hp_branch", FAIL, "the result has only one of hp_index / hp_weight; the fp16 "
                "branch needs both")
        return False
    idx, B = np.asarray(r["hp_index"]), np.asarray(r["hp_weight"])
    out, n_in = ctx.W.shape
    problems = []
    if idx.ndim != 1 or idx.dtype.kind not in "iu":
        problems.append(f"hp_index must be a 1-D integer array, got {idx.dtype} {idx.shape}")
    elif idx.size and (idx.min() < 0 or idx.max() >= n_in or np.any(np.diff(idx) <= 0)):
        problems.append(f"hp_index must be strictly increasing columns in [0, {n_in})")
    elif len(idx) != k:
        problems.append(f"hp_index has {len(idx)} columns but the config asks hp_channels={k}")
    if B.shape != (out, idx.size) or B.dtype.kind != "f":
        problems.append(f"hp_weight must be floating-point {(out, idx.size)} = (out, k), got {B.dtype} {B.shape}")
    elif not np.all(np.isfinite(B)):
        rows = nonzero_rows(~np.isfinite(B))
        problems.append(f"hp_weight is NaN/Inf in {list_rows(rows)}")
    if problems:
        rep.add("structure.hp_branch", FAIL, "; ".join(problems))
        return False
    ctx.branch = branch_of(r)
    rep.add("structure.hp_branch", PASS, f"fp16 branch on {k} columns")
    return True


def _range_hints(rep: Report, lo: float, hi: float, b: int, dtype: np.dtype) -> None:
    maxq, half = (1 << b) - 1, 1 << (b - 1)
    if lo < 0 and lo >= -half and hi <= half - 1:
        rep.add("defect.signed_codes", HINT, f"codes lie in [{-half}, {half - 1}] = [-2^(b-1), 2^(b-1)-1]: "
                "signed codes (official decoupleQ convention); use --convention signed or add 2^(b-1)")
    elif dtype == np.uint8 and hi >= 256 - half and lo <= half - 1:
        rep.add("defect.signed_codes_cast_to_uint8", HINT, "codes near 255 next to small ones: signed codes "
                "cast to uint8 (negative values wrapped); add 2^(b-1) before the cast")
    elif hi == maxq + 1 and lo >= 1:
        rep.add("defect.off_by_one_range", HINT, f"codes lie in [1, {maxq + 1}] = [1, 2^b]: shifted by +1 "
                f"(off-by-one integer range); the range is [0, 2^b-1] = [0, {maxq}]")
    elif hi == maxq + 1 and lo >= 0:
        rep.add("defect.off_by_one_range", HINT, f"largest code is {maxq + 1} = 2^b: clamped to [0, 2^b] "
                f"instead of [0, 2^b-1] (off-by-one integer range, 2^b+1 levels)")
    elif lo >= 0 and hi < 1 << (b + 1):
        rep.add("defect.wrong_bits", HINT, f"codes reach {hi:g}: quantized with more than {b} bits?")


def _claimed(rep: Report, ctx: _Ctx, r: dict[str, Any], row_loss: np.ndarray, row_obj: np.ndarray) -> None:
    pol = ctx.pol
    raw_energy = np.einsum("ij,ij->i", ctx.W @ ctx.H, ctx.W)
    raw_slack = pol.energy_atol * max(float(raw_energy.sum()), 0.0) + 2 * pol.storage_ulps * ctx.u * np.sqrt(
        max(float(row_loss.sum()), 0.0) * max(float(raw_energy.sum()), 0.0))
    loss = float(row_loss.sum())
    obj = float(row_obj.sum())
    checked = False
    if "loss" in r:
        checked = True
        claimed = float(np.asarray(r["loss"]).reshape(-1)[0]) if np.size(r["loss"]) == 1 else float("nan")
        tol = pol.claimed_rtol * abs(loss) + raw_slack
        if np.isfinite(claimed) and abs(claimed - loss) <= tol:
            rep.add("loss.claimed", PASS, f"claimed loss {claimed:.9g} = recomputed {loss:.9g}", value=claimed)
        else:
            rep.add("loss.claimed", FAIL, f"claimed loss {claimed:.9g} but (q, scale, zero) give {loss:.9g} "
                    f"on H (relative difference {abs(claimed - loss) / max(abs(loss), 1e-300):.3g}, "
                    f"tolerance {pol.claimed_rtol:g})", value=claimed, limit=loss)
            close = lambda a, b: abs(a - b) <= pol.claimed_rtol * abs(b) + raw_slack  # noqa: E731
            if close(claimed, obj) and not close(loss, obj):
                rep.add("defect.damped_loss_reported", HINT, "the claimed loss is the objective on the damped "
                        "H + damp*mean(diag H)*I; 'loss' must be on the H passed in ('objective' is the damped one)")
            elif close(claimed * ctx.W.shape[0], loss) and ctx.W.shape[0] > 1:
                rep.add("defect.mean_not_sum", HINT, "the claimed loss is the mean over rows; 'loss' is the "
                        "sum over rows (paper eq. 5)")
    if "row_loss" in r:
        checked = True
        rl = np.asarray(r["row_loss"], dtype=np.float64).reshape(-1)
        if rl.shape != row_loss.shape:
            rep.add("loss.claimed_rows", FAIL, f"row_loss has shape {rl.shape}, expected {row_loss.shape}")
        else:
            tol = pol.claimed_rtol * np.abs(row_loss) + raw_slack / max(len(rl), 1)
            bad = ~(np.abs(rl - row_loss) <= tol)
            if bad.any():
                rows = nonzero_rows(bad)
                rep.add("loss.claimed_rows", FAIL, f"claimed row_loss differs from the recomputed one in "
                        f"{list_rows(rows)}", rows=rows)
            else:
                rep.add("loss.claimed_rows", PASS, "claimed row_loss = recomputed")
    if "objective" in r:
        checked = True
        claimed = float(np.asarray(r["objective"]).reshape(-1)[0]) if np.size(r["objective"]) == 1 else float("nan")
        tol = pol.claimed_rtol * abs(obj) + float(ctx.slack_rows(row_obj).sum())
        if np.isfinite(claimed) and abs(claimed - obj) <= tol:
            rep.add("loss.claimed_objective", PASS, f"claimed objective {claimed:.9g} = recomputed", value=claimed)
        else:
            rep.add("loss.claimed_objective", FAIL, f"claimed objective {claimed:.9g} but (q, scale, zero) give "
                    f"{obj:.9g} on the damped H (damp={ctx.cfg.damp:g})", value=claimed, limit=obj)
    if not checked:
        rep.add("loss.claimed", SKIP, "the result claims no loss, row_loss or objective")


def _ratio_checks(ctx: _Ctx, row_obj: np.ndarray, ref_row_obj: np.ndarray, rtol: float) -> dict[str, Any]:
    """Total and row-normalised comparison of two per-row objectives (a against bound b)."""
    slack = ctx.slack_rows(np.maximum(row_obj, ref_row_obj))
    total, ref_total = float(row_obj.sum()), float(ref_row_obj.sum())
    total_ok = total <= (1 + rtol) * ref_total + float(slack.sum())
    rel, ref_rel = row_obj / ctx.norm, ref_row_obj / ctx.norm
    mean_rel, ref_mean_rel = float(rel.mean()), float(ref_rel.mean())
    rows_ok = mean_rel <= (1 + rtol) * ref_mean_rel + float((slack / ctx.norm).mean())
    worse = row_obj > (1 + rtol) * ref_row_obj + slack
    order = np.argsort(-(rel - ref_rel)[worse], kind="stable")
    worst_rows = np.nonzero(worse)[0][order].tolist()
    ratio = total / ref_total if ref_total > 0 else (1.0 if total <= slack.sum() else float("inf"))
    row_ratio = mean_rel / ref_mean_rel if ref_mean_rel > 0 else (1.0 if rows_ok else float("inf"))
    return dict(total_ok=total_ok, rows_ok=rows_ok, ratio=ratio, row_ratio=row_ratio, worst_rows=worst_rows)


def _reference(rep: Report, ctx: _Ctx, row_obj: np.ndarray, ref_row_obj: np.ndarray) -> None:
    rtol, pol = ctx.pol.rtol, ctx.pol
    c = _ratio_checks(ctx, row_obj, ref_row_obj, rtol)
    rep.numbers["ratio_to_reference"] = c["ratio"]
    rep.numbers["row_ratio_to_reference"] = c["row_ratio"]
    rep.meta["worse_rows"] = c["worst_rows"][:64]
    limit = 1 + rtol
    rows_txt = f"; rows worse than the reference: {list_rows(c['worst_rows'])}" if c["worst_rows"] else ""
    if c["total_ok"]:
        rep.add("loss.reference", PASS, f"objective {c['ratio']:.9g}x the reference's (limit {limit:g}x, "
                f"level {pol.level})", value=c["ratio"], limit=limit)
    else:
        rep.add("loss.reference", FAIL, f"objective {float(row_obj.sum()):.6g} is {c['ratio']:.6g}x the "
                f"reference's {float(ref_row_obj.sum()):.6g} (limit {limit:g}x, level {pol.level}){rows_txt}",
                rows=c["worst_rows"], value=c["ratio"], limit=limit)
    if c["rows_ok"]:
        rep.add("loss.reference_rows", PASS, f"row-normalised objective {c['row_ratio']:.9g}x the reference's",
                value=c["row_ratio"], limit=limit)
    else:
        rep.add("loss.reference_rows", FAIL, f"mean over rows of objective/energy is {c['row_ratio']:.6g}x the "
                f"reference's (limit {limit:g}x){_row_vs_total(c['row_ratio'], c['ratio'])}{rows_txt}",
                rows=c["worst_rows"], value=c["row_ratio"], limit=limit)


def _row_vs_total(row_ratio: float, ratio: float) -> str:
    """What the row-normalised ratio says beside the total one, in words that match the numbers."""
    if row_ratio > 1.5 * ratio:
        return (f", above the total's {ratio:.4g}x: rows of small magnitude are quantized worse than large "
                "ones")
    if row_ratio < ratio / 1.5:
        return (f", below the total's {ratio:.4g}x: the excess sits in rows of large magnitude; small rows are "
                "closer to the reference")
    return f", like the total's {ratio:.4g}x: rows of every magnitude are worse alike"


def _optimum(rep: Report, ctx: _Ctx, row_obj: np.ndarray, opt_row_obj: np.ndarray) -> None:
    pol = ctx.pol
    slack = ctx.slack_rows(np.maximum(row_obj, opt_row_obj))
    below = row_obj < opt_row_obj * (1 - pol.optimum_rtol) - slack
    opt = float(opt_row_obj.sum())
    ratio = float(row_obj.sum()) / opt if opt > 0 else 1.0
    rep.numbers["ratio_to_optimum"] = ratio
    if below.any():
        rows = nonzero_rows(below)
        rep.add("loss.optimum", FAIL, f"objective below the global optimum in {list_rows(rows)} (by up to "
                f"{float(np.max((opt_row_obj - row_obj)[below] / np.maximum(opt_row_obj[below], 1e-300))):.3g} "
                "relative): impossible for a valid (q, scale, zero) with codes in [0, 2^b-1]; the codes, "
                "the group layout or the convention are not what they claim", rows=rows, value=ratio, limit=1.0)
    else:
        rep.add("loss.optimum", PASS, f"objective {ratio:.6g}x the global optimum (never below it)",
                value=ratio, limit=1.0)


def global_optimum_rows(W: np.ndarray, Hd: np.ndarray, cfg: QuantConfig) -> np.ndarray | None:
    """Per-row optimal objective on Hd for tiny per-channel layers without an fp16 branch
    (validate.exact), else None."""
    if (cfg.group_size not in (-1, W.shape[1]) or (1 << cfg.bits) ** W.shape[1] > TINY_ENUMERATION
            or cfg.hp_channels):
        return None
    opt = global_optimum(W, Hd, cfg.bits, symmetric=cfg.symmetric)
    return optimum_row_objective(W, Hd, opt)


def optimum_row_objective(W: np.ndarray, Hd: np.ndarray, opt: Any) -> np.ndarray:
    """Row objectives of an optimum object/mapping: recomputed from its (q, scale, zero) when it
    has them (same arithmetic as the checked result), else its row_loss."""
    m = result_mapping(opt)
    if all(k in m for k in ("q", "scale", "zero")):
        q, s, z = _float_arrays(m["q"], np.reshape(m["scale"], (W.shape[0], -1)), np.reshape(m["zero"], (W.shape[0], -1)))
        return row_losses(W, dequantize_parts(q, s, z), Hd)
    return np.asarray(m["row_loss"], dtype=np.float64).reshape(-1)


# ----------------------------------------------------------------------------- diagnosis

def _swap_groups(W: np.ndarray, q: np.ndarray, s: np.ndarray, z: np.ndarray) -> np.ndarray:
    """(out, G) mask of groups where (zero, scale) reproduces W better than (scale, zero)."""
    out, n_in = W.shape
    G = s.shape[1]
    gs = n_in // G
    Wg, qg = W.reshape(out, G, gs), q.reshape(out, G, gs)
    e_as = ((s[..., None] * qg + z[..., None] - Wg) ** 2).sum(axis=2)
    e_sw = ((z[..., None] * qg + s[..., None] - Wg) ** 2).sum(axis=2)
    return e_sw < 0.5 * e_as


def _candidates(ctx: _Ctx, q: np.ndarray, s: np.ndarray, z: np.ndarray) -> list[tuple[str, str, tuple, list]]:
    """(defect name, description, (q, s, z) repaired, offending (row, group) pairs)."""
    b, half = ctx.cfg.bits, float(1 << (ctx.cfg.bits - 1))
    cands = []
    swap = _swap_groups(ctx.W, q, s, z)
    if swap.any():
        pairs = list(zip(*np.nonzero(swap)))
        where = "in every group" if swap.all() else f"at {list_groups(pairs)}"
        cands.append(("swapped_scale_zero", f"scale and zero are swapped {where}",
                      (q, np.where(swap, z, s), np.where(swap, s, z)), pairs))
    if not swap.all():
        cands.append(("swapped_scale_zero", "scale and zero are swapped in every group", (q, z, s), []))
    if q.min() < 0:
        cands.append(("signed_codes", "codes are signed ([-2^(b-1), 2^(b-1)-1]); use --convention signed",
                      (q + half, s, z - s * half), []))
    cands.append(("zero_point", "zero holds a zero-point (W_hat = s*(q - zp)); use --convention zero_point",
                  (q, s, -z * s), []))
    cands.append(("negated_zero", "zero has the wrong sign (W_hat = s*q - z)", (q, s, -z), []))
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(s != 0, 1.0 / s, 0.0)
    cands.append(("reciprocal_scale", "scale holds 1/scale", (q, inv, z), []))
    if s.shape[0] == s.shape[1] and s.shape[0] > 1:
        cands.append(("transposed_scale_zero", "scale and zero are transposed (G, out); use --convention "
                      "transposed", (q, s.T, z.T), []))
    if q.max() > ctx.cfg.maxq and q.min() >= 1:
        cands.append(("off_by_one_range", "codes are shifted by +1", (q - 1, s, z + s), []))
    return cands


def _diagnose(rep: Report, ctx: _Ctx, q: np.ndarray, s: np.ndarray, z: np.ndarray, row_obj: np.ndarray,
              ref_row_obj: np.ndarray | None) -> None:
    if rep.hints:
        return  # structure already named the defect
    obj = float(row_obj.sum())
    seen = set()
    for name, desc, (q2, s2, z2), pairs in _candidates(ctx, q, s, z):
        if name in seen or not (np.isfinite(s2).all() and np.isfinite(z2).all()):
            continue
        if q2.min() < 0 or q2.max() > ctx.cfg.maxq:
            continue
        cand = row_losses(ctx.W, ctx.w_hat(q2, s2, z2), ctx.Hd)
        total = float(cand.sum())
        if ref_row_obj is not None:
            c = _ratio_checks(ctx, cand, ref_row_obj, DIAGNOSIS_RTOL)
            ref_total = float(ref_row_obj.sum())
            closes_gap = total - ref_total <= DIAGNOSIS_GAP * (obj - ref_total) and obj > ref_total
            explains = ((c["total_ok"] and c["rows_ok"]) or closes_gap) and total < obj
            after = f"{c['ratio']:.4g}x the reference"
            if closes_gap and not (c["total_ok"] and c["rows_ok"]):
                after += (f"; the repair removes {1 - (total - ref_total) / (obj - ref_total):.1%} of the excess "
                          "over the reference, the rest is the solver's")
        else:
            explains = total < 0.5 * obj
            after = f"{total:.6g}"
        if explains:
            seen.add(name)
            before = rep.numbers.get("ratio_to_reference")
            before_txt = f" (now {before:.4g}x)" if isinstance(before, float) else ""
            rep.add(f"defect.{name}", HINT, f"{desc}: repaired, the objective is {after}{before_txt}",
                    rows=sorted({r for r, _ in pairs}), groups=pairs)


# ----------------------------------------------------------------------------- entry point

def check_result(
    W: np.ndarray,
    H: np.ndarray,
    result: Any,
    cfg: QuantConfig | Mapping[str, Any] | None = None,
    *,
    reference: Any = None,
    optimum: Any = None,
    policy: Policy | None = None,
    level: str | None = None,
    convention: str | None = None,
    case: str = "",
    diagnose: bool = True,
) -> Report:
    """Check one implementation's result for layer (W, H) under ``cfg``; returns a Report.

    result     mapping or object with q, scale, zero (optionally loss, row_loss, objective), in
               this project's convention unless ``convention`` names another (validate.adapters)
    reference  None: run decoupleq_ref.quantize_layer on the same input; a QuantResult or
               mapping with q/scale/zero: use it; False: skip the comparison
    optimum    None: computed with validate.exact.global_optimum for tiny per-channel layers
               ((2^b)^in ≤ 65536); an object/mapping with q/scale/zero (objective on H_d) or
               row_loss; a per-row array of optimal objectives; False: skip
    policy     tolerances (Policy); ``level`` is a shortcut for Policy(level=...)
    """
    cfg = as_config(cfg)
    pol = policy or Policy()
    if level is not None:
        pol = replace(pol, level=level)
    W, H = check_layer(W, H, cfg.group_size)
    Hd = damp_hessian(H, cfg.damp)
    r = to_native(result, cfg, convention)
    row_energy = np.einsum("ij,ij->i", W @ Hd, W)
    mean_e = float(row_energy.mean())
    norm = np.where(row_energy > 0, row_energy, mean_e if mean_e > 0 else 1.0)
    u = 0.0
    for k in ("scale", "zero"):
        v = r.get(k)
        if isinstance(v, np.ndarray) and v.dtype.kind == "f":
            u = max(u, float(np.finfo(v.dtype).eps) / 2)
    ctx = _Ctx(W, H, Hd, cfg, pol, row_energy, norm, u)
    rep = Report(case=case, meta={"shape": list(W.shape), "config": _short_config(cfg), "policy": pol.to_dict()})

    arrays = _structure(rep, ctx, r)
    if arrays is None:
        rep.add("loss", SKIP, "loss checks skipped: the result's structure does not allow computing W_hat")
        return rep
    q, s, z = arrays
    W_hat = ctx.w_hat(q, s, z)
    row_obj = row_losses(W, W_hat, Hd)
    row_loss = row_losses(W, W_hat, H)
    rep.numbers.update(loss=float(row_loss.sum()), objective=float(row_obj.sum()))
    _claimed(rep, ctx, r, row_loss, row_obj)

    ref_row_obj = None
    if reference is not False:
        if reference is None:
            reference = quantize_layer(W, H, cfg)
        ref = to_native(reference, cfg)
        ref_row_obj = row_losses(W, w_hat(ref), Hd)
        rep.numbers["reference_objective"] = float(ref_row_obj.sum())
        _reference(rep, ctx, row_obj, ref_row_obj)
    else:
        rep.add("loss.reference", SKIP, "no reference comparison requested")

    opt_rows = None
    if optimum is None:
        opt_rows = global_optimum_rows(W, Hd, cfg)
    elif optimum is not False:
        opt_rows = (np.asarray(optimum, dtype=np.float64).reshape(-1) if isinstance(optimum, np.ndarray)
                    else optimum_row_objective(W, Hd, optimum))
    if opt_rows is not None:
        rep.numbers["optimum_objective"] = float(opt_rows.sum())
        _optimum(rep, ctx, row_obj, opt_rows)
    else:
        rep.add("loss.optimum", SKIP, "no global optimum (only for tiny per-channel layers)")

    if diagnose and not rep.ok:
        _diagnose(rep, ctx, q, s, z, row_obj, ref_row_obj)
    return rep


def _short_config(cfg: QuantConfig) -> dict[str, Any]:
    d = cfg.to_dict()
    base = QuantConfig().to_dict()
    keep = {"bits", "group_size", "symmetric", "method"}
    return {k: v for k, v in d.items() if k in keep or v != base[k]}


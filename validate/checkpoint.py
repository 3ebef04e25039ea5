"""validate_checkpoint: does every packed layer of a checkpoint dequantize to the weights it claims?

Two formats:

* this project's checkpoint directory (decoupleq_ref/model/checkpoint.py, docs/FORMAT.md):
  per layer, the stored tensors must form a valid PackedLayer, padding bits must be zero, scales,
  zeros and the fp16 branch finite, symmetric layers must have zero = −scale·2^(b−1); with
  ``fake`` (a float state dict: .safetensors, or .pth/.pt/.bin read with torch.load(weights_only=True))
  Ŵ must equal the fake-quant weights ``NAME.weight`` and every other tensor must be identical.
* the official decoupleQ pair (``llama.py --save``): ``true_quant.pth`` holds per quantized
  weight ``K`` the int8 codes ``K`` (signed, (out, in)), ``K_qscale`` (out, G) and, for asymmetric
  runs, ``K_qzero`` (out, G), with Ŵ = scale·w_int + zero (Ŵ = scale·w_int when there is no zero);
  ``fake_quant.pth`` is the model's state dict with Ŵ cast to the model dtype. The group size
  is not stored: G is read from K_qscale's shape. Both files are loaded with
  ``torch.load(weights_only=True)``, never unrestricted pickle.

Tolerance: the fake weights are Ŵ rounded once to their dtype after an fp32 evaluation, so an
entry passes when |Ŵ − W_fake| ≤ 1.01·u(fake)·|Ŵ| + 4·u(fp32)·(|s|·|q| + |z|) + the fake
dtype's smallest subnormal (u: unit roundoff; fp16 2⁻¹¹, bf16 2⁻⁸, fp32 2⁻²⁴).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from decoupleq_ref.matmul import PackedLayer
from decoupleq_ref.model.checkpoint import QUANT_SUFFIXES, packed_layer, read_checkpoint_tensors
from decoupleq_ref.packing import pack

from .report import list_rows

OFFICIAL_FILES = ("fake_quant.pth", "true_quant.pth")
UNIT = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8, "float32": 2.0 ** -24, "float64": 2.0 ** -53}
SUBNORMAL = {"float16": 2.0 ** -24, "bfloat16": 2.0 ** -133, "float32": 2.0 ** -149, "float64": 5e-324}


@dataclass
class LayerCheck:
    """Outcome for one tensor: ``problems`` empty means it passed."""

    name: str
    shape: tuple[int, ...]
    problems: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None
    rel_diff: float | None = None   # ‖Ŵ − W_fake‖_F / ‖W_fake‖_F
    bad_entries: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class CheckpointReport:
    source: str
    kind: str  # "decoupleq" | "official"
    layers: list[LayerCheck]
    problems: list[str] = field(default_factory=list)  # not tied to one layer

    @property
    def failed(self) -> list[LayerCheck]:
        return [c for c in self.layers if not c.ok]

    @property
    def ok(self) -> bool:
        return not self.failed and not self.problems

    def table(self) -> str:
        lines = [f"{self.kind} checkpoint {self.source}: {len(self.layers)} tensors checked",
                 f"{'tensor':<48} {'shape':>12} {'max |diff|':>11} {'rel diff':>9}  status"]
        for c in self.layers:
            shape = "x".join(map(str, c.shape))
            num = (f"{c.max_abs_diff:>11.3g} {c.rel_diff:>9.2g}" if c.max_abs_diff is not None
                   else f"{'-':>11} {'-':>9}")
            lines.append(f"{c.name:<48} {shape:>12} {num}  {'ok' if c.ok else 'FAIL: ' + '; '.join(c.problems)}")
        lines += [f"FAIL: {p}" for p in self.problems]
        lines.append(f"{len(self.layers) - len(self.failed)}/{len(self.layers)} tensors ok"
                     + (f"; differing: {', '.join(c.name for c in self.failed)}" if self.failed else ""))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "ok": self.ok, "problems": self.problems,
                "layers": [{**vars(c), "shape": list(c.shape), "ok": c.ok} for c in self.layers]}


# ----------------------------------------------------------------------------- loading


def load_state(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """({name: array}, {name: stored dtype}) from .safetensors or a torch .pth/.pt/.bin state
    dict (``torch.load(weights_only=True)``); bf16 tensors become float32 arrays, their stored
    dtype kept so the tolerance is still bf16's."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint: {path} is not a file")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file as load_torch
        except ImportError:
            from safetensors.numpy import load_file

            arrays = dict(load_file(str(path)))
            return arrays, {k: str(v.dtype) for k, v in arrays.items()}
        return _to_numpy(load_torch(str(path)), path)
    try:
        import torch
    except ImportError:
        raise ValueError(f"checkpoint: reading {path.name} needs torch (pip install torch)") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle refusals and corrupt files
        raise ValueError(f"checkpoint: cannot read {path} with torch.load(weights_only=True): "
                         f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), dict):
        obj = next(iter(obj.values()))  # {"state_dict": {...}} / {"model": {...}}
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint: {path} holds a {type(obj).__name__}, not a state dict")
    return _to_numpy(obj, path)


def _to_numpy(sd: dict[str, Any], path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    import torch

    out: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue  # non-tensor entries (ints, strings) are not weights
        dtypes[k] = str(v.dtype).replace("torch.", "")
        out[k] = (v.float() if v.dtype == torch.bfloat16 else v).detach().cpu().numpy()
    return out, dtypes


# ----------------------------------------------------------------------------- comparison


def compare_weight(check: LayerCheck, W_hat: np.ndarray, M: np.ndarray, fake: np.ndarray, dt: str,
                   group_size: int | None = None) -> None:
    """Ŵ (float64) vs the fake-quant weight stored as dtype ``dt``, within the module doc's
    tolerance; the offending rows (and input groups, given ``group_size``) are named."""
    if fake.shape != W_hat.shape:
        hint = " (transposed)" if fake.shape == W_hat.shape[::-1] else ""
        check.problems.append(f"fake-quant weight has shape {fake.shape}, the packed layer {W_hat.shape}{hint}")
        return
    u, tiny = UNIT.get(dt, 2.0 ** -24), SUBNORMAL.get(dt, 0.0)
    F = np.asarray(fake, dtype=np.float64)
    diff = np.abs(W_hat - F)
    with np.errstate(invalid="ignore"):
        bad = ~(diff <= 1.01 * u * np.abs(W_hat) + 4 * UNIT["float32"] * M + tiny)
    check.max_abs_diff = float(np.nanmax(diff)) if diff.size else 0.0
    norm = float(np.linalg.norm(F))
    check.rel_diff = float(np.linalg.norm(np.nan_to_num(W_hat - F, nan=np.inf))) / norm if norm > 0 else float(diff.max())
    check.bad_entries = int(bad.sum())
    if bad.any():
        rows = np.nonzero(bad.any(axis=1))[0].tolist()
        r, c = np.unravel_index(int(np.argmax(np.where(bad, np.nan_to_num(diff, nan=np.inf), -1))), bad.shape)
        groups = ""
        if group_size:
            gs = sorted({int(j) // group_size for j in np.nonzero(bad.any(axis=0))[0]})
            groups = f", input groups {list_rows(gs)[5:]} (group size {group_size})"
        check.problems.append(f"dequantized weight differs from the fake-quant one at {check.bad_entries} of {bad.size} "
                              f"entries in {list_rows(rows)}{groups} (worst at ({r}, {c}): {W_hat[r, c]:.6g} vs "
                              f"{F[r, c]:.6g}; tolerance is {dt} rounding)")


def _compare_plain(name: str, a: np.ndarray, b: np.ndarray | None) -> LayerCheck:
    """An unquantized tensor must be stored unchanged."""
    check = LayerCheck(name, tuple(a.shape))
    if b is None:
        check.problems.append("missing from the fake-quant state dict")
    elif a.shape != b.shape or not np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True):
        check.problems.append("unquantized tensor differs between the two files")
    return check


def _expand(per_group: np.ndarray, n_in: int) -> np.ndarray:
    return np.repeat(np.asarray(per_group, dtype=np.float64), n_in // per_group.shape[1], axis=1)


# ----------------------------------------------------------------------------- official pair


def official_layer(name: str, w_int: np.ndarray, scale: np.ndarray, zero: np.ndarray | None,
                   bits: int | None) -> tuple[LayerCheck, np.ndarray | None, np.ndarray | None]:
    """Structure of one official true-quant layer; (check, Ŵ, M) with Ŵ None when malformed."""
    check = LayerCheck(name, tuple(w_int.shape))
    if w_int.ndim != 2 or w_int.dtype.kind not in "iu":
        check.problems.append(f"codes must be a 2-D integer tensor (int8 in the official code), got {w_int.dtype} "
                              f"{w_int.shape}")
        return check, None, None
    out, n_in = w_int.shape
    for what, t in (("_qscale", scale), ("_qzero", zero)):
        if t is None:
            continue
        if t.ndim != 2 or t.shape[0] != out or n_in % t.shape[1]:
            hint = " (stored (G, out): transposed)" if t.ndim == 2 and t.shape[1] == out else ""
            check.problems.append(f"{name}{what} has shape {t.shape}; expected (out, G) = ({out}, G) with G "
                                  f"dividing {n_in}{hint}")
        elif not np.all(np.isfinite(t)):
            check.problems.append(f"{name}{what} has NaN/Inf in {list_rows(np.nonzero(~np.isfinite(t).all(axis=1))[0])}")
    if zero is not None and zero.shape != scale.shape:
        check.problems.append(f"{name}_qscale {scale.shape} and {name}_qzero {zero.shape} differ in shape")
    if bits is not None:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        outside = (w_int < lo) | (w_int > hi)
        if outside.any():
            check.problems.append(f"codes outside the signed {bits}-bit range [{lo}, {hi}] in "
                                  f"{list_rows(np.nonzero(outside.any(axis=1))[0])}")
    if check.problems:
        return check, None, None
    S = _expand(scale, n_in)
    q = w_int.astype(np.float64)
    W_hat, M = S * q, np.abs(S) * np.abs(q)
    if zero is not None:
        Z = _expand(zero, n_in)
        W_hat, M = W_hat + Z, M + np.abs(Z)
    return check, W_hat, M


def explain_official(fake: np.ndarray, dt: str, w_int: np.ndarray, scale: np.ndarray, zero: np.ndarray | None,
                     bits: int | None) -> str:
    """The usual export mistake that turns (w_int, scale, zero) into the fake-quant weight, or ""."""
    n_in = w_int.shape[1]
    q, S = w_int.astype(np.float64), _expand(scale, n_in)
    Z = _expand(zero, n_in) if zero is not None else np.zeros_like(S)
    halves = [float(1 << (bits - 1))] if bits else [1.0, 2.0, 4.0, 8.0, 16.0, 64.0]  # b unknown: try them
    F = np.asarray(fake, dtype=np.float64)
    M = np.abs(S) * (np.abs(q) + max(halves)) + np.abs(Z)
    cands = []
    for half in halves:
        cands += [(f"the codes are offset by 2^(b-1) = {half:g}: unsigned codes stored with the signed zero",
                   S * (q - half) + Z),
                  (f"the codes are offset by -2^(b-1) = {-half:g}: signed codes stored with an unsigned zero",
                   S * (q + half) + Z)]
    if zero is not None:
        cands += [("the zero is not added (W = scale*w_int)", S * q),
                  ("the zero has the wrong sign (W = scale*w_int - zero)", S * q - Z),
                  ("the zero is an integer zero-point (W = scale*(w_int - zero))", S * (q - Z)),
                  ("scale and zero are swapped", Z * q + S)]
    u, tiny = UNIT.get(dt, 2.0 ** -24), SUBNORMAL.get(dt, 0.0)
    for desc, W_c in cands:
        if np.all(np.abs(W_c - F) <= 1.01 * u * np.abs(W_c) + 4 * UNIT["float32"] * M + tiny):
            return desc
    return ""


def check_official_pair(fake_path: str | Path, true_path: str | Path, bits: int | None = None) -> CheckpointReport:
    """Compare every layer of the official ``true_quant.pth`` with ``fake_quant.pth`` (module doc)."""
    (true, _), (fake, fake_dt) = load_state(true_path), load_state(fake_path)
    quantized = [k for k in true if f"{k}_qscale" in true]
    aux = {f"{k}_qscale" for k in quantized} | {f"{k}_qzero" for k in quantized}
    rep = CheckpointReport(str(true_path), "official", [])
    if not quantized:
        rep.problems.append(f"{true_path} has no quantized layer (no NAME_qscale tensor): is it a true_quant.pth?")
    for k in quantized:
        check, W_hat, M = official_layer(k, true[k], true[f"{k}_qscale"], true.get(f"{k}_qzero"), bits)
        if W_hat is not None:
            if k in fake:
                compare_weight(check, W_hat, M, fake[k], fake_dt[k], true[k].shape[1] // true[f"{k}_qscale"].shape[1])
                why = explain_official(fake[k], fake_dt[k], true[k], true[f"{k}_qscale"], true.get(f"{k}_qzero"),
                                       bits) if check.problems and fake[k].shape == W_hat.shape else ""
                if why:
                    check.problems.append(f"likely: {why}")
            else:
                check.problems.append("no weight of this name in the fake-quant state dict")
        rep.layers.append(check)
    for k, v in true.items():
        if k not in aux and k not in quantized:
            rep.layers.append(_compare_plain(k, v, fake.get(k)))
    extra = sorted(set(fake) - set(true))
    if extra:
        rep.problems.append(f"tensors only in the fake-quant file: {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    return rep


# ----------------------------------------------------------------------------- this project's checkpoint


def _project_layer(name: str, tensors: dict[str, np.ndarray], info: dict, config: dict
                   ) -> tuple[LayerCheck, PackedLayer | None]:
    check = LayerCheck(name, tuple(info.get("shape", ())))
    try:
        layer = packed_layer(tensors, name, info, config["bits"], config["group_size"])
    except (KeyError, ValueError) as e:
        check.problems.append(f"not a valid packed layer: {e}")
        return check, None
    if not np.array_equal(pack(layer.codes(), layer.bits), layer.packed):
        rows = np.nonzero((pack(layer.codes(), layer.bits) != layer.packed).any(axis=1))[0]
        check.problems.append(f"padding bits after the last column are not zero in {list_rows(rows)} "
                              "(docs/FORMAT.md: rows are zero-padded to a 32-bit word)")
    for what, t in (("scales", layer.scale), ("zeros", layer.zero), ("hp_weight", layer.hp_weight)):
        if t is not None and not np.all(np.isfinite(np.asarray(t, dtype=np.float64))):
            bad = ~np.isfinite(np.asarray(t, dtype=np.float64))
            check.problems.append(f"{what} has NaN/Inf in {list_rows(np.nonzero(bad.any(axis=1))[0])}")
    if config.get("solver", {}).get("symmetric"):
        half = float(1 << (layer.bits - 1))
        s, z = layer.scale.astype(np.float64), layer.zero.astype(np.float64)
        off = np.abs(z + s * half) > 4 * UNIT["float32"] * np.abs(s) * half
        if off.any():
            check.problems.append(f"symmetric checkpoint but zero != -scale*2^(b-1) in "
                                  f"{list_rows(np.nonzero(off.any(axis=1))[0])}")
    return check, layer


def _magnitude(layer: PackedLayer) -> np.ndarray:
    """|s|·q + |z| (+ |B| on the branch columns): the scale of the rounding error of Ŵ."""
    n_in = layer.shape[1]
    M = _expand(np.abs(layer.scale), n_in) * layer.codes() + _expand(np.abs(layer.zero), n_in)
    if layer.hp_channels:
        M[:, layer.hp_index] += np.abs(layer.hp_weight.astype(np.float64))
    return M


def check_project_checkpoint(folder: str | Path, fake: str | Path | None = None) -> CheckpointReport:
    """Check this project's checkpoint directory, against fake-quant weights when given."""
    config, tensors = read_checkpoint_tensors(Path(folder))
    ref, ref_dt = load_state(fake) if fake is not None else (None, {})
    rep = CheckpointReport(str(folder), "decoupleq", [])
    for name, info in config["layers"].items():
        check, layer = _project_layer(name, tensors, info, config)
        if layer is not None and ref is not None and not check.problems:
            key = f"{name}.weight"
            if key not in ref:
                check.problems.append(f"no {key} in the fake-quant state dict")
            else:
                W_f = ref[key].T if info.get("transposed") else ref[key]
                W_hat = layer.dequantize()
                M = _magnitude(layer)
                compare_weight(check, W_hat, M, W_f, ref_dt[key], layer.shape[1] // layer.scale.shape[1])
        rep.layers.append(check)
    if ref is not None:
        quant_keys = {f"{n}.{s}" for n in config["layers"] for s in QUANT_SUFFIXES}
        for k, v in tensors.items():
            if k not in quant_keys:
                rep.layers.append(_compare_plain(k, v, ref.get(k)))
    return rep


def validate_checkpoint(path: str | Path, fake: str | Path | None = None, bits: int | None = None) -> CheckpointReport:
    """Dispatch: this project's checkpoint directory; an official output directory holding
    fake_quant.pth and true_quant.pth; or a true_quant.pth file with ``fake`` its fake_quant.pth."""
    path = Path(path)
    if path.is_dir() and (path / "quantization_config.json").exists():
        return check_project_checkpoint(path, fake)
    if path.is_dir() and all((path / f).exists() for f in OFFICIAL_FILES):
        return check_official_pair(path / OFFICIAL_FILES[0], path / OFFICIAL_FILES[1], bits)
    if path.is_file():
        if fake is None:
            raise ValueError(f"fake: checking {path.name} (an official true-quant file) needs its fake-quant "
                             "state dict: pass --fake fake_quant.pth")
        return check_official_pair(fake, path, bits)
    raise ValueError(f"checkpoint: {path} is neither this project's checkpoint directory (with "
                     f"quantization_config.json), a directory with {' and '.join(OFFICIAL_FILES)}, nor a true_quant file")

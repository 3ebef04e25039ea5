"""Read an exported GGUF back with the other side's code and compare it with its checkpoint.

Every tensor is decoded by gguf-py's own dequantizer (``gguf.quants.dequantize``, the NumPy port
of ggml's), its rows put back in HF order (attn_q / attn_k un-permuted), and held to:

* ``gguf.tensors``: every checkpoint tensor with a GGUF name is in the file, none missing.
* ``gguf.exact``: a quantized linear equals d·q + m computed in float32 from the checkpoint's
  codes with (s, z) rounded to fp16 — bit for bit; an F32 fallback and every other tensor equal
  the checkpoint's float32 values bit for bit.
* ``gguf.kquant``: a K-quant linear (a new solve on the K grid, not the checkpoint's Ŵ) equals
  the Ŵ its solver computed (``expected``: GGUF name → float32 array, e.g. the export summary's
  ``solved``), bit for bit; skipped without ``expected``.
* ``gguf.fp16``: and so it equals the checkpoint's Ŵ = s·q + z to fp16 rounding of (s, z):
  |Ŵ_gguf − Ŵ| ≤ q·|s − fp16(s)| + |z − fp16(z)| + 4·ε₃₂·(|s·q| + |z|) per weight (an F32
  fallback: ε₃₂·|Ŵ|, its one rounding to float32).

    report = check_gguf_export("model.gguf", "qmodel/"); report.raise_if_failed()
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from decoupleq_ref.format import expand_groups
from decoupleq_ref.model.checkpoint import QUANT_SUFFIXES, packed_layer, read_checkpoint_tensors
from decoupleq_ref.model.weights import gguf_heads, gguf_tensor_array, hf_to_gguf_name

from .report import FAIL, PASS, SKIP, Report

EPS32 = float(np.finfo(np.float32).eps)


def gguf_tensors_hf(path: str | Path) -> dict[str, tuple[np.ndarray, str]]:
    """GGUF name → (float32 array in HF row order, ggml type name), decoded by gguf-py."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    n_head, n_kv = gguf_heads(reader)
    return {t.name: (gguf_tensor_array(t, n_head, n_kv), t.tensor_type.name) for t in reader.tensors}


def fp16_reference(layer: object) -> tuple[np.ndarray, np.ndarray]:
    """(Ŵ from fp16-rounded (s, z) in float32 as ggml computes d·q + m, the per-weight bound on
    its distance to the checkpoint's Ŵ)."""
    q = layer.codes().astype(np.float32)
    n_in = q.shape[1]
    s, z = (expand_groups(np.asarray(a, np.float64), n_in) for a in (layer.scale, layer.zero))
    d, m = (a.astype(np.float16).astype(np.float32) for a in (s, z))
    bound = q * np.abs(s - d) + np.abs(z - m) + 4 * EPS32 * (np.abs(s * q) + np.abs(z))
    return d * q + m, bound


KQUANT_TYPES = ("Q2_K", "Q4_K", "Q5_K")


def check_gguf_export(gguf_path: str | Path, folder: str | Path,
                      expected: Mapping[str, np.ndarray] | None = None) -> Report:
    """Findings gguf.tensors, gguf.exact, gguf.kquant, gguf.fp16 (module docstring)."""
    rep = Report(case=f"gguf {gguf_path}")
    config, tensors = read_checkpoint_tensors(Path(folder), "folder")
    got = gguf_tensors_hf(gguf_path)
    quant_keys = {f"{n}.{s}" for n in config["layers"] for s in QUANT_SUFFIXES}
    missing, inexact, beyond, k_wrong, k_unchecked = [], [], [], [], []
    worst = 0.0
    for name, info in config["layers"].items():
        gname = hf_to_gguf_name(f"{name}.weight")
        if gname not in got:
            missing.append(gname)
            continue
        arr, kind = got[gname]
        if kind in KQUANT_TYPES:
            if expected is None or gname not in expected:
                k_unchecked.append(gname)
            elif not np.array_equal(arr, np.asarray(expected[gname], np.float32)):
                k_wrong.append(gname)
            continue
        layer = packed_layer(tensors, name, info, config["bits"], config["group_size"])
        W_hat = layer.dequantize()
        if kind == "F32":
            want, bound = W_hat.astype(np.float32), EPS32 * np.abs(W_hat)  # one float32 rounding
        else:
            want, bound = fp16_reference(layer)
        if arr.shape != want.shape or not np.array_equal(arr, want):
            inexact.append(gname)
            continue
        err = np.abs(arr.astype(np.float64) - W_hat)
        worst = max(worst, float(err.max(initial=0.0)))
        if (err > bound).any():
            beyond.append(gname)
    for key, arr in tensors.items():
        gname = hf_to_gguf_name(key) if key not in quant_keys else None
        if gname is None:
            continue
        if gname not in got:
            missing.append(gname)
        elif not np.array_equal(got[gname][0], np.asarray(arr, np.float32)):
            inexact.append(gname)
    rep.numbers["tensors"] = float(len(got))
    rep.numbers["max_abs_diff_to_checkpoint"] = worst
    rep.add("gguf.tensors", FAIL if missing else PASS,
            f"{len(missing)} checkpoint tensors missing from the file: {missing[:8]}" if missing
            else f"all {len(got)} tensors present")
    rep.add("gguf.exact", FAIL if inexact else PASS,
            f"{len(inexact)} tensors differ from the checkpoint with fp16 (s, z): {inexact[:8]}" if inexact
            else "every tensor reads back bit for bit as the checkpoint with fp16 (s, z)")
    if k_wrong or not k_unchecked:
        rep.add("gguf.kquant", FAIL if k_wrong else PASS,
                f"{len(k_wrong)} K-quant tensors differ from their solve: {k_wrong[:8]}" if k_wrong
                else "every K-quant tensor reads back bit for bit as its solve (or there are none)")
    else:
        rep.add("gguf.kquant", SKIP, f"{len(k_unchecked)} K-quant tensors not compared: pass expected=")
    rep.add("gguf.fp16", FAIL if beyond else PASS,
            f"{len(beyond)} tensors further from Ŵ than fp16 rounding of (s, z) explains: {beyond[:8]}" if beyond
            else f"within fp16 rounding of (s, z) of the checkpoint's Ŵ (max |ΔŴ| {worst:.3g})", value=worst)
    return rep

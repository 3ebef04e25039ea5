"""External oracle: llama.cpp's Q4_1, through the gguf package's NumPy port of ggml's reference
quantizer (``gguf.quants.Q4_1``).

Q4_1 stores a weight row in blocks of 32 columns as d·q + m, q ∈ {0..15}, d and m float16: the
asymmetric 4-bit format of docs/FORMAT.md with group size 32 (Ŵ = s·q + z, s = d, z = m). A
weight that Q4_1 has rounded therefore lies exactly on such a grid, and every block holds q = 0
(its minimum, at m) and q = 15 (its maximum, at m + 15d). So its H-weighted loss can be zero,
and the zero-loss answer is ggml's own: min-max gives back d and m, rounding gives back q. Every
method (rtn, gptq, decoupleq) must return ggml's integers, d and m on any H; anything else has a
positive loss or encodes the same Ŵ differently (only a constant block, d = 0, has such
freedom: there Ŵ itself is compared, ``ggml.zero_block``).

One exception, by convention rather than by accident: like GPTQ and the official decoupleQ code,
the init widens each group's range to contain 0 (docs/ALGORITHM.md §1). A block lying wholly
above or below 0 then starts on a coarser grid than ggml's, and neither GPTQ rounding nor the
alternation was seen to find ggml's from there (loss / ‖W‖²_H ≈ 5e−4 on such blocks). Those
blocks are reported (``ggml.reach``, info) and left out of the comparison; in SmolLM2-135M none
of the 3.3 million Q4_1 blocks is one of them. The same convention gives an all-zero group the
range [−1, 1], whose asymmetric grid has no level at 0: rtn and gptq leave Ŵ = ±s/2 there
(``ggml.zero_block`` fails), while decoupleQ's float step finds Ŵ = 0.

The default model arrived this way (SmolLM2-135M-Instruct, every linear Q4_1): quantized at bits
4, group 32 it must give back the file's integers, a check of reading, layout and solver against
a format written by others.

    W_hat, q, d, m = q4_1_rounded(W)                 # or gguf_q4_1_tensor(path, "blk.0.attn_q.weight")
    res = quantize_layer(W_hat, H, QuantConfig(bits=4, group_size=32))
    check_q4_1(res, q, d, m).raise_if_failed()
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from decoupleq_ref.model.checkpoint import read_checkpoint
from decoupleq_ref.model.weights import gguf_heads, gguf_to_hf_name, hf_row_order

from .report import FAIL, INFO, PASS, Report, list_groups

BLOCK = 32  # columns per Q4_1 block
BLOCK_BYTES = 20  # float16 d, float16 m, 16 bytes of nibbles


def decode_q4_1(raw: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's Q4_1 bytes, one row of blocks per weight row, → (q (rows, cols) uint8, d, m (rows,
    blocks) float64). In a block's 16 code bytes the low nibbles are its columns 0–15, the high
    nibbles columns 16–31."""
    rows, cols = shape
    if cols % BLOCK:
        raise ValueError(f"shape: Q4_1 rows hold whole blocks of {BLOCK} columns, got {cols} columns")
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if raw.size != rows * (cols // BLOCK) * BLOCK_BYTES:
        raise ValueError(f"raw: {raw.size} bytes do not hold a {rows}×{cols} Q4_1 tensor "
                         f"({rows * (cols // BLOCK) * BLOCK_BYTES} bytes)")
    blocks = raw.reshape(rows, cols // BLOCK, BLOCK_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
    nib = blocks[..., 4:]
    q = np.concatenate([nib & 0x0F, nib >> 4], axis=-1).reshape(rows, cols)
    return q, d, m


def dequantize_q4_1(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """d·q + m per block, in float32 as ggml computes it, returned as float64."""
    d32 = np.repeat(d.astype(np.float32), BLOCK, axis=1)
    m32 = np.repeat(m.astype(np.float32), BLOCK, axis=1)
    return (d32 * q.astype(np.float32) + m32).astype(np.float64)


def q4_1_rounded(W: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Round W (rows, cols; cols a multiple of 32) with gguf's Q4_1 quantizer; returns the
    dequantized weight (float64) and ggml's (q, d, m)."""
    from gguf import GGMLQuantizationType, quants

    W = np.asarray(W, dtype=np.float32)
    if W.ndim != 2:
        raise ValueError(f"W: expected a 2-D weight, got shape {W.shape}")
    raw = quants.quantize(W, GGMLQuantizationType.Q4_1)
    q, d, m = decode_q4_1(raw, W.shape)
    return dequantize_q4_1(q, d, m), q, d, m


def gguf_q4_1_tensor(path: str | Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A Q4_1 tensor of a GGUF file by its GGUF name (e.g. ``blk.0.ffn_down.weight``), as stored:
    (dequantized weight (out, in) float64, q, d, m). Rows are in the file's order (llama.cpp
    permutes attn_q / attn_k rows for its rope layout; blocks run along rows, so each row's codes
    are unaffected)."""
    from gguf import GGMLQuantizationType, GGUFReader

    for t in GGUFReader(str(path)).tensors:
        if t.name == name:
            if t.tensor_type != GGMLQuantizationType.Q4_1:
                raise ValueError(f"name: {name} in {path} is {t.tensor_type.name}, not Q4_1")
            q, d, m = _decode_tensor(t)
            return dequantize_q4_1(q, d, m), q, d, m
    raise ValueError(f"name: {path} has no tensor {name!r}")


def _decode_tensor(t: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cols, rows = (int(n) for n in t.shape[:2])  # ggml order: fastest dimension first
    return decode_q4_1(np.asarray(t.data), (rows, cols))


def check_q4_1(result: Any, q: np.ndarray, d: np.ndarray, m: np.ndarray, *, rtol: float = 1e-6,
               loss_rtol: float = 1e-12, W: np.ndarray | None = None, H: np.ndarray | None = None) -> Report:
    """Does a bits-4, group-32 result on a Q4_1-rounded weight give back ggml's q, d and m?

    Findings: ``ggml.config`` (the result must be bits 4, group 32, asymmetric, no fp16 branch),
    ``ggml.codes`` (equal in every block with d ≠ 0), ``ggml.scale`` (|s − d| ≤ rtol·|d|),
    ``ggml.zero`` (|z − m| ≤ rtol·(|m| + 15|d|), the block's magnitude), and, given W and H,
    ``ggml.loss`` (the result's loss ≤ loss_rtol · Σ_i W_i H W_iᵀ: zero up to rounding), each
    over the blocks (rows, for the loss) whose range contains 0; ``ggml.reach`` lists the others."""
    rep = Report(case="ggml_q4_1")
    cfg = result.config
    if not _config_ok(rep, "ggml.config", cfg.bits, cfg.group_size, cfg.symmetric, cfg.hp_channels):
        return rep
    rows = _compare(rep, "ggml", np.asarray(result.q), result.scale, result.zero, q, d, m, rtol)
    if rows is not None and W is not None and H is not None and rows.any():
        W = np.asarray(W, dtype=np.float64)[rows]
        energy = float(np.einsum("ij,ij->", W @ np.asarray(H, dtype=np.float64), W))  # as check_result's
        loss = float(np.asarray(result.row_loss, dtype=np.float64)[rows].sum())
        ratio = loss / energy if energy > 0 else loss
        rep.numbers["loss_ratio"] = ratio
        rep.add("ggml.loss", PASS if ratio <= loss_rtol else FAIL,
                f"loss / Σ W_i H W_iᵀ = {ratio:.2e} (must be ≤ {loss_rtol:g}: the weight lies on the grid)",
                value=ratio, limit=loss_rtol)
    return rep


def check_checkpoint_q4_1(folder: str | Path, reference: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                          *, rtol: float = 1e-6) -> Report:
    """A W4 g32 checkpoint (docs/FORMAT.md) of a model whose linears were Q4_1, against ggml's
    (q, d, m) per linear (``reference``: HF linear name → arrays, e.g. ``gguf_q4_1_layers``).
    Every reference layer must be in the checkpoint; findings ``ggml.<layer>.codes`` /
    ``.scale`` / ``.zero`` / ``.reach`` as in check_q4_1 (no loss: a checkpoint stores no H)."""
    config, layers = read_checkpoint(Path(folder))
    rep = Report(case=f"checkpoint {folder}")
    solver = config.get("solver", {})
    if not _config_ok(rep, "ggml.config", config["bits"], config["group_size"], solver.get("symmetric", False),
                      solver.get("hp_channels", 0)):
        return rep
    missing = sorted(set(reference) - set(layers))
    if missing:
        rep.add("ggml.layers", FAIL, f"{len(missing)} Q4_1 layers are not in the checkpoint: {missing[:8]}")
    differing = 0
    for name in sorted(set(reference) & set(layers)):
        layer, (q, d, m) = layers[name], reference[name]
        before = len(rep.failures)
        _compare(rep, f"ggml.{name}", layer.codes(), layer.scale, layer.zero, q, d, m, rtol)
        differing += len(rep.failures) > before
    rep.numbers["layers"] = float(len(set(reference) & set(layers)))
    rep.numbers["layers_differing"] = float(differing)
    return rep


def gguf_q4_1_layers(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every Q4_1 linear of a Llama-family GGUF as HF linear name → (q, d, m), rows in the HF
    order transformers loads (attn_q / attn_k rows un-permuted, decoupleq_ref.model.weights)."""
    from gguf import GGMLQuantizationType, GGUFReader

    reader = GGUFReader(str(path))
    n_head, n_kv = gguf_heads(reader)
    out = {}
    for t in reader.tensors:
        hf = gguf_to_hf_name(t.name)
        if t.tensor_type != GGMLQuantizationType.Q4_1 or hf is None or not hf.endswith(".weight"):
            continue
        # the weight reader's row permutation, applied to codes and per-row block parameters alike
        out[hf[: -len(".weight")]] = tuple(hf_row_order(t.name, a, n_head, n_kv) for a in _decode_tensor(t))
    return out


def _config_ok(rep: Report, check: str, bits: int, group_size: int, symmetric: bool, hp_channels: int) -> bool:
    if (bits, group_size, bool(symmetric), hp_channels) != (4, BLOCK, False, 0):
        rep.add(check, FAIL, f"Q4_1 is bits 4, group {BLOCK}, asymmetric, no fp16 branch; the result is bits "
                f"{bits}, group {group_size}, symmetric={symmetric}, hp_channels={hp_channels}")
        return False
    rep.add(check, PASS, f"bits 4, group {BLOCK}, asymmetric")
    return True


def _compare(rep: Report, where: str, rq: np.ndarray, s: np.ndarray, z: np.ndarray, q: np.ndarray, d: np.ndarray,
             m: np.ndarray, rtol: float) -> np.ndarray | None:
    """Codes, scales and zeros against ggml's on the blocks whose range contains 0 (findings
    ``{where}.codes`` ...); returns the rows whose blocks all take part (None on a shape error)."""
    s = np.asarray(s, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64)
    if rq.shape != q.shape or s.shape != d.shape or z.shape != m.shape:
        rep.add(f"{where}.shape", FAIL, f"result q {rq.shape}, scale {s.shape}, zero {z.shape}; ggml's are "
                f"{q.shape}, {d.shape}, {m.shape}")
        return None
    lo = m.astype(np.float32)
    reach = (lo <= 0) & (lo + 15 * d.astype(np.float32) >= 0)
    if not reach.all():
        pairs = list(zip(*np.nonzero(~reach)))
        rep.add(f"{where}.reach", INFO, f"{len(pairs)} blocks lie wholly above or below 0, where the init's range "
                f"(widened to contain 0) cannot start on ggml's grid; not compared: {list_groups(pairs)}",
                groups=pairs)
    live = (d != 0) & reach
    block_differs = (rq.reshape(*d.shape, BLOCK) != q.reshape(*d.shape, BLOCK)).any(axis=2) & live
    _add(rep, f"{where}.codes", block_differs, f"codes equal to ggml's in all {int(live.sum())} compared blocks",
         "blocks whose codes differ from ggml's")
    _add(rep, f"{where}.scale", (np.abs(s - d) > rtol * np.abs(d)) & live, f"scale = d to {rtol:g} relative",
         f"blocks whose scale is not d to {rtol:g} relative")
    _add(rep, f"{where}.zero", (np.abs(z - m) > rtol * (np.abs(m) + 15 * np.abs(d))) & live,
         f"zero = m to {rtol:g} relative", "blocks whose zero is not m")
    # a constant block (d = 0) in reach is all zeros: any encoding of Ŵ = 0 is ggml's answer
    flat = (d == 0) & reach
    if flat.any():
        W_hat = s[..., None] * rq.reshape(*d.shape, BLOCK) + z[..., None]
        off = (np.abs(W_hat).max(axis=2) > rtol * np.abs(s) * 15) & flat
        _add(rep, f"{where}.zero_block", off, f"Ŵ = 0 on all {int(flat.sum())} all-zero blocks",
             "all-zero blocks whose Ŵ is not 0")
    rep.numbers["blocks_differing"] = rep.numbers.get("blocks_differing", 0.0) + float(block_differs.sum())
    return reach.all(axis=1)


def _add(rep: Report, check: str, bad: np.ndarray, ok_msg: str, bad_msg: str) -> None:
    pairs = list(zip(*np.nonzero(bad)))
    if pairs:
        rep.add(check, FAIL, f"{len(pairs)} {bad_msg}: {list_groups(pairs)}", groups=pairs,
                rows=sorted({int(r) for r, _ in pairs}))
    else:
        rep.add(check, PASS, ok_msg)

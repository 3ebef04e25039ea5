"""The layers check_kernel runs on: built-in ones at deployment shapes, any OUTxIN, or a layer
of a user's checkpoint.

The default battery crosses every tile and chunk boundary a real kernel has: 263 = 2·128 + 7
output rows (a 64- or 128-row tile that reuses tile 0's scales or codes shows on rows 64…262,
and the odd remainder on a partial last tile), 4096 input columns (a split-K kernel that
restarts its group index in every 256-, 512- or 1024-column chunk shows from column 256 on) at
groups 32, 64, 128 and per-channel; plus a small odd-shaped layer whose rows are padded to a
32-bit word, and with ``hp`` one with a 3-column fp16 branch.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from decoupleq_ref.format import effective_group_size
from decoupleq_ref.matmul import PackedLayer
from decoupleq_ref.model.checkpoint import read_checkpoint
from decoupleq_ref.packing import pack

DEPLOY_ROWS, DEPLOY_COLS = 2 * 128 + 7, 4096
DEPLOY_GROUPS = (32, 64, 128, -1)


def random_layer(out: int, n_in: int, bits: int = 2, group_size: int = 64, seed: int = 0,
                 hp_channels: int = 0) -> PackedLayer:
    """A PackedLayer with uniform random codes (every value used), distinct positive scales and
    signed zeros per group (so a mis-assigned group is visible), optional fp16 branch."""
    rng = np.random.default_rng(seed)
    g = effective_group_size(n_in, group_size)
    G = n_in // g
    q = rng.integers(0, 1 << bits, size=(out, n_in), dtype=np.uint8)
    q[:, 0], q[:, -1] = 0, (1 << bits) - 1
    scale = (0.01 * rng.uniform(0.5, 1.5, size=(out, G))).astype(np.float32)
    zero = (-scale * ((1 << bits) - 1) / 2 + 0.005 * rng.standard_normal((out, G))).astype(np.float32)
    branch: tuple[Any, Any] = (None, None)
    if hp_channels:
        idx = np.sort(rng.choice(n_in, size=hp_channels, replace=False)).astype(np.int32)
        branch = (idx, (0.05 * rng.standard_normal((out, hp_channels))).astype(np.float16))
    return PackedLayer(pack(q, bits), scale, zero, bits, group_size, (out, n_in), *branch)


def group_name(group_size: int) -> str:
    return "pc" if group_size == -1 else f"g{group_size}"


def shape_layers(out: int, n_in: int, bits: int, group_sizes: tuple[int, ...],
                 seed: int = 10) -> list[tuple[str, PackedLayer]]:
    """One random layer of shape (out, n_in) per group size (those that divide n_in)."""
    layers = []
    for k, g in enumerate(group_sizes):
        if g != -1 and (g < 1 or n_in % g):
            continue
        layers.append((f"{out}x{n_in}_{group_name(g)}", random_layer(out, n_in, bits, g, seed=seed + k)))
    if not layers:
        raise ValueError(f"group_size: none of {list(group_sizes)} divides in = {n_in} (use -1 for per-channel)")
    return layers


def default_layers(bits: int = 2, hp: bool = False,
                   group_sizes: tuple[int, ...] = DEPLOY_GROUPS) -> list[tuple[str, PackedLayer]]:
    """The deployment battery (module doc): 263x4096 at each group size, an odd 7x40 g8 layer
    (rows padded to a 32-bit word); with ``hp`` also a 12x64 g32 layer with a 3-column branch."""
    layers = shape_layers(DEPLOY_ROWS, DEPLOY_COLS, bits, group_sizes, seed=1)
    layers.append(("odd_7x40_g8", random_layer(7, 40, bits, 8, seed=2)))
    if hp:
        layers.append(("hp3_12x64_g32", random_layer(12, 64, bits, 32, seed=4, hp_channels=3)))
    return layers


def parse_shape(text: str) -> tuple[int, int]:
    """'OUTxIN' (e.g. '4096x11008') -> (out, in)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(f"shape: {text!r} is not OUTxIN with positive integers, e.g. 4096x11008")
    return int(m.group(1)), int(m.group(2))


def checkpoint_layer(spec: str) -> tuple[str, PackedLayer]:
    """'CKPT_DIR:LAYER_NAME' -> (name, the checkpoint's PackedLayer), read with read_checkpoint."""
    folder, sep, name = spec.rpartition(":")
    if not sep or not folder or not name:
        raise ValueError(f"layer: {spec!r} is not CKPT_DIR:LAYER_NAME (e.g. qmodel/:model.layers.0.mlp.down_proj)")
    if not Path(folder).is_dir():
        raise ValueError(f"layer: {folder} is not a checkpoint directory")
    try:
        _, layers = read_checkpoint(Path(folder))
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"layer: cannot read the checkpoint {folder} ({type(e).__name__}: {e})") from None
    if name not in layers:
        near = [n for n in layers if name.split(".")[-1] in n][:5] or list(layers)[:5]
        raise ValueError(f"layer: {name!r} is not a quantized layer of {folder}; e.g. {near}")
    return name, layers[name]

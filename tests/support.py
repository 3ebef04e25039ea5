"""Paths and builders the tests share. Importable from every test folder: tests/conftest.py puts
this folder on sys.path."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import decoupleq_ref as dq
from decoupleq_ref.model.checkpoint import CheckpointWriter, stored_layer

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"  # the project workspace's text; a plain clone has none
CALIB_TEXT = SHARED_DATA / "wikitext-2" / "valid.txt"
EVAL_TEXT = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"


def project_checkpoint(folder: Path, hp: int = 0) -> Path:
    """A finished two-layer W2 g8 checkpoint of this project's format in ``folder`` (hp: fp16
    branch columns); 40 input columns, so every row has 2 bytes of padding after its codes."""
    cfg = dq.QuantConfig(bits=2, group_size=8, grid=20, iters=1, hp_channels=hp)
    header = {"command": "test", "bits": 2, "group_size": 8, "solver": cfg.to_dict()}
    writer = CheckpointWriter(folder, header)
    infos = {}
    for i, name in enumerate(["blocks.0.attn", "blocks.0.mlp"]):
        W, H = dq.synthetic_layer(8, 40, seed=i)  # 40 columns: 10 bytes of codes + 2 padding per row
        tensors, info = stored_layer(name, dq.quantize_layer(W, H, cfg), W, H, transposed=False)
        writer.commit(name, tensors, info)
        infos[name] = writer.load(name)[1]
    writer.finalize(list(infos), {"norm.weight": np.ones(40, np.float32)}, infos)
    return folder

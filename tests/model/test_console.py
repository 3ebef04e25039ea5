"""One progress display, ours: the model commands' stderr carries our lines (progress.log, a plain
line a minute when stderr is not a terminal) and no other library's progress bar — not
transformers' weight-loading, GGUF-converting or shard-writing bars. Tiny models, real processes
(a bar is drawn by the process, so CliRunner would not see it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

from decoupleq_ref.model.tiny import save_random_stats, save_tiny  # noqa: E402

from support import REPO  # noqa: E402
#: what a tqdm bar (or transformers' named bars) leaves in a log
FOREIGN_BAR = re.compile(r"\d+%\||it/s\]|s/it\]|Converting and de-quantizing|Writing model shards|Loading weights")


def decoupleq(*args, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI in a fresh process, stderr a pipe (not a terminal), this tree first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", "from decoupleq_ref.cli import app; app()", *map(str, args)],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return res


def test_quiet_transformers_silences_the_gguf_loaders_own_bar(capfd):
    """transformers' GGUF loader draws a raw tqdm bar outside its own progress switch; after
    quiet_transformers() it draws nothing and still yields every item."""
    pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    import transformers.modeling_gguf_pytorch_utils as loader

    from decoupleq_ref.model.torch_model import quiet_transformers

    quiet_transformers()
    quiet_transformers()  # idempotent: not wrapped twice
    assert list(loader.tqdm(range(5), desc="Converting and de-quantizing GGUF tensors...")) == list(range(5))
    assert not FOREIGN_BAR.search(capfd.readouterr().err)


def test_model_commands_print_no_foreign_progress_bars(tmp_path):
    """calibrate of a safetensors model, run on a GGUF model (written by export), eval of its
    checkpoint: every stderr line is ours."""
    src = save_tiny(tmp_path / "src", "llama")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(np.random.default_rng(0).choice(["a", "layer", "of", "bits", "."], 2000)))
    save_random_stats(src, tmp_path / "stats")
    decoupleq("quantize", src, "--stats", tmp_path / "stats", "--out", tmp_path / "q", "--bits", 4,
              "--group-size", 32, "--method", "rtn", "--backend", "numpy", cwd=tmp_path)
    decoupleq("export", tmp_path / "q", "--gguf", tmp_path / "m.gguf", cwd=tmp_path)
    runs = [decoupleq("calibrate", src, "--text", text, "--nsamples", 2, "--seqlen", 32, "--out", tmp_path / "st",
                      "--device", "cpu", cwd=tmp_path),
            decoupleq("run", tmp_path / "m.gguf", "--text", text, "--nsamples", 2, "--seqlen", 32, "--bits", 4,
                      "--group-size", 32, "--backend", "numpy", "--block-epochs", 1, "--out", tmp_path / "qr",
                      "--device", "cpu", "--format", "gguf", cwd=tmp_path),
            decoupleq("eval", tmp_path / "m.gguf", "--quantized", tmp_path / "qr", "--text", text, "--seqlen", 32,
                      "--max-tokens", 128, "--device", "cpu", cwd=tmp_path)]
    assert "wrote" in runs[1].stderr  # our own lines do reach stderr
    assert (tmp_path / "qr" / "model.gguf").is_file()  # run --format gguf
    for res in runs:
        assert not FOREIGN_BAR.search(res.stderr), res.stderr

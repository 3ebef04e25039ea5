"""`decoupleq run` (true-sequential + block-wise stage), `eval --json` and `demo` on a tiny
random Llama built from a config; resume after an interruption gives the same bytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from decoupleq_ref.cli import app  # noqa: E402
from decoupleq_ref.model.checkpoint import CONFIG_NAME, PARTIAL, read_checkpoint, unit_file  # noqa: E402
from decoupleq_ref.model.tiny import save_tiny  # noqa: E402
from test_pipeline import (cli, flat, interrupting_solver, kill_then_resume, runner, text,  # noqa: E402,F401
                           tree_bytes)

RUN = ("--nsamples", "4", "--seqlen", "32", "--bits", "2", "--group-size", "32", "--backend", "numpy")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama", seed=1)


def test_run_blockwise_eval(llama, text, tmp_path):
    """The block-wise stage reports its loss before/after per block and never keeps a worse
    state; the checkpoint reloads and evaluates (JSON keys), KL to float is small and positive."""
    cli("run", llama, "--text", text, *RUN, "--block-epochs", "2", "--block-lr", "1e-4", "--out", tmp_path / "q")
    config, layers = read_checkpoint(tmp_path / "q")
    assert len(layers) == 14 and config["command"] == "run"
    stages = config["blockwise"]
    assert [s["block"] for s in stages] == [0, 1]
    for s in stages:
        assert s["steps"] == 2 * 4 and s["loss_before"] > 0
        assert (s["kept"] == "trained") == (s["loss_after"] < s["loss_before"])
    assert any(s["kept"] == "trained" for s in stages)
    res = cli("eval", llama, "--quantized", tmp_path / "q", "--text", text, "--seqlen", "32", "--max-tokens",
              "256", "--json")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["tokens"] == 8 * 31 and r["seqlen"] == 32 and r["windows"] == 8
    assert 0 < r["kl"] < 0.5 and np.isfinite(r["perplexity"])
    fp = json.loads(cli("eval", llama, "--text", text, "--seqlen", "32", "--max-tokens", "256", "--json")
                    .stdout.strip().splitlines()[-1])
    assert "kl" not in fp and fp["tokens"] == r["tokens"] and fp["perplexity"] != r["perplexity"]
    assert np.isclose(fp["perplexity"], r["reference_perplexity"], rtol=1e-6)


def test_run_with_an_fp16_branch(llama, text, tmp_path):
    """--hp-channels on `run`: every layer stores its branch, the block-wise stage trains (s, z)
    around the frozen branch (its QuantLinear is Ŵ = s·q + z + B on the branch columns, the
    stored layer exactly), and the checkpoint evaluates."""
    import torch

    from decoupleq_ref.model.blockwise import QuantLinear

    cli("run", llama, "--text", text, *RUN, "--hp-channels", "3", "--block-epochs", "2", "--block-lr", "1e-4",
        "--out", tmp_path / "q")
    config, layers = read_checkpoint(tmp_path / "q")
    assert config["solver"]["hp_channels"] == 3 and len(layers) == 14
    for name, packed in layers.items():
        assert config["layers"][name]["hp_channels"] == 3 and packed.hp_weight.shape == (packed.shape[0], 3)
        module = QuantLinear(packed.codes(), packed.scale, packed.zero, None, (packed.hp_index, packed.hp_weight))
        with torch.no_grad():
            np.testing.assert_allclose(module.weight_hat().numpy(), packed.dequantize(), rtol=1e-6, atol=1e-6)
    assert any(s["kept"] == "trained" for s in config["blockwise"])
    r = json.loads(cli("eval", llama, "--quantized", tmp_path / "q", "--text", text, "--seqlen", "32",
                       "--max-tokens", "256", "--json").stdout.strip().splitlines()[-1])
    assert 0 < r["kl"] < 0.5


def test_run_resume_is_byte_identical(llama, text, tmp_path, monkeypatch):
    """Killed in block 1 (after 9 of 14 layer solves), the same command completes a checkpoint
    byte-identical to an uninterrupted run's, block-wise training included."""
    import decoupleq_ref.cli_model as cm

    args = ("run", llama, "--text", text, *RUN, "--block-epochs", "1", "--block-lr", "1e-4")
    left = kill_then_resume(args, tmp_path, monkeypatch, cm, "get_solver", lambda name=None: interrupting_solver(9))
    assert left == [unit_file("block.0000")]
    res = cli(*args, "--out", tmp_path / "cut")  # repeated: nothing to do, nothing changed
    assert "nothing to do" in flat(res.output) and tree_bytes(tmp_path / "cut") == tree_bytes(tmp_path / "ref")


def test_run_needs_a_decoder_and_a_long_enough_text(text, tmp_path):
    gpt2 = save_tiny(tmp_path / "gpt2", "gpt2")
    res = cli("run", gpt2, "--text", text, *RUN, "--out", tmp_path / "q", ok=False)
    assert res.exit_code == 2 and "Llama-family decoder" in flat(res.output)
    llama = save_tiny(tmp_path / "llama", "llama")
    short = tmp_path / "short.txt"
    short.write_text("a b c")
    for command in (("run", llama, "--text", short, *RUN), ("eval", llama, "--text", short, "--seqlen", "32")):
        res = cli(*command, "--out", tmp_path / "q", ok=False) if command[0] == "run" else cli(*command, ok=False)
        assert res.exit_code == 2 and "shorter than one window" in flat(res.output)
    assert not (tmp_path / "q" / CONFIG_NAME).exists()


def test_demo_on_a_given_model(llama, text, tmp_path):
    """`demo MODEL` runs the whole job (W2 g64 needs in % 64 == 0: the tiny model has 64/128)."""
    res = cli("demo", llama, "--calib-text", text, "--eval-text", text, "--nsamples", "2", "--seqlen", "32",
              "--eval-tokens", "128", "--block-epochs", "1", "--backend", "numpy", "--out", tmp_path / "demo")
    out = flat(res.output)
    assert "float32" in out and "W2 g64 decoupleQ" in out and "KL to float" in out and "block-wise stage" in out
    assert read_checkpoint(tmp_path / "demo")[0]["group_size"] == 64


def test_device_option(llama, text, tmp_path):
    """--device: cpu gives the same checkpoint as auto on a machine without a GPU; a device torch
    cannot use is refused with exit 2 naming the option, before any work."""
    import torch

    args = ("run", llama, "--text", text, *RUN, "--block-epochs", "1", "--block-lr", "1e-4")
    cli(*args, "--device", "cpu", "--out", tmp_path / "cpu")
    assert read_checkpoint(tmp_path / "cpu")[0]["torch_device"] == "cpu"
    bad = [("tpu", "not a device"), ("meta", "not supported")]
    if torch.cuda.is_available():
        bad.append((f"cuda:{torch.cuda.device_count()}", "GPU(s)"))
    else:
        cli(*args, "--out", tmp_path / "auto")
        assert tree_bytes(tmp_path / "auto") == tree_bytes(tmp_path / "cpu")
        bad.append(("cuda", "torch sees no GPU"))
    for device, message in bad:
        for command in (("run", *args[1:], "--out", tmp_path / "bad"), ("eval", llama, "--text", text),
                        ("calibrate", llama, "--text", text, "--out", tmp_path / "bad")):
            res = cli(*command, "--device", device, ok=False)
            assert res.exit_code == 2 and "--device" in flat(res.output) and message in flat(res.output), res.output
    assert not (tmp_path / "bad").exists()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_run_on_a_gpu_matches_the_cpu(llama, text, tmp_path):
    """On a GPU machine: `run --device cuda` (twice: the same bytes) against `--device cpu` — the
    same integers wherever the layer's H agrees, layer losses and perplexity to 1e-3."""
    args = ("run", llama, "--text", text, *RUN, "--block-epochs", "2", "--block-lr", "1e-4")
    for name, device in (("cpu", "cpu"), ("gpu", "cuda"), ("gpu2", "cuda")):
        cli(*args, "--device", device, "--out", tmp_path / name)
    from validate.compare import compare_checkpoints

    assert tree_bytes(tmp_path / "gpu") == tree_bytes(tmp_path / "gpu2")
    assert read_checkpoint(tmp_path / "gpu")[0]["torch_device"] == "cuda"
    agree = compare_checkpoints(tmp_path / "cpu", tmp_path / "gpu")
    assert agree.codes_equal_min > 0.99 and 1 - 1e-3 < agree.loss_ratio_min <= agree.loss_ratio_max < 1 + 1e-3
    ev = [json.loads(cli("eval", llama, "--quantized", tmp_path / n, "--text", text, "--seqlen", "32", "--max-tokens",
                         "256", "--json", "--device", d).stdout.strip().splitlines()[-1])
          for n, d in (("cpu", "cpu"), ("gpu", "cuda"))]
    assert ev[1]["device"] == "cuda" and np.isclose(ev[0]["perplexity"], ev[1]["perplexity"], rtol=1e-3)


def test_out_of_memory_is_a_clear_error_and_resumable(llama, text, tmp_path, monkeypatch):
    """GPU (torch.cuda.OutOfMemoryError, matched by name) or host memory running out in block 1 →
    exit 1 with a hint, block 0 kept, no finished checkpoint; the same command then completes.
    Any other RuntimeError is a bug and is not dressed up."""
    import decoupleq_ref.model.sequential as seq

    class OutOfMemoryError(RuntimeError):
        pass

    real = seq.train_block
    args = ("run", llama, "--text", text, *RUN, "--block-epochs", "1", "--block-lr", "1e-4", "--out", tmp_path / "q")
    for error, shown in ((OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out of GPU memory"),
                         (MemoryError(), "out of host memory")):
        def failing(*a, error=error, **kw):
            if a[-2] == 1:  # train_block(..., seed + block index, times): block 1
                raise error
            return real(*a, **kw)

        monkeypatch.setattr(seq, "train_block", failing)
        res = cli(*args, ok=False)
        assert res.exit_code == 1 and shown in flat(res.output) and "--nsamples" in flat(res.output), res.output
        assert not (tmp_path / "q" / CONFIG_NAME).exists()
        assert [p.name for p in (tmp_path / "q" / PARTIAL).glob("*.safetensors")] == [unit_file("block.0000")]
    monkeypatch.setattr(seq, "train_block", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    monkeypatch.setattr(seq, "train_block", real)
    cli(*args)
    assert read_checkpoint(tmp_path / "q")[0]["command"] == "run"

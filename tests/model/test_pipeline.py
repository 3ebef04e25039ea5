"""Model pipeline on tiny random models built from configs: calibrate → quantize →
checkpoint → reload, resume after an interruption, clear errors. SmolLM2 only in the last test."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

from typer.testing import CliRunner  # noqa: E402

from decoupleq_ref import layer_loss  # noqa: E402
from decoupleq_ref.cli import app  # noqa: E402
from decoupleq_ref.model import atomic  # noqa: E402
from decoupleq_ref.model.checkpoint import CONFIG_NAME, PARTIAL, WEIGHTS_NAME, read_checkpoint  # noqa: E402
from decoupleq_ref.model.stats import CalibrationStats  # noqa: E402
from decoupleq_ref.model.tiny import save_tiny  # noqa: E402

from support import CALIB_TEXT, EVAL_TEXT, REPO  # noqa: E402,F401
runner = CliRunner()


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    """A few KB of real text when the shared data is there, else generated words (same role)."""
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    if CALIB_TEXT.exists():
        path.write_text(CALIB_TEXT.read_text(encoding="utf-8")[:20000])
    else:
        rng = np.random.default_rng(0)
        words = ["the", "model", "weight", "of", "a", "layer", "is", "quantized", "to", "two", "bits", "."]
        path.write_text(" ".join(rng.choice(words, 4000)))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """arch → saved tiny model folder (built once per module)."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny(root / arch, arch) for arch in ("llama", "gpt2", "bert")}


def flat(output: str) -> str:
    """CLI output without rich's box drawing and line wrapping."""
    return " ".join(output.replace("│", " ").split())


def cli(*args: str, ok: bool = True):
    res = runner.invoke(app, [str(a) for a in args])
    if ok and res.exit_code != 0:
        raise AssertionError(f"exit {res.exit_code}: {res.output}") from res.exception
    return res


def calibrate(model: Path, text: Path, out: Path, nsamples: int = 4, seqlen: int = 32) -> Path:
    cli("calibrate", model, "--text", text, "--nsamples", nsamples, "--seqlen", seqlen, "--out", out)
    return out


def quantize(model: Path, stats: Path, out: Path, *extra: str):
    return cli("quantize", model, "--stats", stats, "--out", out, "--backend", "numpy", *extra)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_calibrate_quantize_reload(arch, tiny, text, tmp_path):
    """Every linear (GPT-2 Conv1D included) gets H, a packed layer whose stored loss is the loss
    of its dequantized float32 weights, and reloads into transformers with exactly those weights."""
    import torch

    from decoupleq_ref.model.torch_model import find_linears, layer_matrix, load_model, load_quantized
    from decoupleq_ref.model.weights import read_weights
    from decoupleq_ref.model.source import resolve_model

    stats = CalibrationStats.load(calibrate(tiny[arch], text, tmp_path / "stats"))
    fp, _ = load_model(resolve_model(tiny[arch]))
    assert set(stats.layers) == set(find_linears(fp)) and stats.info["tokens"] == 4 * 32
    for name, H in stats.hessians.items():
        assert H.dtype == np.float64 and np.allclose(H, H.T) and np.linalg.eigvalsh(H).min() > -1e-6 * np.abs(H).max()  # float32 products (calibrate.gram)
    quantize(tiny[arch], tmp_path / "stats", tmp_path / "q", "--bits", "3", "--group-size", "32")
    config, layers = read_checkpoint(tmp_path / "q")
    assert config["bits"] == 3 and config["group_size"] == 32 and set(layers) == set(stats.layers)
    weights = read_weights(resolve_model(tiny[arch]))
    for name, packed in layers.items():
        W = weights[f"{name}.weight"].astype(np.float64)
        W = W.T if stats.layers[name]["transposed"] else W
        assert packed.scale.dtype == np.float32 and packed.codes().max() <= 7
        assert np.isclose(config["layers"][name]["loss"], layer_loss(W, packed.dequantize(), stats.hessians[name]))
    q, _ = load_model(resolve_model(tiny[arch]))
    load_quantized(q, tmp_path / "q")
    mods = find_linears(q)
    for name, packed in layers.items():
        assert np.array_equal(layer_matrix(mods[name]), packed.dequantize().astype(np.float32).astype(np.float64))
    q_state, fp_state = q.state_dict(), fp.state_dict()
    quantized = {f"{n}.weight" for n in layers}
    for k, v in fp_state.items():
        if k not in quantized:
            assert torch.equal(q_state[k], v), k


def test_fp16_branch_stored_and_reloaded(tiny, text, tmp_path):
    """--hp-channels: hp_index / hp_weight are in the checkpoint and in the reloaded weights."""
    calibrate(tiny["llama"], text, tmp_path / "stats")
    quantize(tiny["llama"], tmp_path / "stats", tmp_path / "q", "--hp-channels", "4", "--method", "gptq")
    config, layers = read_checkpoint(tmp_path / "q")
    for name, packed in layers.items():
        assert packed.hp_channels == 4 and packed.hp_index.dtype == np.int32 and packed.hp_weight.dtype == np.float16
        assert config["layers"][name]["hp_channels"] == 4
    plain = packed.dequantize_packed()
    assert not np.allclose(plain, packed.dequantize())


def test_improved_solver_option(tiny, text, tmp_path):
    """--solver improved: the checkpoint records the preset and every layer's objective is at most
    the official settings' (start 0 of the improved solve is the official path; the rest only descends)."""
    from decoupleq_ref.config import IMPROVED

    calibrate(tiny["llama"], text, tmp_path / "stats")
    quantize(tiny["llama"], tmp_path / "stats", tmp_path / "official", "--bits", "2", "--group-size", "-1")
    quantize(tiny["llama"], tmp_path / "stats", tmp_path / "improved", "--bits", "2", "--group-size", "-1",
             "--solver", "improved")
    official, improved = read_checkpoint(tmp_path / "official")[0], read_checkpoint(tmp_path / "improved")[0]
    assert all(improved["solver"][k] == v for k, v in IMPROVED.items())
    assert all(official["solver"][k] != v for k, v in IMPROVED.items())
    gains = [improved["layers"][n]["objective"] / official["layers"][n]["objective"] for n in official["layers"]]
    assert max(gains) <= 1 + 1e-9 and min(gains) < 1, gains
    res = cli("quantize", tiny["llama"], "--stats", tmp_path / "stats", "--solver", "best", ok=False)
    assert res.exit_code == 2 and "--solver" in flat(res.output)


def test_quantize_never_imports_torch(tiny, text, tmp_path):
    """`decoupleq quantize` (HF safetensors directory) runs with torch absent from sys.modules."""
    calibrate(tiny["llama"], text, tmp_path / "stats")
    code = ("import sys\nfrom decoupleq_ref.cli import app\n"
            "try:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
            "assert not bad, bad\nprint('no torch')\n")
    args = ["quantize", str(tiny["llama"]), "--stats", str(tmp_path / "stats"), "--out", str(tmp_path / "q"),
            "--backend", "numpy", "--method", "rtn"]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "no torch" in done.stdout, done.stderr[-2000:]
    assert (tmp_path / "q" / CONFIG_NAME).exists()


class Interrupt(BaseException):
    """Stands for a kill: not an Exception, so nothing on the way catches it."""


def interrupting_solver(after: int, error: type[BaseException] = Interrupt):
    from decoupleq_ref.backends import get_solver

    solve, calls = get_solver("numpy"), []

    def wrapped(W, H, cfg):
        if len(calls) == after:
            raise error
        calls.append(1)
        return solve(W, H, cfg)
    return wrapped


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def kill_then_resume(args: tuple, tmp_path: Path, monkeypatch, target: object, name: str, replacement) -> list[str]:
    """Run ``args`` to ``tmp_path/ref``; run it again to ``tmp_path/cut`` with ``target.name``
    replaced (it raises Interrupt somewhere inside), check nothing finished, resume with the same
    command and check the bytes equal the uninterrupted run's. Returns the committed unit files
    the kill left."""
    cli(*args, "--out", tmp_path / "ref")
    with monkeypatch.context() as m:
        m.setattr(target, name, replacement)
        with pytest.raises(Interrupt):
            runner.invoke(app, [str(a) for a in (*args, "--out", tmp_path / "cut")], catch_exceptions=False)
    assert not (tmp_path / "cut" / CONFIG_NAME).exists()
    left = sorted(p.name for p in (tmp_path / "cut" / PARTIAL).glob("*.safetensors"))
    cli(*args, "--out", tmp_path / "cut")
    assert tree_bytes(tmp_path / "cut") == tree_bytes(tmp_path / "ref")
    return left


def test_quantize_resume_is_byte_identical(tiny, text, tmp_path, monkeypatch):
    """Interrupted after 5 layers, the same command finishes the run: byte-identical files to an
    uninterrupted run, and the interrupted folder never looks like a finished checkpoint."""
    import decoupleq_ref.cli_model as cm

    calibrate(tiny["llama"], text, tmp_path / "stats")
    args = ("--bits", "2", "--group-size", "32")
    quantize(tiny["llama"], tmp_path / "stats", tmp_path / "ref", *args)
    with monkeypatch.context() as m:
        m.setattr(cm, "get_solver", lambda name=None: interrupting_solver(5))
        with pytest.raises(Interrupt):
            runner.invoke(app, ["quantize", str(tiny["llama"]), "--stats", str(tmp_path / "stats"), "--out",
                                str(tmp_path / "cut"), "--backend", "numpy", *args], catch_exceptions=False)
    assert not (tmp_path / "cut" / CONFIG_NAME).exists()
    assert len(list((tmp_path / "cut" / PARTIAL).glob("*.safetensors"))) == 5
    with pytest.raises(ValueError, match="not a finished checkpoint"):
        read_checkpoint(tmp_path / "cut")
    quantize(tiny["llama"], tmp_path / "stats", tmp_path / "cut", *args)
    assert tree_bytes(tmp_path / "cut") == tree_bytes(tmp_path / "ref")


def test_resume_refuses_other_settings(tiny, text, tmp_path, monkeypatch):
    """An unfinished run is resumed only by the same settings; a foreign folder needs --overwrite."""
    import decoupleq_ref.cli_model as cm

    calibrate(tiny["llama"], text, tmp_path / "stats")
    with monkeypatch.context() as m:
        m.setattr(cm, "get_solver", lambda name=None: interrupting_solver(2))
        with pytest.raises(Interrupt):
            runner.invoke(app, ["quantize", str(tiny["llama"]), "--stats", str(tmp_path / "stats"), "--out",
                                str(tmp_path / "cut"), "--backend", "numpy"], catch_exceptions=False)
    res = cli("quantize", tiny["llama"], "--stats", tmp_path / "stats", "--out", tmp_path / "cut",
              "--backend", "numpy", "--bits", "3", ok=False)
    assert res.exit_code == 2 and "other settings" in flat(res.output)
    res = cli("quantize", tiny["llama"], "--stats", tmp_path / "stats", "--out", tmp_path, ok=False)
    assert res.exit_code == 2 and "--overwrite" in flat(res.output)


def test_clear_errors(tiny, text, tmp_path):
    """Bad input → exit 2 with a message naming the argument; nothing left looking complete."""
    short = tmp_path / "short.txt"
    short.write_text("too short")
    alien = tmp_path / "alien"
    alien.mkdir()
    (alien / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    cases = [
        (("calibrate", alien, "--text", text, "--out", tmp_path / "s"), "unsupported"),
        (("calibrate", tmp_path / "nope", "--text", text, "--out", tmp_path / "s"), "does not exist"),
        (("calibrate", short, "--text", text, "--out", tmp_path / "s"), "not a .gguf"),
        (("calibrate", tmp_path, "--text", text, "--out", tmp_path / "s"), "no config.json"),
        (("calibrate", tiny["llama"], "--text", short, "--seqlen", "64", "--out", tmp_path / "s"),
         "shorter than one window"),
        (("calibrate", tiny["llama"], "--text", tmp_path / "missing.txt", "--out", tmp_path / "s"), "--text"),
        (("quantize", tiny["llama"], "--stats", tmp_path / "nostats", "--out", tmp_path / "q"), "stats.json"),
        (("quantize", tiny["llama"], "--stats", tmp_path, "--group-size", "0"), "--group-size"),
        (("eval", tiny["llama"], "--quantized", tmp_path / "q", "--text", text), "not a directory"),
        (("eval", tiny["bert"], "--text", text, "--seqlen", "16"), "not a causal language model"),
    ]
    for args, message in cases:
        res = cli(*args, ok=False)
        assert res.exit_code == 2, (args, res.output)
        assert message in flat(res.output), (args, res.output)
    assert not (tmp_path / "s").exists() and not (tmp_path / "q" / CONFIG_NAME).exists()
    from decoupleq_ref.model.checkpoint import CheckpointWriter

    with pytest.raises(ValueError, match="--out: .* is a file"):
        CheckpointWriter(short, {"command": "quantize"})


def test_cuda_backend_without_a_gpu_is_a_clear_error(tiny, text, tmp_path):
    from decoupleq_ref.backends import backend_runnable

    if backend_runnable("cuda"):
        pytest.skip("a CUDA GPU (or the CUDA simulator) is here: --backend cuda runs")
    calibrate(tiny["llama"], text, tmp_path / "stats")
    res = cli("quantize", tiny["llama"], "--stats", tmp_path / "stats", "--backend", "cuda", "--out", tmp_path / "q",
              ok=False)
    assert res.exit_code == 2 and "'cuda' is not available on this machine" in flat(res.output), res.output
    assert "--backend numpy" in flat(res.output) and not (tmp_path / "q").exists()


def test_compare_checkpoints(tiny, text, tmp_path):
    """validate.compare_checkpoints: a repeated quantize agrees with itself exactly; gptq (B)
    against decoupleq (A) differs in codes, with the loss ratio B/A (as in `compare`) read from
    the two configs; checkpoints of another bit width are refused, not compared."""
    from validate.compare import compare_checkpoints

    stats = calibrate(tiny["llama"], text, tmp_path / "stats")
    for name, extra in (("a", ()), ("a2", ()), ("gptq", ("--method", "gptq")), ("w3", ("--bits", "3"))):
        quantize(tiny["llama"], stats, tmp_path / name, *extra)
    same = compare_checkpoints(tmp_path / "a", tmp_path / "a2")
    assert same.codes_equal_min == 1.0 and same.loss_ratio_min == same.loss_ratio_max == 1.0
    other = compare_checkpoints(tmp_path / "a", tmp_path / "gptq")
    cfg_g, cfg_a = read_checkpoint(tmp_path / "gptq")[0], read_checkpoint(tmp_path / "a")[0]
    assert len(other.codes_equal) == 14 and other.codes_equal_min < 1.0
    for name, ratio in other.loss_ratio.items():
        assert ratio == cfg_g["layers"][name]["loss"] / cfg_a["layers"][name]["loss"]
    assert other.to_dict()["loss_ratio_max"] == max(other.loss_ratio.values())
    with pytest.raises(ValueError, match="differ in setting"):
        compare_checkpoints(tmp_path / "a", tmp_path / "w3")


def test_stats_from_another_model_are_refused(tiny, text, tmp_path):
    calibrate(tiny["gpt2"], text, tmp_path / "stats")
    res = cli("quantize", tiny["llama"], "--stats", tmp_path / "stats", "--out", tmp_path / "q", ok=False)
    assert res.exit_code == 2 and "re-run calibrate" in flat(res.output)
    assert not (tmp_path / "q" / CONFIG_NAME).exists()


def test_disk_full_exits_1_without_a_complete_checkpoint(tiny, text, tmp_path, monkeypatch):
    calibrate(tiny["llama"], text, tmp_path / "stats")
    real, calls = atomic.atomic_write, []

    def full(path, write):
        calls.append(path)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, write)

    monkeypatch.setattr(atomic, "atomic_write", full)
    res = cli("quantize", tiny["llama"], "--stats", tmp_path / "stats", "--out", tmp_path / "q", "--backend",
              "numpy", ok=False)
    assert res.exit_code == 1 and "disk full" in flat(res.output)
    assert not (tmp_path / "q" / CONFIG_NAME).exists()
    assert not [p for p in (tmp_path / "q").rglob("*tmp*")]
    monkeypatch.setattr(atomic, "atomic_write", real)
    quantize(tiny["llama"], tmp_path / "stats", tmp_path / "q")  # resumes after space is freed
    assert (tmp_path / "q" / CONFIG_NAME).exists()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_linear_matches_dequantized(arch, tiny, text, tmp_path):
    """True-quant (PackedLinear on the packed codes, Numba kernel when installed, and the NumPy
    reference) gives the fake-quant model's logits; `eval --packed` runs."""
    import torch

    from decoupleq_ref.matmul import matmul
    from decoupleq_ref.model.source import resolve_model
    from decoupleq_ref.model.torch_model import PackedLinear, load_model, load_quantized

    calibrate(tiny[arch], text, tmp_path / "stats")
    quantize(tiny[arch], tmp_path / "stats", tmp_path / "q", "--method", "rtn", "--hp-channels", "2")
    fake, _ = load_model(resolve_model(tiny[arch]), causal=True)
    load_quantized(fake, tmp_path / "q")
    ids = torch.arange(0, 48)[None]
    with torch.inference_mode():
        want = fake(input_ids=ids).logits
        for kernel in (None, matmul):
            true, _ = load_model(resolve_model(tiny[arch]), causal=True)
            config = load_quantized(true, tmp_path / "q", packed=True, matmul=kernel)
            assert sum(isinstance(m, PackedLinear) for m in true.modules()) == len(config["layers"])
            assert torch.allclose(true(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
    res = cli("eval", tiny[arch], "--quantized", tmp_path / "q", "--packed", "--text", text, "--seqlen", "32",
              "--max-tokens", "64", "--json")
    assert json.loads(res.stdout.strip().splitlines()[-1])["packed"] is True

"""The trained stages of `decoupleq run`: the block-wise stage's settings (targets, precision,
schedule), the model-level KL stage, the float32-product H capture and the per-stage timing, on
a tiny random Llama."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from decoupleq_ref.model.blockwise import QuantLinear  # noqa: E402
from decoupleq_ref.model.calibrate import PRODUCT_ROWS, HessianHooks, gram  # noqa: E402
from decoupleq_ref.model.checkpoint import read_checkpoint, unit_file  # noqa: E402
from decoupleq_ref.model.stage_times import STAGES, StageTimes  # noqa: E402
from decoupleq_ref.model.tiny import save_tiny  # noqa: E402
from decoupleq_ref.model.train_config import BlockwiseConfig  # noqa: E402
from test_pipeline import (Interrupt, cli, flat, interrupting_solver, kill_then_resume, text,  # noqa: E402,F401
                           tree_bytes)

RUN = ("--nsamples", "4", "--seqlen", "32", "--bits", "2", "--group-size", "32", "--backend", "numpy",
       "--block-epochs", "2", "--block-lr", "1e-4")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama", seed=1)


def test_config_checks_and_schedule():
    """Each unknown setting names its option; the cosine schedule starts at lr, halves midway and
    ends near 0; settings() writes only what differs from the official defaults (old checkpoints
    keep resuming)."""
    for kw, option in (({"targets": "fp"}, "--block-targets"), ({"precision": "fp16"}, "--train-precision"),
                       ({"schedule": "linear"}, "--block-schedule"), ({"lr": -1.0}, "--block-lr"),
                       ({"lr": math.nan}, "--block-lr"), ({"epochs": -1}, "--block-epochs"),
                       ({"retries": -1}, "--block-retries")):
        with pytest.raises(ValueError, match=option):
            BlockwiseConfig(**kw)
    c = BlockwiseConfig(epochs=2, lr=1e-3, schedule="cosine")
    assert c.lr_at(0, 10) == 1e-3 and math.isclose(c.lr_at(5, 10), 5e-4) and c.lr_at(9, 10) < 3e-5
    assert BlockwiseConfig(lr=1e-3).lr_at(9, 10) == 1e-3
    assert BlockwiseConfig.official().settings() == {"epochs": 4, "lr": 1e-5}
    assert BlockwiseConfig(2, 1e-3, "float", "bf16").settings() == {"epochs": 2, "lr": 1e-3, "targets": "float",
                                                                    "precision": "bf16", "retries": 1}
    assert not BlockwiseConfig(0, 1e-3).on and not BlockwiseConfig(3, 0.0).on


def test_quant_linear_weight_matches_the_format():
    """QuantLinear's Ŵ (broadcast over groups) is s·q + z of each group, per-channel included."""
    rng = np.random.default_rng(0)
    for groups in (4, 1):
        q = rng.integers(0, 4, (6, 64)).astype(np.float64)
        s, z = rng.normal(size=(6, groups)), rng.normal(size=(6, groups))
        expect = np.repeat(s, 64 // groups, axis=1) * q + np.repeat(z, 64 // groups, axis=1)
        with torch.no_grad():
            got = QuantLinear(q, s, z, None).weight_hat().numpy()
        np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-6)


def test_gram_is_the_float64_product_to_float32_rounding():
    """H from float32 products of ≤ PRODUCT_ROWS rows summed in float64: within 1e-6 of the float64
    product relative to its largest entry, exactly symmetric where torch's GEMM is, and layers fed
    the same tensor share one product."""
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(3 * PRODUCT_ROWS + 17, 48)).astype(np.float32))
    exact = x.double().T @ x.double()
    got = gram(x)
    assert got.dtype == torch.float64
    assert float((got - exact).abs().max()) < 1e-6 * float(exact.abs().max())
    a, b = torch.nn.Linear(48, 5), torch.nn.Linear(48, 7)
    calls = []
    hooks = HessianHooks({"a": a, "b": b})
    import decoupleq_ref.model.calibrate as cal

    real = cal.gram
    cal.gram = lambda t: calls.append(1) or real(t)
    try:
        with torch.no_grad():
            a(x), b(x)
    finally:
        cal.gram = real
        hooks.remove()
    H = hooks.hessians()
    assert len(calls) == 1 and np.array_equal(H["a"], H["b"]) and np.allclose(H["a"], exact.numpy() / len(x), rtol=0, atol=1e-6)


def test_stage_times_table():
    times = StageTimes()
    with times("solve"):
        pass
    times.add("blockwise backward", 2.0)
    assert set(times.seconds) == set(STAGES) and times.seconds["blockwise backward"] == 2.0
    assert "blockwise backward" in times.table(4.0) and "other" in times.table(4.0) and "load" not in times.table()
    with pytest.raises(KeyError, match="unknown stage"):
        with times("lunch"):
            pass


@pytest.mark.parametrize("extra", [("--block-targets", "float"), ("--train-precision", "bf16"),
                                   ("--block-schedule", "cosine")])
def test_run_settings_are_recorded_and_lower_the_block_loss(llama, text, tmp_path, extra):
    """Each setting runs end to end, is recorded in the checkpoint (a resume with other settings is
    refused) and the stage lowers the block loss it reports; the run prints its time per stage."""
    res = cli("run", llama, "--text", text, *RUN, *extra, "--out", tmp_path / "q")
    config = read_checkpoint(tmp_path / "q")[0]
    key = {"--block-targets": "targets", "--train-precision": "precision", "--block-schedule": "schedule"}[extra[0]]
    assert config["blockwise_settings"][key] == extra[1]
    assert all(s["steps"] == 8 for s in config["blockwise"])
    assert any(s["kept"] == "trained" for s in config["blockwise"])
    out = flat(res.output)
    assert "time per stage" in out and "solve" in out and "blockwise backward" in out
    before = tree_bytes(tmp_path / "q")
    other = cli("run", llama, "--text", text, *RUN, "--block-lr", "2e-4", "--out", tmp_path / "q", ok=False)
    assert other.exit_code == 2 and "--overwrite" in flat(other.output) and tree_bytes(tmp_path / "q") == before


def test_float_targets_resume_byte_identical(llama, text, tmp_path, monkeypatch):
    """Float targets are carried through the float blocks, resumed blocks included: a run killed
    in block 1 completes byte-identical to an uninterrupted one."""
    import decoupleq_ref.cli_model as cm

    args = ("run", llama, "--text", text, *RUN, "--block-targets", "float", "--train-precision", "bf16")
    left = kill_then_resume(args, tmp_path, monkeypatch, cm, "get_solver", lambda name=None: interrupting_solver(9))
    assert left == [unit_file("block.0000")]


def test_float_targets_differ_from_quantized_targets_after_block_0(llama, text, tmp_path):
    """Block 0 sees float inputs either way (same targets, same result); from block 1 on the float
    targets include the prefix's error, so the stage's losses differ."""
    for t in ("quantized", "float"):
        cli("run", llama, "--text", text, *RUN, "--block-targets", t, "--out", tmp_path / t)
    q, f = (read_checkpoint(tmp_path / t)[0]["blockwise"] for t in ("quantized", "float"))
    assert q[0]["loss_before"] == f[0]["loss_before"] and q[0]["loss_after"] == f[0]["loss_after"]
    assert q[1]["loss_before"] != f[1]["loss_before"]


def test_model_stage_lowers_the_kl_and_is_stored(llama, text, tmp_path):
    """The model-level stage: its KL before/after and settings in the checkpoint, every layer's
    (s, z) and the final norm from the stage when it kept the trained state (layer losses then say
    they were measured at the block stage), and --model-epochs 0 leaves it out of the header."""
    from decoupleq_ref.model.checkpoint import read_checkpoint_tensors

    cli("run", llama, "--text", text, *RUN, "--model-epochs", "3", "--model-lr", "1e-4", "--out", tmp_path / "m")
    config, tensors = read_checkpoint_tensors(tmp_path / "m")
    stage = config["model_stage"]
    assert stage["steps"] == 12 and stage["epochs"] == 3 and config["model_stage_settings"]["lr"] == 1e-4
    assert stage["kept"] == "trained" and stage["kl_after"] < stage["kl_before"]
    assert all(layer["loss_at"] == "block stage" for layer in config["layers"].values())
    cli("run", llama, "--text", text, *RUN, "--model-epochs", "0", "--out", tmp_path / "b")
    config_b, tensors_b = read_checkpoint_tensors(tmp_path / "b")
    assert "model_stage" not in config_b and "model_stage_settings" not in config_b
    assert all("loss_at" not in layer for layer in config_b["layers"].values())
    assert not np.array_equal(tensors["model.norm.weight"], tensors_b["model.norm.weight"])
    name = next(iter(config["layers"]))
    assert np.array_equal(tensors[f"{name}.qweight"], tensors_b[f"{name}.qweight"])  # q is frozen
    assert not np.array_equal(tensors[f"{name}.scales"], tensors_b[f"{name}.scales"])


def test_model_stage_keeps_the_block_result_when_it_does_not_help(llama, text, tmp_path):
    """A learning rate far too large: the stage's KL rises, so the checkpoint keeps the block-wise
    (s, z) and norms exactly (byte-identical tensors to a run without the stage)."""
    from decoupleq_ref.model.checkpoint import read_checkpoint_tensors

    cli("run", llama, "--text", text, *RUN, "--model-epochs", "2", "--model-lr", "0.5", "--out", tmp_path / "m")
    cli("run", llama, "--text", text, *RUN, "--model-epochs", "0", "--out", tmp_path / "b")
    (config, tensors), (_, tensors_b) = (read_checkpoint_tensors(tmp_path / n) for n in ("m", "b"))
    assert config["model_stage"]["kept"] == "block stage" and config["model_stage"]["kl_after"] > config["model_stage"]["kl_before"]
    assert set(tensors) == set(tensors_b) and all(np.array_equal(tensors[k], tensors_b[k]) for k in tensors)


def test_model_stage_resume_byte_identical(llama, text, tmp_path, monkeypatch):
    """Killed inside the model-level stage (all blocks committed), the same command completes a
    checkpoint byte-identical to an uninterrupted run's."""
    import decoupleq_ref.model.sequential as seq

    args = ("run", llama, "--text", text, *RUN, "--model-epochs", "2", "--train-precision", "bf16")
    left = kill_then_resume(args, tmp_path, monkeypatch, seq, "train_model",
                            lambda *a, **kw: (_ for _ in ()).throw(Interrupt()))
    assert left == sorted(unit_file(f"block.000{i}") for i in (0, 1))


def test_auto_precision_is_bf16_only_where_native(monkeypatch):
    """--train-precision auto: bf16 on a CPU with AVX-512-BF16 or AMX, fp32 on one without (where
    autocast would emulate it), an explicit choice passes through; the header records the result."""
    from decoupleq_ref.model.torch_model import training_precision

    cpu = torch.device("cpu")
    for avx512_bf16, amx, expect in ((True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert training_precision("auto", cpu) == expect
    assert training_precision("fp32", cpu) == "fp32" and training_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="--train-precision: 'fp16' is not one of auto, fp32, bf16"):
        BlockwiseConfig(precision="fp16")


def test_model_stage_retries_at_a_tenth_of_the_rate(llama, text, tmp_path):
    """A rate too large for the model: the first epoch raises the KL, the stage starts over from
    the block-wise state at a tenth of the rate and keeps that; without retries it keeps the
    block-wise state."""
    # 1e-3 raises the KL and 1e-4 lowers it on both fixture texts (wikitext, or the generated words
    # of a clone without ../shared); 3e-4 would lower it on wikitext only
    args = ("run", llama, "--text", text, *RUN, "--model-epochs", "2", "--model-lr", "1e-3",
            "--train-precision", "fp32")
    cli(*args, "--out", tmp_path / "retry")
    cli(*args, "--model-retries", "0", "--out", tmp_path / "once")
    retry, once = (read_checkpoint(tmp_path / n)[0]["model_stage"] for n in ("retry", "once"))
    assert once["kept"] == "block stage" and once["steps"] == 8 and once["lr_used"] == 1e-3
    assert retry["kept"] == "trained" and retry["steps"] == 16 and math.isclose(retry["lr_used"], 1e-4)
    assert retry["kl_after"] < retry["kl_before"] == once["kl_before"] < once["kl_after"]


def sabotaged_first_tries(monkeypatch, lr: float) -> list[float]:
    """Make every block-wise try at ``lr`` return (s, z) that raise the block's loss (zeros shifted by
    1); other rates train for real. Returns the rate of each try, in order."""
    import decoupleq_ref.model.sequential as seq

    real, rates = seq.train_block, []

    def train_block(block, quant, X, Y, kwargs, config, seed, times=None):
        rates.append(config.lr)
        r = real(block, quant, X, Y, kwargs, config, seed, times)
        if config.lr == lr:
            r.zeros = {name: z + 1.0 for name, z in r.zeros.items()}
        return r

    monkeypatch.setattr(seq, "train_block", train_block)
    return rates


def test_block_stage_retries_at_a_tenth_of_the_rate(llama, text, tmp_path, monkeypatch):
    """A block whose trained state has the higher loss starts over from its layer-wise state (norms
    included) at a tenth of the rate: the checkpoint's tensors are byte-identical to a run made at
    that rate in the first place; with --block-retries 0 the block keeps its layer-wise state."""
    from decoupleq_ref.model.checkpoint import read_checkpoint_tensors

    args = ("run", llama, "--text", text, *RUN, "--train-precision", "fp32")
    cli(*args, "--block-lr", "1e-4", "--block-retries", "0", "--out", tmp_path / "direct")
    rates = sabotaged_first_tries(monkeypatch, 1e-3)
    cli(*args, "--block-lr", "1e-3", "--out", tmp_path / "retry")
    assert rates == [1e-3, 1e-4] * 2
    cli(*args, "--block-lr", "1e-3", "--block-retries", "0", "--out", tmp_path / "once")
    (retry, t_retry), (direct, t_direct), (once, _) = (read_checkpoint_tensors(tmp_path / n)
                                                        for n in ("retry", "direct", "once"))
    assert [(s["steps"], s["lr_used"]) for s in retry["blockwise"]] == [(16, 1e-4)] * 2
    assert [s["kept"] for s in retry["blockwise"]] == [s["kept"] for s in direct["blockwise"]]
    assert set(t_retry) == set(t_direct) and all(np.array_equal(t_retry[k], t_direct[k]) for k in t_retry)
    assert [(s["steps"], s["lr_used"], s["kept"]) for s in once["blockwise"]] == [(8, 1e-3, "layer-wise")] * 2
    assert retry["blockwise_settings"]["retries"] == 1 and "retries" not in once["blockwise_settings"]

"""validate.checkpoint and ``decoupleq validate-checkpoint``: the official
fake_quant.pth / true_quant.pth pair (written here in the official layout: int8 signed codes,
NAME_qscale / NAME_qzero (out, G)) and this project's checkpoint directory; one corrupted layer
is caught by name."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

import decoupleq_ref as dq
from decoupleq_ref.cli import app
from validate.adapters import from_native
from validate.checkpoint import validate_checkpoint

from support import project_checkpoint  # noqa: E402

torch = pytest.importorskip("torch")

LAYERS = {"model.layers.0.self_attn.q_proj.weight": (16, 32), "model.layers.0.mlp.down_proj.weight": (24, 16),
          "model.layers.1.self_attn.q_proj.weight": (16, 32)}
GROUP = 8


def official_pair(folder, dtype=torch.float16, asym=True, corrupt=None):
    """Write fake_quant.pth / true_quant.pth as the official llama.py --save does; ``corrupt``
    (name, how) damages one layer of true_quant.pth after the fake weights were computed."""
    fake, true = {}, {}
    for i, (k, (out, n_in)) in enumerate(LAYERS.items()):
        W, H = dq.synthetic_layer(out, n_in, seed=i)
        cfg = dq.QuantConfig(bits=2, group_size=GROUP, grid=20, iters=1, symmetric=not asym)
        sg = from_native(dq.quantize_layer(W, H, cfg), cfg, "signed")
        w_int = torch.from_numpy(sg["q"].astype(np.int8))
        scale = torch.from_numpy(sg["scale"]).float()
        zero = torch.from_numpy(sg["zero"]).float()
        Q = w_int.float() * scale.repeat_interleave(GROUP, dim=1)
        if asym:
            Q = Q + zero.repeat_interleave(GROUP, dim=1)
        fake[k], true[k], true[f"{k}_qscale"] = Q.to(dtype), w_int, scale
        if asym:
            true[f"{k}_qzero"] = zero
    emb = torch.randn(10, 32).to(dtype)
    fake["model.embed_tokens.weight"] = true["model.embed_tokens.weight"] = emb
    if corrupt:
        name, how = corrupt
        if how == "codes":
            true[name][3] = -true[name][3] - 1  # one row's codes mirrored
        elif how == "scale":
            true[f"{name}_qscale"][:, 1] *= 1.5
        elif how == "negated_zero":
            true[f"{name}_qzero"] = -true[f"{name}_qzero"]
        elif how == "unsigned":
            true[name] = true[name] + 2  # codes exported in [0, 3] next to the signed zero
    torch.save(fake, folder / "fake_quant.pth")
    torch.save(true, folder / "true_quant.pth")
    return folder


@pytest.mark.parametrize("dtype,asym", [(torch.float16, True), (torch.bfloat16, False), (torch.float32, True)])
def test_clean_official_pair_passes(tmp_path, dtype, asym):
    rep = validate_checkpoint(official_pair(tmp_path, dtype, asym), bits=2)
    assert rep.ok, rep.table()
    assert len(rep.layers) == len(LAYERS) + 1 and rep.kind == "official"
    assert all(c.rel_diff is not None and c.rel_diff < 1e-2 for c in rep.layers[:3])


@pytest.mark.parametrize("how", ["codes", "scale"])
def test_corrupted_official_layer_is_named(tmp_path, how):
    bad = "model.layers.0.mlp.down_proj.weight"
    rep = validate_checkpoint(official_pair(tmp_path, corrupt=(bad, how)))
    assert [c.name for c in rep.failed] == [bad], rep.table()
    msg = rep.failed[0].problems[0]
    assert "differs from the fake-quant" in msg
    if how == "codes":
        assert "rows [3]" in msg
    else:
        assert "input groups [1] (group size 8)" in msg


@pytest.mark.parametrize("how,why", [("negated_zero", "the zero has the wrong sign"),
                                     ("unsigned", "unsigned codes stored with the signed zero")])
def test_export_mistake_is_explained(tmp_path, how, why):
    bad = "model.layers.0.self_attn.q_proj.weight"
    rep = validate_checkpoint(official_pair(tmp_path, corrupt=(bad, how)), bits=2 if how != "unsigned" else None)
    assert [c.name for c in rep.failed] == [bad], rep.table()
    assert any(why in p for p in rep.failed[0].problems), rep.table()


def test_cli_names_the_corrupted_layer(tmp_path):
    bad = "model.layers.1.self_attn.q_proj.weight"
    official_pair(tmp_path, corrupt=(bad, "codes"))
    runner = CliRunner()
    r = runner.invoke(app, ["validate-checkpoint", str(tmp_path / "true_quant.pth"), "--fake",
                            str(tmp_path / "fake_quant.pth"), "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 1, r.output
    assert f"differing: {bad}" in r.output
    r = runner.invoke(app, ["validate-checkpoint", str(tmp_path / "true_quant.pth")])
    assert r.exit_code == 2 and "--fake" in r.output


def test_arbitrary_pickle_is_refused(tmp_path):
    import fractions

    official_pair(tmp_path)
    torch.save({"x": fractions.Fraction(1, 3)}, tmp_path / "true_quant.pth")  # a global outside the allowlist
    with pytest.raises(ValueError, match="weights_only=True"):
        validate_checkpoint(tmp_path)


def test_signed_range_checked_when_bits_given(tmp_path):
    official_pair(tmp_path)
    true = torch.load(tmp_path / "true_quant.pth", weights_only=True)
    k = next(iter(LAYERS))
    true[k][0, 0] = 5
    torch.save(true, tmp_path / "true_quant.pth")
    rep = validate_checkpoint(tmp_path, bits=2)
    assert [c.name for c in rep.failed] == [k] and "signed 2-bit range" in rep.failed[0].problems[0]


# ----------------------------------------------------------------------------- this project's checkpoint


def _rewrite(folder, edit):
    from safetensors.numpy import load_file, save_file

    path = folder / "model.safetensors"
    t = dict(load_file(str(path)))
    edit(t)
    save_file(t, str(path))


@pytest.mark.parametrize("hp", [0, 3])
def test_project_checkpoint_against_its_fake_quant_weights(tmp_path, hp):
    from safetensors.numpy import save_file

    from decoupleq_ref.model.checkpoint import model_state, read_checkpoint_tensors

    ck = project_checkpoint(tmp_path / "ck", hp)
    assert validate_checkpoint(ck).ok
    fake = tmp_path / "fake.safetensors"
    save_file(model_state(*read_checkpoint_tensors(ck)), str(fake))
    rep = validate_checkpoint(ck, fake)
    assert rep.ok and rep.kind == "decoupleq", rep.table()

    def flip(t):
        t["blocks.0.mlp.qweight"][2, 0] ^= 0b11  # column 0 of row 2: code q -> 3 - q

    _rewrite(ck, flip)
    rep = validate_checkpoint(ck, fake)
    assert [c.name for c in rep.failed] == ["blocks.0.mlp"] and "rows [2]" in rep.failed[0].problems[0]


def test_project_checkpoint_structure_without_fake(tmp_path):
    ck = project_checkpoint(tmp_path / "ck")

    def damage(t):
        t["blocks.0.attn.qweight"][1, -1] |= 0x80   # a padding bit
        t["blocks.0.mlp.scales"][5, 0] = np.nan

    _rewrite(ck, damage)
    rep = validate_checkpoint(ck)
    problems = {c.name: " ".join(c.problems) for c in rep.failed}
    assert "padding bits" in problems["blocks.0.attn"] and "rows [1]" in problems["blocks.0.attn"]
    assert "scales has NaN/Inf in rows [5]" in problems["blocks.0.mlp"]

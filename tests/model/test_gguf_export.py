"""GGUF export, proved by the other side's code: gguf-py's dequantizer reads every exported
tensor back as the checkpoint's Ŵ (bit for bit with fp16 (s, z), so to fp16 rounding of the
checkpoint's), and transformers' GGUF loader gives a model whose perplexity is `decoupleq eval
--quantized`'s. Tiny Llama models built from configs, widths multiples of 256."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

from typer.testing import CliRunner  # noqa: E402

from decoupleq_ref.cli import app  # noqa: E402
from decoupleq_ref.model.atomic import write_safetensors  # noqa: E402
from decoupleq_ref.model.safefiles import read_safetensors  # noqa: E402
from decoupleq_ref.model.checkpoint import CONFIG_NAME, WEIGHTS_NAME  # noqa: E402
from decoupleq_ref.model.tiny import save_random_stats, save_tiny  # noqa: E402
from validate.gguf_export import check_gguf_export  # noqa: E402

runner = CliRunner()
WIDE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=1)


def cli(*args, ok: bool = True):
    res = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama with 256-multiple widths, random-H stats and a text file."""
    root = tmp_path_factory.mktemp("wide")
    src = save_tiny(root / "src", "llama", **WIDE)
    text = root / "text.txt"
    rng = np.random.default_rng(0)
    words = ["the", "model", "weight", "of", "a", "layer", "is", "quantized", "to", "four", "bits", "."]
    text.write_text(" ".join(rng.choice(words, 600)))
    return {"root": root, "src": src, "stats": save_random_stats(src, root / "stats"), "text": text}


def quantized(wide, bits: int, group_size: int, method: str = "rtn") -> Path:
    out = wide["root"] / f"q{bits}g{group_size}{method}"
    if not (out / CONFIG_NAME).exists():
        cli("quantize", wide["src"], "--stats", wide["stats"], "--out", out, "--bits", bits, "--group-size",
            group_size, "--method", method, "--backend", "numpy")
    return out


def export(q: Path, out: Path, *extra) -> dict:
    res = cli("export", q, "--gguf", out, "--json", *extra)
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("bits,group_size,ggml_type", [(4, 32, "Q4_1"), (5, 64, "Q5_1"), (2, 32, "Q4_1")])
def test_gguf_reads_back_as_the_checkpoint(wide, tmp_path, bits, group_size, ggml_type):
    """gguf.quants.dequantize gives d·q + m of the checkpoint's codes with (s, z) in fp16, bit for
    bit, within fp16 rounding of the checkpoint's Ŵ; every other tensor exactly."""
    q = quantized(wide, bits, group_size)
    summary = export(q, tmp_path / "m.gguf")
    assert summary["tensors"] == {"F32": 4, ggml_type: 7} and summary["fallback"] == {}
    report = check_gguf_export(tmp_path / "m.gguf", q)
    report.raise_if_failed()
    assert 0 < report.numbers["max_abs_diff_to_checkpoint"] < 1e-3


def test_readback_check_catches_a_wrong_byte(wide, tmp_path):
    """The proof can fail: one code nibble changed in the file is found."""
    from gguf import GGUFReader

    q = quantized(wide, 4, 32)
    path = tmp_path / "m.gguf"
    export(q, path)
    t = next(t for t in GGUFReader(str(path)).tensors if t.name == "blk.0.ffn_down.weight")
    raw = bytearray(path.read_bytes())
    raw[int(t.data_offset) + 10] ^= 0x01  # a code byte of the first block (after fp16 d and m)
    path.write_bytes(bytes(raw))
    report = check_gguf_export(path, q)
    assert not report.ok and "blk.0.ffn_down.weight" in report.finding("gguf.exact").message


def fp16_checkpoint(q: Path, out: Path) -> Path:
    """A copy of checkpoint ``q`` whose scales and zeros are rounded to fp16: one GGUF holds exactly."""
    import shutil

    shutil.copytree(q, out)
    tensors, meta = read_safetensors(out / WEIGHTS_NAME, "--quantized", "re-run quantize")
    for k in tensors:
        if k.endswith((".scales", ".zeros")):
            tensors[k] = tensors[k].astype(np.float16).astype(np.float32)
    write_safetensors(out / WEIGHTS_NAME, tensors, meta)
    return out


def gguf_perplexity(wide, path: Path) -> float:
    """Perplexity of the GGUF loaded by transformers (gguf_file=) on the text, windows as eval's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from decoupleq_ref.model.evaluate import evaluate
    from decoupleq_ref.model.text import consecutive_windows, token_ids

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(wide["src"])
    return evaluate(model, consecutive_windows(token_ids(tokenizer, wide["text"]), 64, 512))["perplexity"]


def eval_perplexity(wide, q: Path) -> float:
    res = cli("eval", wide["src"], "--quantized", q, "--text", wide["text"], "--seqlen", 64, "--max-tokens", 512,
              "--json", "--device", "cpu")
    return json.loads(res.stdout.strip().splitlines()[-1])["perplexity"]


@pytest.mark.parametrize("bits,group_size", [(4, 32), (5, 32)])
def test_transformers_loads_the_gguf_with_eval_perplexity(wide, tmp_path, bits, group_size):
    """Q4_1 / Q5_1 via transformers' GGUF loader: with fp16 (s, z) in the checkpoint the weights are
    bit-identical, so the perplexity equals eval --quantized's exactly; from the float32 checkpoint
    it equals to fp16 rounding (relative 1e-4)."""
    q = quantized(wide, bits, group_size, method="decoupleq")
    export(q, tmp_path / "m.gguf")
    assert gguf_perplexity(wide, tmp_path / "m.gguf") == pytest.approx(eval_perplexity(wide, q), rel=1e-4)
    q16 = fp16_checkpoint(q, tmp_path / "q16")
    export(q16, tmp_path / "m16.gguf")
    assert gguf_perplexity(wide, tmp_path / "m16.gguf") == eval_perplexity(wide, q16)


def test_rows_off_the_block_fall_back_to_f32_and_are_named(tmp_path):
    """Per-channel W4 on a model whose hidden size (48) is no multiple of 32: the linears reading it
    fall back to F32 (their Ŵ exactly) and the export names them; down_proj (96 columns) is Q4_1."""
    src = save_tiny(tmp_path / "src", "llama", hidden_size=48, intermediate_size=96, num_hidden_layers=1)
    stats = save_random_stats(src, tmp_path / "stats")
    cli("quantize", src, "--stats", stats, "--out", tmp_path / "q", "--bits", 4, "--group-size", -1,
        "--method", "rtn", "--backend", "numpy")
    summary = export(tmp_path / "q", tmp_path / "m.gguf")
    assert set(summary["fallback"]) == {f"blk.0.{n}.weight" for n in
                                        ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up")}
    assert summary["tensors"]["Q4_1"] == 1
    check_gguf_export(tmp_path / "m.gguf", tmp_path / "q").raise_if_failed()


@pytest.mark.parametrize("args,needle", [
    (("--bits", 3, "--group-size", 16), "--group-size 32"),
    (("--bits", 6, "--group-size", 32), "no exact GGUF type"),
])
def test_unexportable_checkpoints_are_refused(wide, tmp_path, args, needle):
    q = tmp_path / "q"
    cli("quantize", wide["src"], "--stats", wide["stats"], "--out", q, "--method", "rtn", "--backend", "numpy", *args)
    res = cli("export", q, "--gguf", tmp_path / "m.gguf", ok=False)
    assert res.exit_code == 2 and needle in " ".join(res.output.replace("│", " ").split())
    assert not (tmp_path / "m.gguf").exists()


def test_the_tokenizer_travels_in_the_file(wide, tmp_path):
    """A HF source's byte-level BPE tokenizer is written as tokenizer.ggml.*: transformers builds
    the same tokenizer from the GGUF alone (same ids on text with non-ASCII bytes, same eos)."""
    from transformers import AutoTokenizer

    export(quantized(wide, 4, 32), tmp_path / "m.gguf")
    ours, theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf"), AutoTokenizer.from_pretrained(wide["src"])
    sample = wide["text"].read_text()[:300] + " héllo wörld\n\t12 345 ✓"
    assert ours(sample)["input_ids"] == theirs(sample)["input_ids"]
    assert ours.eos_token == theirs.eos_token


@pytest.mark.parametrize("ggml_type,bits,group_size", [("Q4_K", 4, 32), ("Q2_K", 2, 16)])
def test_kquant_export_reads_back_as_its_solve(wide, tmp_path, ggml_type, bits, group_size):
    """K-quants: every linear (widths are multiples of 256) is re-solved on the grid with H from the
    stats, below the projection of the checkpoint; gguf-py reads each back as its solve bit for bit,
    everything else as the checkpoint; transformers' loader holds the same weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from decoupleq_ref.model.gguf_export import export_gguf
    from decoupleq_ref.model.source import resolve_model
    from decoupleq_ref.model.weights import gguf_to_hf_name
    from validate.gguf_export import gguf_tensors_hf

    q = quantized(wide, bits, group_size)
    path = tmp_path / "k.gguf"
    summary = export_gguf(q, resolve_model(wide["src"]), path, ggml_type=ggml_type, stats=wide["stats"],
                          keep_solved=True)
    assert summary.counts() == {"F32": 4, ggml_type: 7} and not summary.fallback
    for losses in summary.kquant.values():
        assert losses["solved"] < losses["projected"]
    report = check_gguf_export(path, q, expected=summary.solved)
    report.raise_if_failed()
    assert report.finding("gguf.kquant").status == "pass"
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    state = model.state_dict()
    for name, (arr, _) in gguf_tensors_hf(path).items():
        assert np.array_equal(state[gguf_to_hf_name(name)].numpy(), arr), name


def test_kquant_export_needs_stats_and_matching_checkpoint(wide, tmp_path):
    q = quantized(wide, 4, 32)
    res = cli("export", q, "--gguf", tmp_path / "k.gguf", "--type", "Q4_K", ok=False)
    assert res.exit_code == 2 and "--stats" in res.output
    res = cli("export", q, "--gguf", tmp_path / "k.gguf", "--type", "Q2_K", "--stats", wide["stats"], ok=False)
    assert res.exit_code == 2 and "--group-size 16" in " ".join(res.output.replace("│", " ").split())
    res = cli("export", q, "--gguf", tmp_path / "k.gguf", "--type", "Q3_K", ok=False)
    assert res.exit_code == 2 and "--type" in res.output
    assert not (tmp_path / "k.gguf").exists()


def test_a_gguf_source_round_trips(wide, tmp_path):
    """A checkpoint made from a GGUF model exports with the source's metadata copied (tokenizer
    included): it reads back as the checkpoint, its tokenizer is the source's, and transformers'
    loader gives `eval --quantized`'s perplexity on the same GGUF model."""
    from gguf import GGUFReader

    export(quantized(wide, 4, 32), tmp_path / "src.gguf")
    stats = save_random_stats(tmp_path / "src.gguf", tmp_path / "stats", seed=1)
    q = tmp_path / "q"
    cli("quantize", tmp_path / "src.gguf", "--stats", stats, "--out", q, "--bits", 5, "--group-size", 32,
        "--method", "rtn", "--backend", "numpy")
    summary = export(q, tmp_path / "out.gguf")  # --model defaults to the GGUF the checkpoint records
    assert summary["tensors"] == {"F32": 4, "Q5_1": 7}
    check_gguf_export(tmp_path / "out.gguf", q).raise_if_failed()
    src, out = GGUFReader(str(tmp_path / "src.gguf")), GGUFReader(str(tmp_path / "out.gguf"))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "llama.attention.head_count_kv"):
        assert out.fields[key].contents() == src.fields[key].contents(), key
    res = cli("eval", tmp_path / "src.gguf", "--quantized", q, "--text", wide["text"], "--seqlen", 64,
              "--max-tokens", 512, "--json", "--device", "cpu")
    want = json.loads(res.stdout.strip().splitlines()[-1])["perplexity"]
    assert gguf_perplexity(wide, tmp_path / "out.gguf") == pytest.approx(want, rel=1e-4)


def test_quantize_format_gguf_writes_the_file_beside_the_checkpoint(wide, tmp_path):
    """quantize --format gguf: the checkpoint and OUT/model.gguf (its exact export); a type-less
    setting is refused before any work."""
    out = tmp_path / "q"
    cli("quantize", wide["src"], "--stats", wide["stats"], "--out", out, "--bits", 4, "--group-size", 64,
        "--method", "rtn", "--backend", "numpy", "--format", "gguf")
    assert (out / CONFIG_NAME).exists()
    check_gguf_export(out / "model.gguf", out).raise_if_failed()
    res = cli("quantize", wide["src"], "--stats", wide["stats"], "--out", tmp_path / "q6", "--bits", 6,
              "--method", "rtn", "--backend", "numpy", "--format", "gguf", ok=False)
    assert res.exit_code == 2 and "--format gguf" in " ".join(res.output.replace("│", " ").split())
    assert not (tmp_path / "q6").exists()
    res = cli("quantize", wide["src"], "--stats", wide["stats"], "--out", tmp_path / "qx", "--format", "onnx", ok=False)
    assert res.exit_code == 2 and "--format" in res.output


def test_kquant_rows_off_the_super_block_fall_back_to_the_exact_type(tmp_path):
    """Hidden size 320 (a multiple of 32, not of 256): the six linears reading it fall back to
    Q4_1 — the checkpoint exactly — and are named; ffn_down (512 columns) is Q4_K."""
    from decoupleq_ref.model.gguf_export import export_gguf
    from decoupleq_ref.model.source import resolve_model

    src = save_tiny(tmp_path / "src", "llama", hidden_size=320, intermediate_size=512, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2)
    stats = save_random_stats(src, tmp_path / "stats")
    cli("quantize", src, "--stats", stats, "--out", tmp_path / "q", "--bits", 4, "--group-size", 32,
        "--method", "rtn", "--backend", "numpy")
    summary = export_gguf(tmp_path / "q", resolve_model(src), tmp_path / "k.gguf", ggml_type="Q4_K", stats=stats,
                          keep_solved=True)
    assert summary.counts() == {"F32": 4, "Q4_1": 6, "Q4_K": 1}
    assert set(summary.fallback) == {f"blk.0.{n}.weight" for n in
                                     ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up")}
    assert all("not a multiple of 256; Q4_1 instead" in why for why in summary.fallback.values())
    check_gguf_export(tmp_path / "k.gguf", tmp_path / "q", expected=summary.solved).raise_if_failed()

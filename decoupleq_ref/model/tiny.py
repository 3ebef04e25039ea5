"""Tiny random models saved as HF directories, for tests and examples (seconds, no download).

The tokenizer is byte-level (256 tokens, no merges), so any text tokenizes.
"""

from __future__ import annotations

from pathlib import Path


def byte_tokenizer():
    """A PreTrainedTokenizerFast over the 256 byte-level symbols."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {sym: i for i, sym in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=sorted(alphabet)[0])


def save_tiny(folder: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised tiny model (``arch``: llama | gpt2 | bert) and the byte
    tokenizer to ``folder`` as safetensors; returns the folder."""
    import torch
    from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM)

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(**{**dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                    tie_word_embeddings=True), **overrides})
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(**{**dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=256),
                                              **overrides}))
    elif arch == "bert":
        model = BertModel(BertConfig(**{**dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                               intermediate_size=128, max_position_embeddings=256), **overrides}))
    else:
        raise ValueError(f"arch: unknown {arch!r}; choose llama, gpt2 or bert")
    from .torch_model import quiet_transformers

    quiet_transformers()  # no "Writing model shards" bar
    folder = Path(folder)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def save_random_stats(model: Path, folder: Path, seed: int = 0, tokens_per_input: int = 4) -> Path:
    """A stats folder with a random full-rank H (from ``tokens_per_input``·in Gaussian inputs with
    column scales in [0.2, 2]) for every ``*_proj`` linear of a saved model — for tests and
    benchmarks of ``quantize`` that need no forward pass."""
    import numpy as np

    from .source import resolve_model
    from .stats import CalibrationStats
    from .weights import read_weights

    rng = np.random.default_rng(seed)
    hessians, layers = {}, {}
    source = resolve_model(model)
    for key, W in sorted(read_weights(source).items()):
        if key.endswith("_proj.weight"):
            name, n_in = key[: -len(".weight")], W.shape[1]
            X = rng.standard_normal((tokens_per_input * n_in, n_in)) * rng.uniform(0.2, 2.0, n_in)
            hessians[name] = X.T @ X / len(X)
            layers[name] = {"out": W.shape[0], "in": n_in, "transposed": False}
    info = {"model": str(model), "model_fingerprint": source.fingerprint(), "tokens": 0}
    CalibrationStats(hessians, layers, info).save(Path(folder))
    return Path(folder)

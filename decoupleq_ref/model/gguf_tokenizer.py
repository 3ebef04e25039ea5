"""A HF directory's tokenizer as GGUF ``tokenizer.ggml.*`` key/values, for the byte-level BPE
tokenizers llama.cpp calls "gpt2" (GPT-2's split regex; tokens already spelled in the byte
alphabet). Other tokenizers are not converted: the export then carries none, says so, and
transformers can still load the model (its tokenizer from the HF directory). No torch.
"""

from __future__ import annotations

import json
from pathlib import Path

#: llama.cpp's token types
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def _is_gpt2_byte_level(tok: dict) -> bool:
    """BPE model behind a plain ByteLevel pre-tokenizer with GPT-2's regex, no normalizer."""
    pre = tok.get("pre_tokenizer") or {}
    return ((tok.get("model") or {}).get("type") == "BPE" and tok.get("normalizer") is None
            and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False))


def _token_text(value: object) -> str | None:
    """A special token entry of tokenizer_config.json (a string or an AddedToken dict)."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def tokenizer_metadata(folder: Path) -> tuple[list[tuple[str, object, str]], str | None]:
    """(key/values, None) for a convertible tokenizer, else ([], why not)."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return [], f"{folder} has no tokenizer.json"
    tok = json.loads(path.read_text(encoding="utf-8"))
    if not _is_gpt2_byte_level(tok):
        return [], "only byte-level BPE tokenizers with GPT-2's split are converted"
    vocab: dict[str, int] = dict(tok["model"]["vocab"])
    added = {a["content"]: a for a in tok.get("added_tokens", [])}
    for text, a in added.items():
        vocab[text] = a["id"]
    size = max(vocab.values()) + 1
    tokens, types = [f"[PAD{i}]" for i in range(size)], [UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = (CONTROL if added[text].get("special") else USER_DEFINED) if text in added else NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    kv: list[tuple[str, object, str]] = [("tokenizer.ggml.model", "gpt2", "str"),
                                         ("tokenizer.ggml.pre", "gpt2", "str"),
                                         ("tokenizer.ggml.tokens", tokens, "str[]"),
                                         ("tokenizer.ggml.token_type", types, "i32[]")]
    # GGUF has no empty arrays: a vocabulary without merges (single symbols) gets rank scores
    # instead, from which readers derive merges the way they do for sentencepiece files (none here)
    kv.append(("tokenizer.ggml.merges", merges, "str[]") if merges
              else ("tokenizer.ggml.scores", [-float(i) for i in range(size)], "f32[]"))
    cfg_path = Path(folder) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    for role, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        text = _token_text(cfg.get(role))
        if text in vocab:
            kv.append((f"tokenizer.ggml.{key}", vocab[text], "u32"))
    kv.append(("tokenizer.ggml.add_bos_token", bool(cfg.get("add_bos_token", False)), "bool"))
    return kv, None

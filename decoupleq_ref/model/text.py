"""Text → token ids → windows (calibration: random windows; eval: consecutive windows)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def text_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def token_ids(tokenizer: object, path: Path, option: str = "--text") -> np.ndarray:
    """The whole file tokenized without special tokens, int64 (``option`` names it in errors)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{option}: {path} is not a file; pass a plain-text file (e.g. wikitext-2 valid.txt)")
    text = decode_text(path.read_bytes(), path, option)
    return np.asarray(tokenizer(text, add_special_tokens=False).input_ids, dtype=np.int64)


#: More bytes than this share that are not UTF-8 text: the file is not text.
MAX_BAD_SHARE = 0.01


def decode_text(data: bytes, path: Path, option: str = "--text") -> str:
    """UTF-8 text of a file. A binary file (NUL bytes, or over MAX_BAD_SHARE of its bytes not
    UTF-8) is refused; a few undecodable bytes are replaced by U+FFFD and counted in a warning."""
    escaped = data.decode("utf-8", errors="surrogateescape")  # each undecodable byte → one U+DC80..U+DCFF
    bad = sum(1 for c in escaped if "\udc80" <= c <= "\udcff")
    text = data.decode("utf-8", errors="replace") if bad else escaped
    if b"\0" in data or bad > MAX_BAD_SHARE * max(len(data), 1):
        why = "NUL bytes" if b"\0" in data else f"{bad} of {len(data)} bytes are not UTF-8"
        raise ValueError(f"{option}: {path} is not a text file ({why}); pass a plain-text UTF-8 file")
    if bad:
        from .progress import log

        log(f"warning: {option}: {path}: {bad} bytes that are not UTF-8 were replaced by U+FFFD")
    return text


def check_seqlen(config: object, seqlen: int, option: str = "--seqlen") -> None:
    """ValueError naming ``option`` when ``seqlen`` exceeds the model's max_position_embeddings
    (``config``: a transformers config; models without the field are not limited here)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit and seqlen > limit:
        raise ValueError(f"{option}: {seqlen} exceeds the model's max_position_embeddings {limit}; "
                         f"pass {option} {limit} or less")


def random_windows(ids: np.ndarray, nsamples: int, seqlen: int, seed: int) -> np.ndarray:
    """(nsamples, seqlen) windows starting at uniform random offsets (numpy default_rng(seed))."""
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"--nsamples/--seqlen: need nsamples >= 1 and seqlen >= 2, got {nsamples}, {seqlen}")
    if len(ids) < seqlen:
        raise ValueError(f"--text: {len(ids)} tokens is shorter than one window of --seqlen {seqlen}; "
                         "use a longer text or a smaller --seqlen")
    starts = np.random.default_rng(seed).integers(0, len(ids) - seqlen + 1, size=nsamples)
    return np.stack([ids[s:s + seqlen] for s in starts])


def consecutive_windows(ids: np.ndarray, seqlen: int, max_tokens: int | None = None) -> np.ndarray:
    """Non-overlapping windows from the start: floor(min(len, max_tokens) / seqlen) of them."""
    n_tokens = len(ids) if max_tokens is None else min(len(ids), max_tokens)
    n = n_tokens // seqlen
    if n == 0:
        raise ValueError(f"--text/--max-tokens: {n_tokens} tokens is shorter than one window of --seqlen "
                         f"{seqlen}; use a longer text, a larger --max-tokens or a smaller --seqlen")
    return ids[: n * seqlen].reshape(n, seqlen)

"""Paths the tests share. Importable from every test folder: tests/conftest.py puts this folder on
sys.path (pytest's default import mode does so for a rootdir conftest without __init__.py)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"  # the project workspace's text; a plain clone has none
CALIB_TEXT = SHARED_DATA / "wikitext-2" / "valid.txt"
EVAL_TEXT = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"

"""Fixtures of the integration tests that several files share."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.tokenizer import Tokenizer
from tests.tokenizers_fixture import build_bpe_tokenizer


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real BPE `tokenizer.json` (tests.tokenizers_fixture), built once per module."""
    return build_bpe_tokenizer(tmp_path_factory.mktemp("bpe") / "tokenizer.json")


@pytest.fixture(scope="module")
def tok(tokenizer_path: Path) -> Tokenizer:
    return Tokenizer.from_path(tokenizer_path)

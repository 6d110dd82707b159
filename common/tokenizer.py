"""The model's tokenizer, loaded offline from a Hugging Face `tokenizer.json`.

Used by the agent (exact-length prompts, counting dataset prompts and outputs without usage)
and by the mock server (`mock-server --tokenizer`, counting as a real server would). Counts
never include special tokens (BOS/EOS, chat template): what a server adds around a prompt is
measured by the preflight request, not guessed (docs/workloads.md, "Token counts").
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer as _HfTokenizer

TOKENIZER_FILE = "tokenizer.json"


class TokenizerError(ValueError):
    """The file is not a tokenizer the `tokenizers` library can load."""


class Tokenizer:
    """A loaded tokenizer. Thread-safe for reading (the Rust tokenizer is immutable)."""

    def __init__(self, data: bytes, name: str = "") -> None:
        try:
            self._tok = _HfTokenizer.from_str(data.decode("utf-8"))
        except (UnicodeDecodeError, Exception) as exc:  # the library raises plain Exception
            raise TokenizerError(f"not a tokenizer.json the tokenizers library can load: {exc}") from None
        self.name = name
        self.sha256 = hashlib.sha256(data).hexdigest()

    @classmethod
    def from_path(cls, path: str | Path) -> Tokenizer:
        """A `tokenizer.json`, or a local model directory holding one."""
        p = Path(path)
        if p.is_dir():
            p = p / TOKENIZER_FILE
        if not p.is_file():
            raise TokenizerError(f"{path}: no such file (a tokenizer.json or a model directory holding one)")
        return cls(p.read_bytes(), name=str(path))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def count(self, text: str) -> int:
        """Tokens of `text`, without special tokens."""
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def count_many(self, texts: Sequence[str]) -> list[int]:
        """`count` of each text, encoded in one batch."""
        return [len(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids."""
        return str(self._tok.decode(list(ids), skip_special_tokens=True))

    @property
    def vocab_size(self) -> int:
        """Tokens in the vocabulary (added tokens included)."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

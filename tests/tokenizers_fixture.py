"""A small byte-level BPE tokenizer built with the `tokenizers` library itself, offline.

Its vocabulary is deliberately small (a few hundred merges over an English corpus), so many
words are several tokens and a word count is far from a token count: a test of exact token
counts passes only if the counting really goes through the tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from agent.prompts import WORDS

_CORPUS = [" ".join(WORDS[i : i + 40]) for i in range(0, len(WORDS), 40)] * 4 + [
    "The quick brown fox jumps over the lazy dog. Serving engines are tuned for traffic.",
    "Conversations whose history hits the prefix cache, bursts recorded in traces, reasoning.",
]


def build_bpe_tokenizer(path: Path, vocab_size: int = 400) -> Path:
    """Train a byte-level BPE tokenizer of `vocab_size` tokens and save it as `path`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path

"""A tiny random-weight llama GGUF the real-server tests make for themselves (no download).

Llama architecture, 4 layers of width 256, a 1,024-piece SentencePiece vocabulary with byte
fallback (so any prompt tokenizes), written with the `gguf` package. Its end-of-sequence token
is unreachable, so every request generates exactly `max_tokens`: residual dimension 0 is a
large constant in every token embedding, and no layer writes to it (row 0 of every output
projection is 0), so after the final RMS norm it is always positive; the EOS row of the output
matrix is strongly negative in that dimension and 0 elsewhere, every other row is 0 there.
EOS's logit is then about -1,600 while the others are within a few units of 0.

`write_tiny_tokenizer` writes the same vocabulary as a Hugging Face `tokenizer.json` (for
`--tokenizer`): a BPE with byte fallback whose merges are ranked by the pieces' scores, so it
merges in the order llama.cpp's SentencePiece tokenizer does, and encodes a text to the ids
llama-server gives it inside a prompt (after the chat template's text: no space is prepended,
as llama.cpp prepends one only at the very start of the whole prompt).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import gguf
import numpy as np

N_VOCAB = 1024
N_EMBD = 256
N_HEAD = 4
N_LAYER = 4
N_FF = 768
N_CTX = 4096
UNK, BOS, EOS = 0, 1, 2
_EMBED_CONSTANT = 10.0
_EOS_WEIGHT = -100.0


def _vocab() -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and token types: control tokens, the 256 byte tokens, then pieces."""
    T = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [T.BYTE] * 256
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,;:!?'-"
    pieces = ["▁", *chars, *(f"▁{c}" for c in chars)]
    pieces += [f"▁{a}{b}" for a in string.ascii_lowercase for b in string.ascii_lowercase]
    seen = set(tokens)
    for p in pieces:
        if len(tokens) == N_VOCAB:
            break
        if p not in seen:
            seen.add(p)
            tokens.append(p)
            types.append(T.NORMAL)
    assert len(tokens) == N_VOCAB, len(tokens)
    # SentencePiece merges the pieces with the highest score first: longer pieces win.
    scores = [0.0] * 259 + [float(len(t)) - i * 1e-4 for i, t in enumerate(tokens[259:])]
    return tokens, scores, [int(t) for t in types]


def write_tiny_llama(path: Path, seed: int = 0) -> Path:
    """Write the model to `path` (a .gguf file) and return it."""
    rng = np.random.default_rng(seed)

    def w(*shape: int, scale: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("llm-loadtest tiny random llama")
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    tokens, scores, types = _vocab()
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK)
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)

    embed = w(N_VOCAB, N_EMBD, scale=1.0)
    embed[:, 0] = _EMBED_CONSTANT
    writer.add_tensor("token_embd.weight", embed)
    for i in range(N_LAYER):
        out_proj, down = w(N_EMBD, N_EMBD), w(N_EMBD, N_FF)
        out_proj[0, :] = 0.0  # nothing writes to residual dimension 0
        down[0, :] = 0.0
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", w(N_EMBD, N_EMBD))
        writer.add_tensor(f"blk.{i}.attn_k.weight", w(N_EMBD, N_EMBD))
        writer.add_tensor(f"blk.{i}.attn_v.weight", w(N_EMBD, N_EMBD))
        writer.add_tensor(f"blk.{i}.attn_output.weight", out_proj)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", w(N_FF, N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", w(N_FF, N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", down)
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, np.float32))
    output = w(N_VOCAB, N_EMBD, scale=1.0)
    output[:, 0] = 0.0
    output[EOS, :] = 0.0
    output[EOS, 0] = _EOS_WEIGHT
    writer.add_tensor("output.weight", output)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_tokenizer(path: Path) -> Path:
    """Write the model's vocabulary as a `tokenizer.json` to `path` and return it."""
    tokens, scores, _ = _vocab()
    vocab = {t: i for i, t in enumerate(tokens)}
    # Each multi-character piece is its prefix and its last character (every piece's prefix is
    # a piece too: "▁ab" = "▁a" + "b", "▁a" = "▁" + "a"); the highest score merges first.
    merged = sorted((i for i in range(259, len(tokens)) if len(tokens[i]) > 1), key=lambda i: -scores[i])
    merges = [[tokens[i][:-1], tokens[i][-1]] for i in merged]
    assert all(left in vocab for left, _ in merges)
    special = [
        {"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False}
        | {"normalized": False, "special": True}
        for i in (UNK, BOS, EOS)
    ]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": special,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": tokens[UNK],
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(tokenizer, ensure_ascii=False))
    return path

"""What requests contain: seeded synthetic prompts of a requested length, or dataset entries.

Both sources hand out `Prompt`s through `next_prompt()`; `prompt_source()` picks one for a
workload.

Synthetic prompts (`PromptGenerator`) are built from `WORDS`, common English words that are
a single token (with their leading space) in common BPE vocabularies (GPT-2/cl100k/Llama
families), so a prompt's word count is close to its token count without shipping a
tokenizer; the mock server counts prompt tokens as whitespace-separated words, so against
it a prompt of L words is exactly L prompt tokens. A prompt of L words is:

* the shared prefix, when `shared_prefix_tokens` = P > 0: the same P words in every prompt
  of every agent and stage (it is drawn from a fixed seed, not the workload's: each agent
  gets its own derived seed, and a prefix must be shared by all of them to be cached);
* the request marker: the request number (counted from an offset drawn from the
  assignment's seed, so request n of another stage or agent writes another number) in
  base-len(WORDS) digits, least significant first, as up to `MARKER_WORDS` words (so
  numbers cost no extra tokens, which digit strings would in tokenizers that split digits),
  which makes the unique part of every prompt different from its first words: a server's
  prefix cache cannot turn the test into a cache benchmark beyond the shared prefix;
* random words up to L in all. A prompt is never shorter than the prefix plus one word.

With the model's tokenizer (`Workload.tokenizer_id`), the same parts are built from that
tokenizer's single-token pieces (`TokenPieces`) instead, so a prompt is exactly L of its
tokens (the shared prefix exactly P) and `Prompt.input_tokens` is its count; dataset
prompts are then counted with it too. With `prefix_groups` K > 1 there are K shared
prefixes (each from the fixed seed and its index, the same on every agent) and each prompt
draws one, uniformly or by Zipf (docs/workloads.md, "Prefix-cache studies").

Lengths are fixed, uniform, or normal (rounded, clipped to [min, max]). Everything random
comes from one `random.Random(seed)`, so the i-th prompt of an assignment is the same on
every repetition of the run.

Dataset prompts (`DatasetPrompts`) cycle through the entries in a seeded random order: each
entry is used once before any is used again, and every cycle is a new permutation. Chat
requests use an entry's `messages` when it has them (else its prompt as one user message);
completions use its prompt. `max_tokens` is the entry's, else `DEFAULT_OUTPUT_TOKENS` (a
dataset workload has no output length distribution).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from common.proto.loadtest.v1 import run_pb2
from common.tokenizer import Tokenizer

DEFAULT_INPUT_TOKENS = 128
DEFAULT_OUTPUT_TOKENS = 128
MARKER_WORDS = 3
# With a tokenizer: markers tell this many requests of an assignment apart.
MARKER_SPAN = 10**8
# Fewer single-token WORDS than this: pieces come from the tokenizer's vocabulary too.
MIN_WORD_PIECES = 128
# Rounds of `TokenPieces.fit` corrections before a prompt is taken at its counted length.
FIT_ROUNDS = 8
DEFAULT_ZIPF_EXPONENT = 1.0
# Prompts of a generator verified by encoding before its construction is trusted.
VERIFY_PROMPTS = 16
# Not the workload seed: see the module docstring.
_SHARED_PREFIX_SEED = "llm-loadtest shared prefix"
# The request markers' starting number, drawn from the workload's (per stage and agent) seed.
_MARKER_SEED = "llm-loadtest request marker"

_WORD_TEXT = """
    the of and to in is was for that on with as by at from his her they you this but not
    are or be have had has were which one all we there their can an been if more when will
    would who so no out up into time about than them some could other only new these may
    then do first any my now such like our over man me even most made after also did many
    before must through back years where much your way well down should because each just
    those people how too little state good very make world still own see men work long get
    here between both life being under never day same another know while last might us
    great old year off come since against go came right used take three small house home
    water room mother area money story fact month lot study book eye job word business
    issue side kind head far week black white red green blue hand part child place case
    point group number night friend power hour game line end member law car city name
    team minute idea kid body back face others level office door health person art war
    history party result change morning reason research girl guy early food moment air
    teacher force education foot boy age policy music market sense nation plan college
    interest death course experience class control care field development role effort rate
    heart drug show leader light voice wife police mind price report decision son view
    relationship town road arm difference value building action model season society tax
    director position player record paper space ground form event official matter center
    couple site project activity star table need court oil situation cost industry figure
    street image phone data picture practice piece land product doctor wall patient worker
    news test movie north love support technology step baby computer type attention film
    tree source organization hair window evidence population truth song letter bit hope
"""

WORDS: tuple[str, ...] = tuple(dict.fromkeys(_WORD_TEXT.split()))


class PromptSourceError(ValueError):
    """The workload cannot produce prompts (e.g. a dataset with no entries)."""


@dataclass(frozen=True, slots=True)
class Prompt:
    """One request's content and requested output length.

    `messages` (chat only, from datasets) replaces `text` as the chat messages when set.
    """

    text: str
    max_tokens: int
    input_tokens: int
    messages: Sequence[Mapping[str, str]] | None = None


class PromptSource(Protocol):
    """A stream of prompts for one assignment."""

    def next_prompt(self) -> Prompt:
        """The next prompt."""
        ...


def draw_length(rng: random.Random, dist: run_pb2.LengthDistribution, default: int) -> int:
    """One draw from a length distribution (`default` when unset); at least 1."""
    kind = dist.WhichOneof("distribution")
    if kind == "fixed":
        value = dist.fixed
    elif kind == "uniform":
        low, high = sorted((dist.uniform.min, dist.uniform.max))
        value = rng.randint(low, high)
    elif kind == "normal":
        normal = dist.normal
        value = round(rng.gauss(normal.mean, normal.std))
        low = max(normal.min, 1)
        value = max(value, low)
        if normal.max:
            value = min(value, max(normal.max, low))
    else:
        value = default
    # Servers reject max_tokens=0, and a prompt needs its request marker: at least 1.
    return max(1, value)


def request_marker(number: int, width: int) -> list[str]:
    """`number` as `width` words: its base-len(WORDS) digits, least significant first."""
    base = len(WORDS)
    digits = []
    for _ in range(width):
        number, digit = divmod(number, base)
        digits.append(WORDS[digit])
    return digits


def shared_prefix(words: int, group: int = 0) -> str:
    """The prefix every prompt with `shared_prefix_tokens = words` starts with (of prefix
    group `group`, 0-based, with `prefix_groups`); without a tokenizer."""
    return " ".join(random.Random(group_prefix_seed(group)).choices(WORDS, k=words))


class TokenPieces:
    """Texts of an exact number of tokens of one tokenizer, from single-token pieces.

    A piece is a space and a word that the tokenizer encodes as one token: the `WORDS` that
    are, when at least `MIN_WORD_PIECES` of them are; else every vocabulary entry that
    decodes to a space and ASCII letters and encodes back to one token (byte-level BPE
    vocabularies have dozens even when small). Pre-tokenizers split text at spaces
    (byte-level, Metaspace, the GPT-2/Llama-3 patterns), so n pieces in a row are n tokens;
    `fit` verifies by encoding and corrects a tokenizer for which that does not hold. A
    generator verifies its first `VERIFY_PROMPTS` prompts; when none needed a correction the
    construction is trusted (and every prompt is verified once one did).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        candidates = [" " + w for w in WORDS]
        words = [p for p, n in zip(candidates, tokenizer.count_many(candidates), strict=True) if n == 1]
        pieces = words
        if len(words) < MIN_WORD_PIECES:
            vocab = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
            found = [
                s for s in dict.fromkeys(vocab) if len(s) > 1 and s[0] == " " and s[1:].isascii() and s[1:].isalpha()
            ]
            counts = tokenizer.count_many(found) if found else []
            pieces = list(dict.fromkeys(words + [s for s, n in zip(found, counts, strict=True) if n == 1]))
        if len(pieces) < 2:
            raise PromptSourceError(f"tokenizer {tokenizer.name or tokenizer.sha256[:12]}: too few single-token words")
        self.pieces: tuple[str, ...] = tuple(pieces)
        # Whether the last `fit` had to correct its text (the tokenizer merged across pieces).
        self.corrected = False

    def draw(self, rng: random.Random, tokens: int) -> list[str]:
        """`tokens` random pieces."""
        return rng.choices(self.pieces, k=tokens) if tokens > 0 else []

    def marker(self, number: int, width: int) -> list[str]:
        """`number` as `width` pieces: its base-len(pieces) digits, least significant first."""
        base = len(self.pieces)
        digits = []
        for _ in range(width):
            number, digit = divmod(number, base)
            digits.append(self.pieces[digit])
        return digits

    def marker_width(self) -> int:
        """Pieces a request marker needs to tell `MARKER_SPAN` requests apart."""
        return max(MARKER_WORDS, math.ceil(math.log(MARKER_SPAN) / math.log(len(self.pieces))))

    def fit(self, pieces: list[str], tokens: int, rng: random.Random, keep: int = 0) -> tuple[str, int]:
        """The text of `pieces` made exactly `tokens` long if it is not already: pieces after
        the first `keep` are dropped from, or added to, the end until the count matches;
        (text, its token count)."""
        text = "".join(pieces)
        count = self.tokenizer.count(text)
        keep = max(keep, 1)
        self.corrected = count != tokens
        for _ in range(FIT_ROUNDS):
            if count == tokens:
                break
            if count > tokens and len(pieces) > keep:
                del pieces[-max(1, min(count - tokens, len(pieces) - keep)) :]
            else:
                pieces += self.draw(rng, max(tokens - count, 1))
            text = "".join(pieces)
            count = self.tokenizer.count(text)
        return text, count


_PIECES: dict[str, TokenPieces] = {}


def token_pieces(tokenizer: Tokenizer) -> TokenPieces:
    """The `TokenPieces` of a tokenizer (computed once per tokenizer content)."""
    pieces = _PIECES.get(tokenizer.sha256)
    if pieces is None or pieces.tokenizer is not tokenizer:
        pieces = _PIECES[tokenizer.sha256] = TokenPieces(tokenizer)
    return pieces


def group_prefix_seed(group: int) -> str:
    """The fixed seed of prefix group `group` (0-based): group 0 is the one shared prefix."""
    return _SHARED_PREFIX_SEED if group == 0 else f"{_SHARED_PREFIX_SEED}:{group}"


def zipf_weights(groups: int, exponent: float) -> list[float]:
    """Cumulative weights of groups 1..K under Zipf(s): group k has weight 1 / k^s."""
    return list(itertools.accumulate(1.0 / (k**exponent) for k in range(1, groups + 1)))


class PromptGenerator:
    """Seeded stream of unique synthetic prompts for one assignment.

    With a `tokenizer`, every prompt is exactly its drawn length in that tokenizer's tokens:
    the shared prefix is exactly `shared_prefix_tokens`, then the request marker and random
    single-token pieces (`TokenPieces`), and `Prompt.input_tokens` is the prompt's count.
    Prefix groups (`prefix_groups` K > 1): K different prefixes, prefix k drawn from a fixed
    seed and k (the same on every agent), each prompt drawing one uniformly or by Zipf.

    Not thread-safe; on one event loop, requests calling `next_prompt()` in turn share it
    safely (each call runs to completion without awaiting).
    """

    def __init__(self, workload: run_pb2.Workload, tokenizer: Tokenizer | None = None) -> None:
        self._rng = random.Random(workload.seed)
        synthetic = workload.synthetic  # unset source = synthetic with default lengths
        self._input = synthetic.input_tokens
        self._output = synthetic.output_tokens
        self._prefix_words = synthetic.shared_prefix_tokens
        self._groups = max(synthetic.prefix_groups, 1) if self._prefix_words else 1
        self._cum_weights: list[float] | None = None
        if self._groups > 1 and synthetic.prefix_popularity == run_pb2.PREFIX_POPULARITY_ZIPF:
            self._cum_weights = zipf_weights(self._groups, synthetic.zipf_exponent or DEFAULT_ZIPF_EXPONENT)
        self._pieces = token_pieces(tokenizer) if tokenizer is not None else None
        self._prefixes: dict[int, str] = {}
        self._prefix_pieces: dict[int, list[str]] = {}
        self._count = 0
        # Request n's marker is the number offset + n: every assignment (each stage, each agent
        # has its own seed) counts from its own offset, so request n of one assignment does not
        # repeat request n's marker of another after a shared prefix (a cache hit beyond it).
        self._marker_offset = random.Random(f"{_MARKER_SEED}:{workload.seed}").randrange(MARKER_SPAN)
        # Prompts in a row that were exact as built; from VERIFY_PROMPTS on they are not
        # re-encoded (encoding a long prompt costs milliseconds on the request path).
        self._trusted = 0
        self.group_counts = [0] * self._groups

    @property
    def count(self) -> int:
        """Prompts produced so far."""
        return self._count

    @property
    def marker_number(self) -> int:
        """The number the latest prompt's request marker writes."""
        return self._marker_offset + self._count

    def prefix(self, group: int) -> str:
        """The text of prefix group `group` (without a tokenizer: words joined by spaces)."""
        if self._pieces is not None:
            return "".join(self._group_pieces(group))
        text = self._prefixes.get(group)
        if text is None:
            text = self._prefixes[group] = shared_prefix(self._prefix_words, group)
        return text

    def _group_pieces(self, group: int) -> list[str]:
        assert self._pieces is not None
        pieces = self._prefix_pieces.get(group)
        if pieces is None:
            pieces = self._pieces.draw(random.Random(group_prefix_seed(group)), self._prefix_words)
            self._prefix_pieces[group] = pieces
        return pieces

    def _draw_group(self) -> int:
        if self._groups <= 1:
            return 0
        if self._cum_weights is not None:
            return self._rng.choices(range(self._groups), cum_weights=self._cum_weights)[0]
        return self._rng.randrange(self._groups)

    def next_prompt(self) -> Prompt:
        """The next prompt: shared prefix, request marker, then random single-token words."""
        rng = self._rng
        input_tokens = draw_length(rng, self._input, DEFAULT_INPUT_TOKENS)
        max_tokens = draw_length(rng, self._output, DEFAULT_OUTPUT_TOKENS)
        group = self._draw_group() if self._prefix_words else 0
        self.group_counts[group] += 1
        self._count += 1
        unique = max(input_tokens - self._prefix_words, 1)
        if self._pieces is not None:
            return self._exact_prompt(group, unique, max_tokens)
        words = request_marker(self.marker_number, min(MARKER_WORDS, unique))
        words += rng.choices(WORDS, k=unique - len(words))
        if self._prefix_words:
            words.insert(0, self.prefix(group))
        return Prompt(text=" ".join(words), max_tokens=max_tokens, input_tokens=self._prefix_words + unique)

    def _exact_prompt(self, group: int, unique: int, max_tokens: int) -> Prompt:
        pieces = self._pieces
        assert pieces is not None
        tail = pieces.marker(self.marker_number, min(pieces.marker_width(), unique))
        tail += pieces.draw(self._rng, unique - len(tail))
        prefix = self._group_pieces(group) if self._prefix_words else []
        target = len(prefix) + unique
        if self._trusted >= VERIFY_PROMPTS:
            return Prompt(text="".join(prefix + tail), max_tokens=max_tokens, input_tokens=target)
        text, count = pieces.fit(prefix + tail, target, self._rng, keep=len(prefix) + 1)
        if pieces.corrected:
            self._trusted = -(1 << 62)  # this tokenizer is not additive: verify every prompt
        else:
            self._trusted += 1
        return Prompt(text=text, max_tokens=max_tokens, input_tokens=count)


class DatasetPrompts:
    """Dataset entries in seeded random order, each used once per cycle."""

    def __init__(self, entries: Sequence[run_pb2.DatasetEntry], seed: int, tokenizer: Tokenizer | None = None) -> None:
        if not entries:
            raise PromptSourceError("the workload's dataset has no entries")
        self._prompts = [_entry_prompt(entry) for entry in entries]
        if tokenizer is not None:
            self._prompts = _counted(self._prompts, tokenizer)
        self._rng = random.Random(seed)
        self._order: list[int] = []
        self._next = 0
        self._count = 0

    @property
    def count(self) -> int:
        """Prompts produced so far."""
        return self._count

    def next_prompt(self) -> Prompt:
        """The next entry of the current permutation (a new permutation after the last)."""
        if self._next >= len(self._order):
            self._order = list(range(len(self._prompts)))
            self._rng.shuffle(self._order)
            self._next = 0
        prompt = self._prompts[self._order[self._next]]
        self._next += 1
        self._count += 1
        return prompt


def _entry_prompt(entry: run_pb2.DatasetEntry) -> Prompt:
    messages = [{"role": m.role, "content": m.content} for m in entry.messages] or None
    words = sum(len(m.content.split()) for m in entry.messages) if messages else len(entry.prompt.split())
    return Prompt(
        text=entry.prompt,
        max_tokens=entry.max_tokens or DEFAULT_OUTPUT_TOKENS,
        input_tokens=words,
        messages=messages,
    )


def _counted(prompts: Sequence[Prompt], tokenizer: Tokenizer) -> list[Prompt]:
    """`prompts` with `input_tokens` counted by the tokenizer, in one batch: a chat entry's
    messages' contents (the template around them is the preflight's measure), else its text."""
    texts: list[str] = []
    spans: list[int] = []
    for p in prompts:
        parts = [m["content"] for m in p.messages] if p.messages else [p.text]
        texts += parts
        spans.append(len(parts))
    counts = iter(tokenizer.count_many(texts))
    return [
        Prompt(p.text, p.max_tokens, sum(next(counts) for _ in range(n)), p.messages)
        for p, n in zip(prompts, spans, strict=True)
    ]


def prompt_source(
    workload: run_pb2.Workload,
    dataset_entries: Sequence[run_pb2.DatasetEntry] = (),
    tokenizer: Tokenizer | None = None,
) -> PromptSource:
    """The prompt source of a workload: its dataset's entries, or synthetic prompts; counted
    (dataset) or built to exact lengths (synthetic) with `tokenizer` when given."""
    if workload.WhichOneof("source") == "dataset":
        return DatasetPrompts(dataset_entries, workload.seed, tokenizer)
    return PromptGenerator(workload, tokenizer)

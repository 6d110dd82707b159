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
* the request marker: the request number written in base-len(WORDS) digits, least
  significant first, as up to `MARKER_WORDS` words (so numbers cost no extra tokens, which
  digit strings would in tokenizers that split digits), which makes the unique part of
  every prompt of the assignment different from its first words: a server's prefix cache
  cannot turn the test into a cache benchmark beyond the shared prefix;
* random words up to L in all. A prompt is never shorter than the prefix plus one word.

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

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from common.proto.loadtest.v1 import run_pb2

DEFAULT_INPUT_TOKENS = 128
DEFAULT_OUTPUT_TOKENS = 128
MARKER_WORDS = 3
# Not the workload seed: see the module docstring.
_SHARED_PREFIX_SEED = "llm-loadtest shared prefix"

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


def shared_prefix(words: int) -> str:
    """The prefix every prompt with `shared_prefix_tokens = words` starts with."""
    return " ".join(random.Random(_SHARED_PREFIX_SEED).choices(WORDS, k=words))


class PromptGenerator:
    """Seeded stream of unique synthetic prompts for one assignment.

    Not thread-safe; on one event loop, requests calling `next_prompt()` in turn share it
    safely (each call runs to completion without awaiting).
    """

    def __init__(self, workload: run_pb2.Workload) -> None:
        self._rng = random.Random(workload.seed)
        synthetic = workload.synthetic  # unset source = synthetic with default lengths
        self._input = synthetic.input_tokens
        self._output = synthetic.output_tokens
        self._prefix_words = synthetic.shared_prefix_tokens
        self._prefix = shared_prefix(self._prefix_words) if self._prefix_words else ""
        self._count = 0

    @property
    def count(self) -> int:
        """Prompts produced so far."""
        return self._count

    def next_prompt(self) -> Prompt:
        """The next prompt: shared prefix, request marker, then random single-token words."""
        rng = self._rng
        input_tokens = draw_length(rng, self._input, DEFAULT_INPUT_TOKENS)
        max_tokens = draw_length(rng, self._output, DEFAULT_OUTPUT_TOKENS)
        self._count += 1
        unique = max(input_tokens - self._prefix_words, 1)
        words = request_marker(self._count, min(MARKER_WORDS, unique))
        words += rng.choices(WORDS, k=unique - len(words))
        if self._prefix:
            words.insert(0, self._prefix)
        return Prompt(text=" ".join(words), max_tokens=max_tokens, input_tokens=self._prefix_words + unique)


class DatasetPrompts:
    """Dataset entries in seeded random order, each used once per cycle."""

    def __init__(self, entries: Sequence[run_pb2.DatasetEntry], seed: int) -> None:
        if not entries:
            raise PromptSourceError("the workload's dataset has no entries")
        self._prompts = [_entry_prompt(entry) for entry in entries]
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


def prompt_source(workload: run_pb2.Workload, dataset_entries: Sequence[run_pb2.DatasetEntry] = ()) -> PromptSource:
    """The prompt source of a workload: its dataset's entries, or synthetic prompts."""
    if workload.WhichOneof("source") == "dataset":
        return DatasetPrompts(dataset_entries, workload.seed)
    return PromptGenerator(workload)

"""Synthetic prompts: unique, seeded text of a requested length in tokens.

Prompts are built from `WORDS`, common English words that are a single token (with their
leading space) in common BPE vocabularies (GPT-2/cl100k/Llama families), so the word count
of a prompt is close to its token count without shipping a tokenizer. Each prompt starts
with its request number followed by random words, so no two prompts of an assignment (nor,
with per-agent seeds, of a run) share a prefix: a server's prefix cache cannot turn the
load test into a cache benchmark.

Everything random comes from one `random.Random(seed)`, so the i-th prompt of an
assignment is the same on every repetition of the run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from common.proto.loadtest.v1 import run_pb2

DEFAULT_INPUT_TOKENS = 128
DEFAULT_OUTPUT_TOKENS = 128

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


@dataclass(frozen=True, slots=True)
class Prompt:
    """One request's text and requested output length."""

    text: str
    max_tokens: int
    input_tokens: int


def _draw(rng: random.Random, dist: run_pb2.LengthDistribution, default: int) -> int:
    kind = dist.WhichOneof("distribution")
    if kind == "fixed":
        value = dist.fixed
    elif kind == "uniform":
        low, high = sorted((dist.uniform.min, dist.uniform.max))
        value = rng.randint(low, high)
    else:
        value = default
    # Servers reject max_tokens=0, and a prompt needs its request number: at least 1.
    return max(1, value)


class PromptGenerator:
    """Seeded stream of unique prompts for one assignment.

    Not thread-safe; on one event loop, workers calling `next_prompt()` in turn share it
    safely (each call runs to completion without awaiting).
    """

    def __init__(self, workload: run_pb2.Workload) -> None:
        self._rng = random.Random(workload.seed)
        synthetic = workload.synthetic  # unset source = synthetic with default lengths
        self._input = synthetic.input_tokens
        self._output = synthetic.output_tokens
        self._count = 0

    @property
    def count(self) -> int:
        """Prompts produced so far."""
        return self._count

    def next_prompt(self) -> Prompt:
        """The next prompt: unique request number, then random single-token words."""
        rng = self._rng
        input_tokens = _draw(rng, self._input, DEFAULT_INPUT_TOKENS)
        max_tokens = _draw(rng, self._output, DEFAULT_OUTPUT_TOKENS)
        self._count += 1
        words = rng.choices(WORDS, k=input_tokens - 1)
        text = f"{self._count} {' '.join(words)}" if words else str(self._count)
        return Prompt(text=text, max_tokens=max_tokens, input_tokens=input_tokens)

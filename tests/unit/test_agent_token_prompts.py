"""Synthetic prompts with the model's tokenizer: exact lengths, prefix groups, counting."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from agent.prompts import VERIFY_PROMPTS, DatasetPrompts, PromptGenerator, token_pieces, zipf_weights
from agent.sample import RequestSample
from agent.tokens import estimate_output_tokens
from common.proto.loadtest.v1 import run_pb2
from common.tokenizer import Tokenizer
from tests.tokenizers_fixture import build_bpe_tokenizer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_path(build_bpe_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def synthetic(seed: int, lengths: run_pb2.LengthDistribution, **kwargs: object) -> run_pb2.Workload:
    return run_pb2.Workload(
        seed=seed,
        synthetic=run_pb2.SyntheticWorkload(input_tokens=lengths, **kwargs),  # type: ignore[arg-type]
    )


def test_the_fixture_makes_words_several_tokens(tokenizer: Tokenizer) -> None:
    # Otherwise the exactness below would hold for word counts too and prove nothing.
    text = "history relationship development organization"
    assert tokenizer.count(text) > 2 * len(text.split())


@pytest.mark.parametrize("prefix", [0, 1, 7, 64])
def test_prompts_are_exactly_their_length_in_tokens(tokenizer: Tokenizer, prefix: int) -> None:
    for n in [1, 2, 3, 4, 5, 8, 13, 31, 64, 65, 100, 127, 128, 129, 300, 512, 1000, 2049]:
        gen = PromptGenerator(synthetic(n, run_pb2.LengthDistribution(fixed=n), shared_prefix_tokens=prefix), tokenizer)
        for _ in range(3):
            prompt = gen.next_prompt()
            expected = max(n, prefix + 1)  # a prompt is never shorter than the prefix plus one
            assert tokenizer.count(prompt.text) == prompt.input_tokens == expected, (n, prefix)


def test_uniform_lengths_are_exact_past_the_verified_prompts(tokenizer: Tokenizer) -> None:
    gen = PromptGenerator(
        synthetic(
            5, run_pb2.LengthDistribution(uniform=run_pb2.UniformLength(min=1, max=700)), shared_prefix_tokens=20
        ),
        tokenizer,
    )
    counts = []
    for _ in range(VERIFY_PROMPTS + 40):  # beyond the prompts re-encoded as they are built
        prompt = gen.next_prompt()
        counts.append((tokenizer.count(prompt.text), prompt.input_tokens))
    assert all(real == claimed for real, claimed in counts), counts
    assert len({c for c, _ in counts}) > 20  # the lengths really varied


def test_the_shared_prefix_is_exactly_its_tokens_on_every_agent(tokenizer: Tokenizer) -> None:
    a = PromptGenerator(synthetic(1, run_pb2.LengthDistribution(fixed=200), shared_prefix_tokens=50), tokenizer)
    b = PromptGenerator(synthetic(2, run_pb2.LengthDistribution(fixed=200), shared_prefix_tokens=50), tokenizer)
    ids = [tokenizer.encode(g.next_prompt().text) for g in (a, a, b)]
    assert ids[0][:50] == ids[1][:50] == ids[2][:50]
    assert ids[0][50:] != ids[1][50:] and ids[0][50:] != ids[2][50:]
    assert tokenizer.count(a.prefix(0)) == 50


def test_prefix_groups_differ_and_are_the_same_on_every_agent(tokenizer: Tokenizer) -> None:
    def gen(seed: int) -> PromptGenerator:
        w = synthetic(seed, run_pb2.LengthDistribution(fixed=80), shared_prefix_tokens=40, prefix_groups=4)
        return PromptGenerator(w, tokenizer)

    a, b = gen(1), gen(99)
    prefixes = [a.prefix(k) for k in range(4)]
    assert len(set(prefixes)) == 4
    assert prefixes == [b.prefix(k) for k in range(4)]
    seen = collections.Counter()
    for _ in range(200):
        prompt = a.next_prompt()
        starts = [k for k, p in enumerate(prefixes) if prompt.text.startswith(p)]
        assert len(starts) == 1
        seen[starts[0]] += 1
        assert tokenizer.count(prompt.text) == prompt.input_tokens == 80
    assert sorted(seen) == [0, 1, 2, 3]
    assert [seen[k] for k in range(4)] == a.group_counts


def test_prefix_groups_without_a_tokenizer_keep_group_zero_as_the_shared_prefix() -> None:
    from agent.prompts import shared_prefix

    w = synthetic(3, run_pb2.LengthDistribution(fixed=30), shared_prefix_tokens=10, prefix_groups=3)
    gen = PromptGenerator(w)
    assert gen.prefix(0) == shared_prefix(10)
    assert len({gen.prefix(k) for k in range(3)}) == 3
    for _ in range(30):
        prompt = gen.next_prompt()
        assert any(prompt.text.startswith(gen.prefix(k) + " ") for k in range(3))
        assert len(prompt.text.split()) == prompt.input_tokens == 30


@pytest.mark.parametrize(
    ("popularity", "exponent"),
    [
        (run_pb2.PREFIX_POPULARITY_UNIFORM, 0.0),
        (run_pb2.PREFIX_POPULARITY_ZIPF, 1.0),
        (run_pb2.PREFIX_POPULARITY_ZIPF, 1.5),
    ],
)
def test_group_frequencies_follow_the_popularity(popularity: int, exponent: float) -> None:
    k, n = 8, 20_000
    w = synthetic(
        7,
        run_pb2.LengthDistribution(fixed=4),
        shared_prefix_tokens=2,
        prefix_groups=k,
        prefix_popularity=popularity,
        zipf_exponent=exponent,
    )
    gen = PromptGenerator(w)
    for _ in range(n):
        gen.next_prompt()
    if popularity == run_pb2.PREFIX_POPULARITY_ZIPF:
        cum = zipf_weights(k, exponent)
        weights = [cum[0]] + [cum[i] - cum[i - 1] for i in range(1, k)]
    else:
        weights = [1.0] * k
    total = sum(weights)
    for group, count in enumerate(gen.group_counts):
        p = weights[group] / total
        sd = (n * p * (1 - p)) ** 0.5
        assert abs(count - n * p) < 5 * sd, (group, count, n * p)
    if popularity == run_pb2.PREFIX_POPULARITY_ZIPF:
        assert gen.group_counts == sorted(gen.group_counts, reverse=True)


def test_dataset_prompts_are_counted_with_the_tokenizer(tokenizer: Tokenizer) -> None:
    entries = [
        run_pb2.DatasetEntry(prompt="the history of the relationship"),
        run_pb2.DatasetEntry(
            messages=[
                run_pb2.ChatMessage(role="system", content="You are a development organization."),
                run_pb2.ChatMessage(role="user", content="Tell me about the population."),
            ]
        ),
    ]
    source = DatasetPrompts(entries, seed=1, tokenizer=tokenizer)
    got = {p.text or p.messages[0]["content"]: p.input_tokens for p in (source.next_prompt(), source.next_prompt())}  # type: ignore[index]
    assert got["the history of the relationship"] == tokenizer.count("the history of the relationship")
    assert got["You are a development organization."] == tokenizer.count(
        "You are a development organization."
    ) + tokenizer.count("Tell me about the population.")
    # Without the tokenizer they are words, which for this tokenizer is far off.
    plain = DatasetPrompts(entries[:1], seed=1).next_prompt()
    assert plain.input_tokens == 5 < got["the history of the relationship"]


def test_pieces_are_one_token_each(tokenizer: Tokenizer) -> None:
    pieces = token_pieces(tokenizer).pieces
    assert len(pieces) >= 2
    assert tokenizer.count_many(list(pieces)) == [1] * len(pieces)
    assert token_pieces(tokenizer) is token_pieces(tokenizer)


def test_output_tokens_without_usage_are_counted_from_the_answer(tokenizer: Tokenizer) -> None:
    sample = RequestSample(
        status=run_pb2.REQUEST_STATUS_OK, output_tokens=3, answer_chunks=["The history", " of traffic."]
    )
    assert (
        estimate_output_tokens(sample, tokenizer) == tokenizer.count("The history of traffic.") == sample.output_tokens
    )
    assert sample.output_tokens != 3
    with_usage = RequestSample(
        status=run_pb2.REQUEST_STATUS_OK, output_tokens=3, usage_from_server=True, answer_chunks=["a b c d"]
    )
    assert estimate_output_tokens(with_usage, tokenizer) == 3
    assert estimate_output_tokens(RequestSample(output_tokens=2, answer_chunks=["x"]), None) == 2
    not_collected = RequestSample(status=run_pb2.REQUEST_STATUS_OK, output_tokens=2)
    assert estimate_output_tokens(not_collected, tokenizer) == 2
    empty = RequestSample(status=run_pb2.REQUEST_STATUS_OK, output_tokens=2, answer_chunks=[])
    assert estimate_output_tokens(empty, tokenizer) == 2  # the parser's own estimate stays
    reasoning = RequestSample(status=run_pb2.REQUEST_STATUS_OK, reasoning_tokens=4, answer_chunks=["the"])
    assert estimate_output_tokens(reasoning, tokenizer) == 4 + tokenizer.count("the")


def test_tokenizer_path_of_a_model_directory(tmp_path: Path) -> None:
    build_bpe_tokenizer(tmp_path / "model" / "tokenizer.json")
    assert Tokenizer.from_path(tmp_path / "model").vocab_size == 400

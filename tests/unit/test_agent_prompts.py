"""Synthetic prompts: seeded, unique, of the requested length."""

from __future__ import annotations

import pytest

from agent.prompts import DEFAULT_INPUT_TOKENS, DEFAULT_OUTPUT_TOKENS, WORDS, PromptGenerator
from common.proto.loadtest.v1 import run_pb2

pytestmark = pytest.mark.timeout(60)


def workload(
    seed: int,
    input_tokens: run_pb2.LengthDistribution | None = None,
    output_tokens: run_pb2.LengthDistribution | None = None,
) -> run_pb2.Workload:
    synthetic = run_pb2.SyntheticWorkload()
    if input_tokens is not None:
        synthetic.input_tokens.CopyFrom(input_tokens)
    if output_tokens is not None:
        synthetic.output_tokens.CopyFrom(output_tokens)
    return run_pb2.Workload(seed=seed, synthetic=synthetic)


def test_defaults_when_unset() -> None:
    prompt = PromptGenerator(run_pb2.Workload(seed=1)).next_prompt()
    assert prompt.max_tokens == DEFAULT_OUTPUT_TOKENS
    assert len(prompt.text.split()) == DEFAULT_INPUT_TOKENS


def test_fixed_lengths_in_words() -> None:
    gen = PromptGenerator(
        workload(
            5,
            run_pb2.LengthDistribution(fixed=300),
            run_pb2.LengthDistribution(fixed=17),
        )
    )
    for _ in range(10):
        prompt = gen.next_prompt()
        assert len(prompt.text.split()) == 300 == prompt.input_tokens
        assert prompt.max_tokens == 17


def test_uniform_lengths_stay_in_bounds_and_vary() -> None:
    gen = PromptGenerator(
        workload(
            5,
            run_pb2.LengthDistribution(uniform=run_pb2.UniformLength(min=10, max=20)),
            run_pb2.LengthDistribution(uniform=run_pb2.UniformLength(min=30, max=31)),
        )
    )
    prompts = [gen.next_prompt() for _ in range(200)]
    lengths = {len(p.text.split()) for p in prompts}
    assert lengths <= set(range(10, 21))
    assert len(lengths) > 5
    assert {p.max_tokens for p in prompts} == {30, 31}


def test_same_seed_same_prompts_other_seed_other_prompts() -> None:
    a = [PromptGenerator(workload(42)).next_prompt() for _ in range(1)]
    gen1, gen2, gen3 = (PromptGenerator(workload(s)) for s in (42, 42, 43))
    seq1 = [gen1.next_prompt().text for _ in range(20)]
    seq2 = [gen2.next_prompt().text for _ in range(20)]
    seq3 = [gen3.next_prompt().text for _ in range(20)]
    assert seq1 == seq2
    assert seq1[0] == a[0].text
    assert all(x != y for x, y in zip(seq1, seq3, strict=True))


def test_prompts_are_unique_from_their_first_words() -> None:
    gen = PromptGenerator(workload(9, run_pb2.LengthDistribution(fixed=64)))
    texts = [gen.next_prompt().text for _ in range(2000)]
    assert len(set(texts)) == len(texts)
    # Even the first 8 words differ, so no prefix-cache block is shared.
    assert len({" ".join(t.split()[:8]) for t in texts}) == len(texts)
    assert texts[0].split()[0] == "1"
    assert texts[1].split()[0] == "2"


def test_words_come_from_the_single_token_list() -> None:
    assert len(WORDS) >= 300
    assert len(set(WORDS)) == len(WORDS)
    assert all(w.isalpha() and w.islower() for w in WORDS)
    prompt = PromptGenerator(workload(1)).next_prompt()
    assert set(prompt.text.split()[1:]) <= set(WORDS)


def test_zero_lengths_are_clamped_to_one() -> None:
    prompt = PromptGenerator(
        workload(1, run_pb2.LengthDistribution(fixed=0), run_pb2.LengthDistribution(fixed=0))
    ).next_prompt()
    assert prompt.text == "1"
    assert prompt.max_tokens == 1

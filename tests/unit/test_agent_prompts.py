"""Prompt sources: seeded, unique synthetic prompts of the requested length; dataset entries."""

from __future__ import annotations

import statistics

import pytest

from agent.prompts import (
    DEFAULT_INPUT_TOKENS,
    DEFAULT_OUTPUT_TOKENS,
    WORDS,
    DatasetPrompts,
    PromptGenerator,
    PromptSourceError,
    prompt_source,
    request_marker,
    shared_prefix,
)
from common.proto.loadtest.v1 import run_pb2

pytestmark = pytest.mark.timeout(60)


def workload(
    seed: int,
    input_tokens: run_pb2.LengthDistribution | None = None,
    output_tokens: run_pb2.LengthDistribution | None = None,
    shared_prefix_tokens: int = 0,
) -> run_pb2.Workload:
    synthetic = run_pb2.SyntheticWorkload(shared_prefix_tokens=shared_prefix_tokens)
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
    texts, numbers = [], []
    for _ in range(2000):
        texts.append(gen.next_prompt().text)
        numbers.append(gen.marker_number)
    assert len(set(texts)) == len(texts)
    # Even the first 8 words differ, so no prefix-cache block is shared.
    assert len({" ".join(t.split()[:8]) for t in texts}) == len(texts)
    # The request marker: the request number (from the assignment's own offset) in
    # base-len(WORDS) words, least significant first.
    assert numbers[1] == numbers[0] + 1
    assert texts[0].split()[:3] == request_marker(numbers[0], 3)
    assert texts[1].split()[:3] == request_marker(numbers[1], 3)
    assert request_marker(1, 3) == [WORDS[1], WORDS[0], WORDS[0]]
    assert request_marker(len(WORDS) + 5, 2) == [WORDS[5], WORDS[1]]


def test_assignments_number_their_markers_from_their_own_offsets() -> None:
    """Request n of two assignments (other stages or agents: other seeds) has different
    markers, so after a shared prefix their prompts part at once."""
    firsts = []
    for seed in (1, 2, 3):
        gen = PromptGenerator(workload(seed, run_pb2.LengthDistribution(fixed=64)))
        gen.next_prompt()
        firsts.append(gen.marker_number)
    assert len(set(firsts)) == 3


def test_words_come_from_the_single_token_list() -> None:
    assert len(WORDS) >= 300
    assert len(set(WORDS)) == len(WORDS)
    assert all(w.isalpha() and w.islower() for w in WORDS)
    prompt = PromptGenerator(workload(1)).next_prompt()
    assert set(prompt.text.split()) <= set(WORDS)  # the marker is made of them too


def test_zero_lengths_are_clamped_to_one() -> None:
    gen = PromptGenerator(workload(1, run_pb2.LengthDistribution(fixed=0), run_pb2.LengthDistribution(fixed=0)))
    prompt = gen.next_prompt()
    assert prompt.text == request_marker(gen.marker_number, 1)[0]  # the marker of request 1, one word
    assert prompt.max_tokens == 1


def test_normal_lengths_are_rounded_clipped_and_centred() -> None:
    normal = run_pb2.NormalLength(mean=100, std=20, min=70, max=120)
    gen = PromptGenerator(
        workload(3, run_pb2.LengthDistribution(normal=normal), run_pb2.LengthDistribution(normal=normal))
    )
    prompts = [gen.next_prompt() for _ in range(2000)]
    lengths = [len(p.text.split()) for p in prompts]
    assert lengths == [p.input_tokens for p in prompts]
    assert min(lengths) == 70
    assert max(lengths) == 120  # clipped at both ends
    assert 95 <= statistics.mean(lengths) <= 100  # clipping 1.5 sd above and 1 sd below
    assert 70 <= min(p.max_tokens for p in prompts) <= max(p.max_tokens for p in prompts) <= 120


def test_shared_prefix_then_unique_rest() -> None:
    gen = PromptGenerator(workload(4, run_pb2.LengthDistribution(fixed=200), shared_prefix_tokens=150))
    other_agent = PromptGenerator(workload(5, run_pb2.LengthDistribution(fixed=200), shared_prefix_tokens=150))
    prefix = shared_prefix(150)
    assert len(prefix.split()) == 150
    texts = [gen.next_prompt().text for _ in range(500)] + [other_agent.next_prompt().text]
    for text in texts:
        assert text.startswith(prefix + " ")
        assert len(text.split()) == 200
    rests = {" ".join(t.split()[150:158]) for t in texts[:500]}
    assert len(rests) == 500  # unique right after the prefix


def test_prefix_longer_than_the_prompt_keeps_one_unique_word() -> None:
    gen = PromptGenerator(workload(4, run_pb2.LengthDistribution(fixed=10), shared_prefix_tokens=16))
    text = gen.next_prompt().text
    assert text == shared_prefix(16) + " " + request_marker(gen.marker_number, 1)[0]


def entries() -> list[run_pb2.DatasetEntry]:
    return [
        run_pb2.DatasetEntry(prompt="one two three", max_tokens=7),
        run_pb2.DatasetEntry(
            prompt="hello there",
            messages=[
                run_pb2.ChatMessage(role="system", content="be brief"),
                run_pb2.ChatMessage(role="user", content="hello there"),
            ],
        ),
        run_pb2.DatasetEntry(prompt="four five", max_tokens=3),
    ]


def test_dataset_cycles_seeded_permutations() -> None:
    source = DatasetPrompts(entries(), seed=11)
    texts = [source.next_prompt().text for _ in range(30)]
    for cycle in range(10):  # each entry once per cycle
        assert sorted(texts[3 * cycle : 3 * cycle + 3]) == ["four five", "hello there", "one two three"]
    assert len({tuple(texts[i : i + 3]) for i in range(0, 30, 3)}) > 1  # a new order per cycle
    again = DatasetPrompts(entries(), seed=11)
    assert [again.next_prompt().text for _ in range(30)] == texts
    other = DatasetPrompts(entries(), seed=12)
    assert [other.next_prompt().text for _ in range(30)] != texts


def test_dataset_prompt_fields() -> None:
    source = DatasetPrompts(entries(), seed=1)
    prompts = {p.text: p for p in (source.next_prompt() for _ in range(3))}
    assert prompts["one two three"].max_tokens == 7
    assert prompts["one two three"].messages is None
    assert prompts["one two three"].input_tokens == 3
    chat = prompts["hello there"]
    assert chat.max_tokens == DEFAULT_OUTPUT_TOKENS  # none in the entry
    assert chat.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    assert chat.input_tokens == 4


def test_prompt_source_picks_by_workload() -> None:
    dataset = run_pb2.Workload(seed=1, dataset=run_pb2.Dataset(format=run_pb2.DATASET_FORMAT_JSONL))
    assert isinstance(prompt_source(dataset, entries()), DatasetPrompts)
    assert isinstance(prompt_source(workload(1)), PromptGenerator)
    with pytest.raises(PromptSourceError):
        prompt_source(dataset, [])

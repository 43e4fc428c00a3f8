"""The grain pipelines: seeded shuffling, process shards, global-batch bucketing, exact resume."""

import json
import logging

import numpy as np
import pytest

from jaxalign.data.datasets import MathExample, gsm8k_sft_trace, load_benchmark
from jaxalign.data.pipeline import make_example_iterator, make_sft_iterator
from jaxalign.data.tokenize import pick_bucket
from jaxalign.data.tokenizer import byte_tokenizer

N = 24
BUCKETS = (8, 16, 32)
EOS = 0


def pair(i: int) -> tuple[str, str]:
    """Example i: a 3-token prompt naming i, a response of i % 20 + 1 tokens (+ EOS)."""
    return f"{i:02d}:", "x" * (i % 20 + 1)


def length(i: int) -> int:  # prompt + response + EOS tokens
    return 3 + i % 20 + 1 + 1


PAIRS = [pair(i) for i in range(N)]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def sft(tok, **kwargs):
    args = dict(batch_size=4, seq_buckets=BUCKETS, seed=0, shard_index=0, shard_count=1)
    return make_sft_iterator(PAIRS, tok, **(args | kwargs))


def ids_of(tok, batch) -> list[int]:
    """Which examples a batch holds, read back from their prompts."""
    return [int(tok.decode(row[:2])) for row in batch["input_ids"]]


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_rows_are_the_examples(tok):
    batch = next(sft(tok))
    for r, i in enumerate(ids_of(tok, batch)):
        prompt, response = pair(i)
        n = length(i)
        np.testing.assert_array_equal(
            batch["labels"][r, : n - 1], tok(prompt + response)["input_ids"][1:] + [EOS]
        )
        # The mask covers the response and the EOS the model must learn to emit.
        np.testing.assert_array_equal(
            np.flatnonzero(batch["response_mask"][r]), np.arange(2, n - 1)
        )


def test_deterministic_by_seed_and_epochs_are_permutations(tok):
    order = [ids_of(tok, b) for b in sft(tok, num_epochs=2)]
    assert order == [ids_of(tok, b) for b in sft(tok, num_epochs=2)]
    assert len(order) == 2 * N // 4
    epoch0, epoch1 = sum(order[:6], []), sum(order[6:], [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(N))  # epochs are not mixed
    assert epoch0 != epoch1  # and each is shuffled afresh
    other = sum((ids_of(tok, b) for b in sft(tok, seed=1)), [])
    assert sorted(other) == list(range(N)) and other != epoch0


def test_two_processes_split_each_global_batch(tok):
    single = list(sft(tok, batch_size=4))
    shards = [list(sft(tok, batch_size=2, shard_index=p, shard_count=2)) for p in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(single) == N // 4
    seen = [sum((ids_of(tok, b) for b in shard), []) for shard in shards]
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(N))
    for whole, part0, part1 in zip(single, *shards, strict=True):
        # Process-ordered concatenation is the single-process batch, row for row.
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([part0[key], part1[key]]), whole[key])


def test_bucket_is_the_global_batch_longest_row(tok):
    shapes, narrower_alone = set(), 0
    shards = [sft(tok, batch_size=1, shard_index=p, shard_count=2, num_epochs=3) for p in range(2)]
    for part0, part1 in zip(*shards, strict=True):
        rows = ids_of(tok, part0) + ids_of(tok, part1)
        width = pick_bucket(max(length(i) for i in rows), BUCKETS)
        assert part0["input_ids"].shape == part1["input_ids"].shape == (1, width)
        shapes.add(part0["input_ids"].shape)
        alone = pick_bucket(max(length(i) for i in ids_of(tok, part0)), BUCKETS)
        narrower_alone += alone < width
    assert shapes == {(1, t) for t in BUCKETS}  # every bucket occurs, nothing else does
    assert narrower_alone > 0  # a process pads past its own rows to agree with the other


def test_state_round_trips_exactly(tok):
    it = sft(tok, num_epochs=3)
    take(it, 5)  # past the first epoch boundary (6 batches per epoch) after the next 4
    state = json.loads(json.dumps(it.get_state()))  # as the checkpoint's JSON stores it
    expected = take(it, 4)
    fresh = sft(tok, num_epochs=3)
    fresh.set_state(state)
    assert_same_batches(take(fresh, 4), expected)
    # The state counts global batches: two processes resume the same stream.
    halves = [sft(tok, batch_size=2, shard_index=p, shard_count=2, num_epochs=3) for p in range(2)]
    for half in halves:
        half.set_state(state)
    for whole, part0, part1 in zip(expected, take(halves[0], 4), take(halves[1], 4), strict=True):
        np.testing.assert_array_equal(
            np.concatenate([part0["input_ids"], part1["input_ids"]]), whole["input_ids"]
        )


def test_state_from_another_pipeline_is_refused(tok):
    state = sft(tok, seed=0).get_state()
    with pytest.raises(ValueError, match=r"different pipeline \(differs in \['seed'\]"):
        sft(tok, seed=1).set_state(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        sft(tok, batch_size=2).set_state(state)
    other_data = make_sft_iterator(
        PAIRS[:-1] + [("23:", "y")], tok, batch_size=4, seq_buckets=BUCKETS, seed=0,
        shard_index=0, shard_count=1,
    )  # fmt: skip
    with pytest.raises(ValueError, match="checksum"):
        other_data.set_state(state)


def test_over_long_examples_follow_the_policy(tok, caplog):
    # Bucket 8 holds 9 tokens: examples with i % 20 >= 5 do not fit.
    with pytest.raises(ValueError, match=r"example 5 \(data.jsonl:6\): 10 tokens"):
        sft(tok, seq_buckets=(8,), sources=[f"data.jsonl:{i + 1}" for i in range(N)])
    with caplog.at_level(logging.WARNING):
        dropped = sft(tok, seq_buckets=(8,), truncate="drop")
    assert "dropped 15 of 24 rows longer than 9 tokens" in caplog.text
    kept = sum((ids_of(tok, b) for b in dropped), [])
    # 9 examples fit; the global batch of 4 leaves one out of the single epoch.
    assert dropped.num_batches == 2 and len(set(kept)) == 8
    assert set(kept) < {0, 1, 2, 3, 4, 20, 21, 22, 23}
    with caplog.at_level(logging.WARNING):
        cut = list(sft(tok, seq_buckets=(8,), truncate="right"))
    assert "truncated 15 of 24 rows" in caplog.text
    assert len(cut) == N // 4 and {b["input_ids"].shape for b in cut} == {(4, 8)}


def test_unhappy_arguments(tok):
    with pytest.raises(ValueError, match="do not fill one global batch"):
        sft(tok, batch_size=N + 1)
    with pytest.raises(ValueError, match="shard_index 2 is not in"):
        sft(tok, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="no examples"):
        make_sft_iterator([], tok, batch_size=1, seq_buckets=BUCKETS, seed=0)
    with pytest.raises(ValueError, match="num_epochs"):
        sft(tok, num_epochs=0)


def test_endless_and_default_shard(tok):
    it = make_sft_iterator(PAIRS, tok, batch_size=4, seq_buckets=BUCKETS, seed=0, num_epochs=None)
    order = [ids_of(tok, b) for b in take(it, 18)]  # three epochs, one process by default
    for e in range(3):
        assert sorted(sum(order[6 * e : 6 * e + 6], [])) == list(range(N))


def test_example_iterator_shards_questions():
    examples = [MathExample(f"q{i}", str(i)) for i in range(10)]
    shards = [
        list(make_example_iterator(examples, batch_size=2, seed=3, shard_index=p, shard_count=2))
        for p in range(2)
    ]
    assert len(shards[0]) == 2  # 10 examples, global batch 4: the remainder is dropped
    seen = [ex.answer for shard in shards for batch in shard for ex in batch]
    assert len(seen) == len(set(seen)) == 8
    it = make_example_iterator(examples, batch_size=2, seed=3, shard_count=1, shard_index=0)
    first = next(it)
    state = it.get_state()
    rest = list(it)
    again = make_example_iterator(examples, batch_size=2, seed=3, shard_count=1, shard_index=0)
    again.set_state(state)
    assert list(again) == rest and first not in rest


def test_gsm8k_traces_bucket(tok, shared_data):
    train = load_benchmark("gsm8k", shared_data, split="train")[:64]
    pairs = [gsm8k_sft_trace(ex) for ex in train]
    buckets = (1024, 2048)
    it = make_sft_iterator(
        pairs, tok, batch_size=8, seq_buckets=buckets, seed=0, shard_index=0, shard_count=1,
        sources=[ex.source for ex in train],
    )  # fmt: skip
    batches = list(it)
    assert len(batches) == 8
    assert {b["input_ids"].shape[1] for b in batches} <= set(buckets)
    for b in batches:  # every row has response tokens and ends with EOS inside the mask
        assert b["response_mask"].any(axis=1).all()
        last = b["response_mask"].shape[1] - 1 - np.argmax(b["response_mask"][:, ::-1], axis=1)
        np.testing.assert_array_equal(b["labels"][np.arange(8), last], EOS)

"""Sequence packing: the row plan, the arrays, the model's segment masking and positions,
SFT losses and gradients equal to the unpacked batch's, and the resumable packed iterator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.algorithms.sft import sft_loss_fn
from jaxalign.data import packing
from jaxalign.data.pipeline import make_packed_sft_iterator
from jaxalign.data.tokenize import collate_prompt_and_output
from jaxalign.data.tokenizer import byte_tokenizer
from jaxalign.models.qwen2 import init_model, positions_from_segments, tiny


def test_first_fit_fills_rows_in_order_and_refuses_what_cannot_fit():
    # positions needed: 5, 3, 4, 2, 6 (length - 1) into rows of 8
    assert packing.plan_rows([6, 4, 5, 3, 7], 8) == [[0, 1], [2, 3], [4]]
    assert packing.plan_rows([9, 2], 8) == [[0], [1]]
    with pytest.raises(ValueError, match="sequence 1 has 10 tokens"):
        packing.plan_rows([3, 10], 8)
    with pytest.raises(ValueError, match="sequence 0 has 1 tokens"):
        packing.plan_rows([1], 8)


def test_packed_arrays_by_hand():
    prompts, responses = [[1, 2], [3], [4, 5]], [[6, 7], [8, 9], [10]]
    out = packing.collate_packed(prompts, responses, [[0, 1], [2]], pad_id=0, width=6)
    np.testing.assert_array_equal(out["input_ids"], [[1, 2, 6, 3, 8, 0], [4, 5, 0, 0, 0, 0]])
    np.testing.assert_array_equal(out["labels"], [[2, 6, 7, 8, 9, 0], [5, 10, 0, 0, 0, 0]])
    np.testing.assert_array_equal(out["response_mask"],
                                  [[0, 1, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 2, 2, 0], [1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(positions_from_segments(out["segment_ids"]),
                                  [[0, 1, 2, 0, 1, 0], [0, 1, 0, 0, 0, 0]])


def _sequences(n, seed=0, vocab=250):
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(1, vocab, rng.integers(2, 9))) for _ in range(n)]
    responses = [list(rng.integers(1, vocab, rng.integers(1, 12))) for _ in range(n)]
    return prompts, responses


def test_packed_log_probs_equal_each_sequence_alone():
    model = init_model(tiny(vocab_size=256), seed=1)
    prompts, responses = _sequences(7)
    rows = packing.plan_rows([len(p) + len(r) for p, r in zip(prompts, responses, strict=True)], 24)
    assert max(len(r) for r in rows) >= 2  # some row really holds several sequences
    packed = packing.collate_packed(prompts, responses, rows, pad_id=0, width=24)
    logits = model(packed["input_ids"], segment_ids=packed["segment_ids"])
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            ids = jnp.asarray([prompts[i] + responses[i]])
            alone = model(ids[:, :-1])
            n = ids.shape[1] - 1
            np.testing.assert_allclose(logits[r, at:at + n], alone[0], atol=2e-5, rtol=1e-5)
            at += n


@pytest.mark.parametrize("normalize_constant", [0.0, 4.0])
def test_sft_loss_and_gradients_of_a_packed_batch_equal_the_unpacked_batch(normalize_constant):
    model = init_model(tiny(vocab_size=256), seed=2)
    prompts, responses = _sequences(6, seed=3)
    rows = packing.plan_rows([len(p) + len(r) for p, r in zip(prompts, responses, strict=True)], 32)
    packed = packing.collate_packed(prompts, responses, rows, pad_id=0, width=32)
    unpacked = collate_prompt_and_output(prompts, responses, 0, pad_to=32)
    assert len(rows) < len(prompts)
    loss_fn = sft_loss_fn(normalize_constant=normalize_constant)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_and_grad(batch):
        def objective(p):
            return loss_fn(nnx.merge(graphdef, p), batch)[0]

        return jax.value_and_grad(objective)(params)

    loss_p, grad_p = loss_and_grad({k: jnp.asarray(v) for k, v in packed.items()})
    loss_u, grad_u = loss_and_grad({k: jnp.asarray(v) for k, v in unpacked.items()})
    assert float(loss_p) == pytest.approx(float(loss_u), rel=1e-5)
    for a, b in zip(jax.tree.leaves(grad_p), jax.tree.leaves(grad_u), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def _pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [(f"Q{i}: " + "x" * int(rng.integers(1, 20)), "y" * int(rng.integers(1, 30)))
            for i in range(n)]


def test_the_packed_iterator_covers_each_sequence_once_per_epoch_and_resumes_exactly():
    tok, pairs = byte_tokenizer(), _pairs(60)
    it = make_packed_sft_iterator(pairs, tok, batch_size=2, width=64, seed=5, num_epochs=None)
    assert 0.5 < it.stats["packed_fill"] <= 1.0
    per_epoch = it.rows_per_epoch // 2
    seen = []
    for _ in range(per_epoch):
        batch = next(it)
        assert batch["input_ids"].shape == (2, 64) and batch["segment_ids"].shape == (2, 64)
        seen.append(int(batch["segment_ids"].max(axis=1).sum()))
    # every sequence at most once in an epoch (the last partial batch is dropped)
    assert sum(seen) <= len(pairs) and sum(seen) > len(pairs) * 0.6
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    again = make_packed_sft_iterator(pairs, tok, batch_size=2, width=64, seed=5,
                                     num_epochs=None)
    again.set_state(state)
    for w in want:
        got = next(again)
        for k in w:
            np.testing.assert_array_equal(got[k], w[k])
    other = make_packed_sft_iterator(pairs, tok, batch_size=2, width=96, seed=5,
                                     num_epochs=None)
    with pytest.raises(ValueError, match="different pipeline"):
        other.set_state(state)


def test_two_processes_share_each_global_batch_of_rows():
    tok, pairs = byte_tokenizer(), _pairs(40, seed=1)
    one = make_packed_sft_iterator(pairs, tok, batch_size=4, width=64, seed=0,
                                   shard_index=0, shard_count=1)
    halves = [make_packed_sft_iterator(pairs, tok, batch_size=2, width=64, seed=0,
                                       shard_index=i, shard_count=2) for i in range(2)]
    for _ in range(2):
        whole = next(one)
        parts = [next(h) for h in halves]
        for k in whole:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])

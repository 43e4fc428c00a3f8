"""JaxEngine's throughput machinery keeps sampling's guarantees.

Prefix sharing (each distinct prompt prefilled once for its n rows), compaction (finished
rows leave the decode batch, which continues at a smaller power of two) and the growing
cache must not change what is sampled: each row's tokens come from its own random stream
whatever batch, slot or cache size it goes through, log-probs equal a teacher-forced pass,
and stop strings, min_tokens and budget forcing behave as without them. The reference is
the same engine with micro-batches of at most ``MIN_DECODE_BATCH`` rows of one prompt and
no slot refill, which never compact (``test_slot_refill.py`` covers refill).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from engine_helpers import EOS_IDS, TOK, random_prompts, shapes_of, token_ids

from jaxalign.models import init_model, tiny
from jaxalign.rollout import JaxEngine, SamplingParams
from jaxalign.rollout.budget import BudgetForcing, generate_with_budget
from jaxalign.rollout.jax_engine import MIN_DECODE_BATCH, _cache_room, _prompt_bucket


@pytest.fixture(scope="module")
def model():
    return init_model(tiny(vocab_size=len(TOK)), seed=5)


def test_buckets():
    assert [_prompt_bucket(x) for x in (1, 16, 17, 100, 128)] == [16, 16, 32, 128, 128]
    assert [_prompt_bucket(x) for x in (129, 161, 256, 257, 333, 1000)] == [
        160, 192, 256, 320, 384, 1024]
    assert [_cache_room(s, 256) for s in (0, 31, 32, 63, 64, 200)] == [32, 32, 64, 64, 128, 256]
    assert _cache_room(0, 8) == 8


def test_prefix_sharing_prefills_each_prompt_once(model):
    """3 distinct prompts (one given twice) x 8 samples: one prefill of 4 prompt rows
    (3 padded to a power of two) for 32 rows, and every row draws what it draws alone."""
    a, b, c = random_prompts(0, [5, 12, 9])
    params = SamplingParams(n=8, temperature=1.0, max_tokens=6, seed=3)
    shared = JaxEngine(model, eos_token_ids=(), pad_token_id=0, max_batch_size=64)
    out = shared.generate([a, b, c, a], params)
    assert shapes_of(shared, "prefill") == [("prefill", 4, 32, 16, 6)]
    alone = JaxEngine(model, eos_token_ids=(), pad_token_id=0, max_batch_size=1, refill=False)
    ref = alone.generate([a, b, c, a], params)
    assert token_ids(out) == token_ids(ref)
    for cs, rs in zip(out, ref, strict=True):
        for x, y in zip(cs, rs, strict=True):
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)
    # The duplicate prompt has rows of its own (its own streams), not prompt 0's.
    assert token_ids(out)[3] != token_ids(out)[0]


@pytest.fixture(scope="module")
def compacted(model):
    """8 prompts x 4 samples with natural EOS, in one 32-slot batch (which compacts) and
    in 4-row micro-batches (which cannot)."""
    prompts = random_prompts(1, [3, 17, 6, 9, 30, 1, 12, 8])
    params = SamplingParams(n=4, temperature=1.0, max_tokens=48, seed=11)
    big = JaxEngine(model, eos_token_ids=EOS_IDS, pad_token_id=0, max_batch_size=32)
    small = JaxEngine(model, eos_token_ids=EOS_IDS, pad_token_id=0,
                      max_batch_size=MIN_DECODE_BATCH // 2, refill=False)
    return prompts, big, big.generate(prompts, params), small.generate(prompts, params)


def test_compaction_keeps_each_rows_stream(compacted):
    prompts, big, out, ref = compacted
    assert token_ids(out) == token_ids(ref)
    lengths = [len(c.token_ids) for cs in out for c in cs]
    assert min(lengths) < 10 and max(lengths) == 48  # long-tailed: the batch did compact
    compactions = shapes_of(big, "compact")
    assert compactions and all(s[1] > s[2] >= MIN_DECODE_BATCH for s in compactions)
    # Finished rows stopped costing work: fewer slot-steps than 32 rows x the longest.
    assert big.slot_steps < 32 * 48 * 0.75
    for cs, rs in zip(out, ref, strict=True):
        for x, y in zip(cs, rs, strict=True):
            assert (x.finish_reason, x.stop_reason) == (y.finish_reason, y.stop_reason)
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)


def test_logprobs_equal_teacher_forcing_after_sharing_and_compaction(model, compacted):
    prompts, _, out, _ = compacted
    for prompt, cs in zip(prompts, out, strict=True):
        for c in cs:
            seq = np.asarray([prompt + c.token_ids])
            logp = jax.nn.log_softmax(np.asarray(model(seq), np.float32)[0], axis=-1)
            want = [float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(c.token_ids)]
            np.testing.assert_allclose(c.logprobs, want, atol=2e-5)


def test_min_tokens_with_compaction(model):
    prompts = random_prompts(2, [4, 9, 2, 7])
    params = SamplingParams(n=6, temperature=1.0, max_tokens=40, min_tokens=12, seed=5)
    big = JaxEngine(model, eos_token_ids=EOS_IDS, pad_token_id=0, max_batch_size=32)
    out = big.generate(prompts, params)
    small = JaxEngine(model, eos_token_ids=EOS_IDS, pad_token_id=0, max_batch_size=6,
                      refill=False)
    assert token_ids(out) == token_ids(small.generate(prompts, params))
    assert shapes_of(big, "compact")
    for c in (c for cs in out for c in cs):
        assert len(c.token_ids) >= 12 and not set(c.token_ids[:12]) & set(EOS_IDS)


def test_stop_strings_with_compaction(model):
    """Rows end on stop strings checked by the host between chunks (then the batch
    compacts); each row is its free run cut after the fewest tokens holding a stop."""
    engine = JaxEngine(model, TOK, eos_token_ids=(), max_batch_size=32, decode_chunk=4)
    prompts = ["Q: 1+1? <think>", "Q: 17 * 3 = ? <think>", "Hello", "x"]
    free = engine.generate(prompts, SamplingParams(n=6, max_tokens=32, seed=2))
    texts = [c.text for cs in free for c in cs]
    # Stop strings seen in the free texts: ASCII letters and digits, so every row's text
    # is plain and a stop matches where its bytes are.
    seen = sorted({ch for t in texts for ch in t if ch.isascii() and ch.isalnum()},
                  key=lambda ch: sum(ch in t for t in texts))
    stops = tuple(seen[-3:])  # the commonest, so several rows stop, at different points
    params = SamplingParams(n=6, max_tokens=32, seed=2, stop=stops,
                            include_stop_str_in_output=True)
    out = engine.generate(prompts, params)
    n_stopped = 0
    for c, f in zip((c for cs in out for c in cs), (f for fs in free for f in fs), strict=True):
        assert c.token_ids == f.token_ids[: len(c.token_ids)]
        if c.finish_reason == "length":
            assert c.token_ids == f.token_ids
            continue
        n_stopped += 1
        assert c.stop_reason in stops and c.text.endswith(c.stop_reason)
        assert c.stop_reason in TOK.decode(c.token_ids)
        assert not any(s in TOK.decode(c.token_ids[:-1]) for s in stops)
        assert len(c.logprobs) == len(c.token_ids)
    assert 6 <= n_stopped < 24
    assert shapes_of(engine, "compact")


def test_budget_forcing_does_not_depend_on_batching(model):
    prompts = ["Q: 2+2? <think>", "Q: 9-4? <think>", "Q: why? <think>", "Q: 8/2 <think>"]
    params = SamplingParams(n=3, temperature=1.0, max_tokens=6, stop=("</answer>",), seed=4)
    budget = BudgetForcing(max_thinking_tokens=12, num_waits=1)

    def run(max_batch_size):
        engine = JaxEngine(model, TOK, max_batch_size=max_batch_size, decode_chunk=4)
        out = generate_with_budget(engine, TOK, prompts, params, budget)
        return [[(c.token_ids, c.text, c.finish_reason) for c in cs] for cs in out]

    assert run(64) == run(2)


def test_logits_hook_sees_call_rows_and_compiles_stay_bounded(model):
    """A hook forcing each row's length (as benchmarks/rollout_grpo.py does) sees rows
    numbered i * n + j across micro-batches; repeated calls compile nothing new."""
    n, max_tokens = 4, 40
    want = np.random.default_rng(0).integers(1, max_tokens + 1, 12 * n)
    target = jnp.asarray(want)

    def force_lengths(logits, rows, n_tok):  # EOS (id 40) exactly at each row's length
        last = n_tok + 1 == jnp.take(target, rows, mode="clip")
        is_eos = jnp.arange(logits.shape[-1]) == 40
        return jnp.where(is_eos[None, :] == last[:, None], logits, -1e30)

    prompts = random_prompts(3, [5, 7, 3, 11, 2, 9, 4, 6, 8, 10, 1, 12])
    params = SamplingParams(n=n, max_tokens=max_tokens, seed=1)
    for max_batch_size in (48, 16):
        engine = JaxEngine(model, eos_token_ids=(40,), pad_token_id=0, refill=False,
                           max_batch_size=max_batch_size, logits_hook=force_lengths)
        out = engine.generate(prompts, params)
        assert [len(c.token_ids) for cs in out for c in cs] == want.tolist()
        compiles = engine.num_compiles
        engine.generate(prompts, params)
        assert engine.num_compiles == compiles
    # 16-row micro-batches of 4 prompts: one prefill, decode at 16 and 8 slots as the cache
    # grows (32 then 40 generated tokens), one compaction per cache size at most.
    decodes = shapes_of(engine, "decode")
    assert {s[1] for s in decodes} <= {16, 8} and {s[2] for s in decodes} == {16}
    assert len(shapes_of(engine, "prefill")) == 1


def test_length_groups_split_off_long_prompts_and_sample_the_same(model):
    """On CPU (the default) a long prompt gets a micro-batch of its own instead of padding
    every row's cache to its length; the rows sample exactly what one batch samples."""
    prompts = random_prompts(4, [6, 3, 9, 5, 200, 7, 4, 8])
    params = SamplingParams(n=4, temperature=1.0, max_tokens=24, seed=2)
    grouped = JaxEngine(model, eos_token_ids=EOS_IDS, pad_token_id=0, max_batch_size=64)
    assert grouped.group_by_length  # weights on CPU
    batches = grouped._micro_batches([len(p) for p in prompts], params)
    assert [sorted({i for i, _ in b}) for b in batches] == [[0, 1, 2, 3, 5, 6, 7], [4]]
    one = JaxEngine(model, eos_token_ids=EOS_IDS, pad_token_id=0, max_batch_size=64,
                    group_by_length=False)
    assert len(one._micro_batches([len(p) for p in prompts], params)) == 1
    out, ref = grouped.generate(prompts, params), one.generate(prompts, params)
    assert token_ids(out) == token_ids(ref)
    for cs, rs in zip(out, ref, strict=True):
        for x, y in zip(cs, rs, strict=True):
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)
    # prompt buckets: 28 rows no longer attend over 200 slots of padding
    assert {s[3] for s in shapes_of(grouped, "prefill")} == {16, 224}
    assert {s[3] for s in shapes_of(one, "prefill")} == {224}


@pytest.mark.parametrize("group_by_length", [True, False])
def test_micro_batches_hold_every_row_once_within_the_cap(model, group_by_length):
    lengths = np.random.default_rng(7).integers(1, 400, 37).tolist()
    params = SamplingParams(n=3, max_tokens=64)
    engine = JaxEngine(model, eos_token_ids=(), pad_token_id=0, max_batch_size=16,
                       group_by_length=group_by_length)
    batches = engine._micro_batches(lengths, params)
    rows = [r for b in batches for r in b]
    assert sorted(rows) == [(i, j) for i in range(37) for j in range(3)]
    assert all(len(b) <= 15 and len(b) % 3 == 0 for b in batches)  # whole prompts
    if group_by_length:  # runs of sorted lengths: each batch's prompts follow the previous'
        spans = [(min(lengths[i] for i, _ in b), max(lengths[i] for i, _ in b)) for b in batches]
        spans.sort()
        assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:], strict=False))
    else:
        assert rows == sorted(rows)  # call order

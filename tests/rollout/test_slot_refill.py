"""JaxEngine's slot refill keeps sampling's guarantees.

With more rows than ``max_batch_size`` and ``refill=True`` the engine decodes
all rows of a call in ``max_batch_size`` fixed slots, prefilling waiting rows into the slots
that finished rows free. Each row must still draw from its own random stream whatever slot
it lands in, report the log-probs of a teacher-forced pass, and honour stop strings,
min_tokens and budget forcing; nothing may compile per step or per call. The reference is
the same engine without refill, one prompt per micro-batch (each prompt alone).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from engine_helpers import EOS_IDS, TOK, random_prompts, shapes_of, token_ids
from flax import nnx

from jaxalign.models import init_model, tiny
from jaxalign.rollout import JaxEngine, SamplingParams
from jaxalign.rollout.budget import BudgetForcing, generate_with_budget


@pytest.fixture(scope="module")
def model():
    return init_model(tiny(vocab_size=len(TOK)), seed=5)


def _assert_same(out, ref):
    assert token_ids(out) == token_ids(ref)
    for cs, rs in zip(out, ref, strict=True):
        for x, y in zip(cs, rs, strict=True):
            assert (x.finish_reason, x.stop_reason, x.text) == (y.finish_reason, y.stop_reason,
                                                                y.text)
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)


def _compiled(engine) -> int:
    """Executables in the jit caches of the engine's jitted functions (those of the
    module-level ones are shared by every engine in the process)."""
    fns = (engine._prefill, engine._decode, engine._compact, engine._grow,
           engine._prefill_prompts, engine._empty, engine._insert, engine._rebase)
    return sum(f._cache_size() for f in fns)


@pytest.fixture(scope="module")
def refilled(model):
    """10 prompts x 4 samples, natural EOS, max_tokens 48: in 8 slots (whole prompts per
    refill), in 6 slots (rows one by one: a prompt's rows may be split over two refills)
    and, as the reference, each prompt alone without refill."""
    prompts = random_prompts(1, [3, 17, 6, 9, 30, 1, 12, 8, 21, 5])
    params = SamplingParams(n=4, temperature=1.0, max_tokens=48, seed=11)
    engines = {b: JaxEngine(model, eos_token_ids=EOS_IDS, pad_token_id=0, max_batch_size=b,
                            refill=True) for b in (8, 6)}
    outs = {b: e.generate(prompts, params) for b, e in engines.items()}
    alone = JaxEngine(model, eos_token_ids=EOS_IDS, pad_token_id=0, max_batch_size=4,
                      refill=False)
    return prompts, params, engines, outs, alone.generate(prompts, params)


def test_refill_draws_what_each_prompt_draws_alone(refilled):
    prompts, _, engines, outs, ref = refilled
    lengths = [len(c.token_ids) for cs in ref for c in cs]
    assert min(lengths) < 10 and max(lengths) == 48  # long-tailed: slots free early
    for b, engine in engines.items():
        _assert_same(outs[b], ref)
        # Rows did go into freed slots (several inserts), the cache was shifted past
        # finished rows, and the slots did less work than 40 rows / b slots x 48 steps.
        assert len(shapes_of(engine, "insert")) >= 2 and shapes_of(engine, "rebase")
        assert {s[1] for s in shapes_of(engine, "decode")} <= {b, 8}
        assert engine.slot_steps < len(lengths) * 48
        # Each prompt's rows are prefilled together: no more prompt rows than rows.
        assert all(s[4] <= s[5] for s in shapes_of(engine, "insert"))


def test_refill_logprobs_equal_teacher_forcing(model, refilled):
    prompts, _, _, outs, _ = refilled
    for prompt, cs in zip(prompts, outs[6], strict=True):
        for c in cs:
            seq = np.asarray([prompt + c.token_ids])
            logp = jax.nn.log_softmax(np.asarray(model(seq), np.float32)[0], axis=-1)
            want = [float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(c.token_ids)]
            np.testing.assert_allclose(c.logprobs, want, atol=2e-5)


def test_refill_with_seeds_and_offsets(model, refilled):
    """``seeds=`` and ``prompt_offset`` pick the same streams as without refill."""
    prompts, params, engines, outs, _ = refilled
    shifted = engines[8].generate(prompts[2:], params, prompt_offset=2)
    assert token_ids(shifted) == token_ids(outs[8])[2:]
    seeds = [7, 3, 7, 100, 5, 9, 1, 2, 8, 4]
    got = engines[8].generate(prompts, params, seeds=seeds)
    alone = JaxEngine(model, eos_token_ids=EOS_IDS, pad_token_id=0, max_batch_size=4,
                      refill=False)
    want = alone.generate(prompts, params, seeds=seeds)
    assert token_ids(got) == token_ids(want)


def test_min_tokens_with_refill(model):
    prompts = random_prompts(2, [4, 9, 2, 7, 5])
    params = SamplingParams(n=6, temperature=1.0, max_tokens=40, min_tokens=12, seed=5)
    engine = JaxEngine(model, eos_token_ids=EOS_IDS, pad_token_id=0, max_batch_size=12,
                       refill=True)
    out = engine.generate(prompts, params)
    alone = JaxEngine(model, eos_token_ids=EOS_IDS, pad_token_id=0, max_batch_size=6,
                      refill=False)
    _assert_same(out, alone.generate(prompts, params))
    assert len(shapes_of(engine, "insert")) >= 2
    for c in (c for cs in out for c in cs):
        assert len(c.token_ids) >= 12 and not set(c.token_ids[:12]) & set(EOS_IDS)


def test_stop_strings_with_refill(model):
    """Rows ended by stop strings (checked by the host between chunks) free their slots
    for waiting rows; every row ends as it does without refill."""
    prompts = ["Q: 1+1? <think>", "Q: 17 * 3 = ? <think>", "Hello", "x", "Q: 5-2 <think>"]
    plain = JaxEngine(model, TOK, eos_token_ids=(), max_batch_size=4, decode_chunk=4,
                      refill=False)
    free = plain.generate(prompts, SamplingParams(n=4, max_tokens=32, seed=2))
    texts = [c.text for cs in free for c in cs]
    seen = sorted({ch for t in texts for ch in t if ch.isascii() and ch.isalnum()},
                  key=lambda ch: sum(ch in t for t in texts))
    params = SamplingParams(n=4, max_tokens=32, seed=2, stop=tuple(seen[-3:]),
                            include_stop_str_in_output=True)
    engine = JaxEngine(model, TOK, eos_token_ids=(), max_batch_size=8, decode_chunk=4,
                       refill=True)
    out = engine.generate(prompts, params)
    _assert_same(out, plain.generate(prompts, params))
    n_stopped = sum(c.finish_reason == "stop" for cs in out for c in cs)
    assert 5 <= n_stopped < 20
    # Every stopped row freed its slot: no filler rows were ever needed.
    assert len(shapes_of(engine, "insert")) >= 2


def test_budget_forcing_with_refill(model):
    prompts = ["Q: 2+2? <think>", "Q: 9-4? <think>", "Q: why? <think>", "Q: 8/2 <think>"]
    params = SamplingParams(n=3, temperature=1.0, max_tokens=6, stop=("</answer>",), seed=4)
    budget = BudgetForcing(max_thinking_tokens=12, num_waits=1)

    def run(max_batch_size, refill):
        engine = JaxEngine(model, TOK, max_batch_size=max_batch_size, decode_chunk=4,
                           refill=refill)
        out = generate_with_budget(engine, TOK, prompts, params, budget)
        assert refill == bool(shapes_of(engine, "insert"))
        return [[(c.token_ids, c.text, c.finish_reason) for c in cs] for cs in out]

    assert run(4, True) == run(3, False)


def test_refill_compiles_nothing_per_step_or_per_call(model):
    """A hook forcing each row's length (as benchmarks/rollout_grpo.py does) sees the
    call's rows wherever they sit; a second call of the same shapes compiles nothing
    (counted in jax's own jit caches), and the shapes stay few."""
    n, max_tokens = 4, 40
    want = np.random.default_rng(0).integers(1, max_tokens + 1, 12 * n)
    target = jnp.asarray(want)

    def force_lengths(logits, rows, n_tok):  # EOS (id 40) exactly at each row's length
        last = n_tok + 1 == jnp.take(target, rows, mode="clip")
        is_eos = jnp.arange(logits.shape[-1]) == 40
        return jnp.where(is_eos[None, :] == last[:, None], logits, -1e30)

    prompts = random_prompts(3, [5, 7, 3, 11, 2, 9, 4, 6, 8, 10, 1, 12])
    params = SamplingParams(n=n, max_tokens=max_tokens, seed=1)
    engine = JaxEngine(model, eos_token_ids=(40,), pad_token_id=0, max_batch_size=16,
                       logits_hook=force_lengths, refill=True)
    out = engine.generate(prompts, params)
    assert [len(c.token_ids) for cs in out for c in cs] == want.tolist()
    compiled, shapes = _compiled(engine), engine.num_compiles
    assert len(shapes_of(engine, "insert")) >= 2
    # Shapes are per cache size and refill size, not per step or per refill.
    assert shapes <= 16
    again = engine.generate(prompts, params)
    assert token_ids(again) == token_ids(out)
    assert _compiled(engine) == compiled and engine.num_compiles == shapes


def test_new_weights_do_not_recompile(model):
    """Weights from a train step (committed to a device, as a jit with shardings outputs
    them) and from a fresh model (not committed) run the same executables: jit keys its
    cache on committedness, which made GRPO's second rollout recompile."""
    engine = JaxEngine(model, eos_token_ids=EOS_IDS, pad_token_id=0, max_batch_size=8)
    prompts = random_prompts(4, [5, 9])
    params = SamplingParams(n=2, max_tokens=8, seed=0)
    engine.generate(prompts, params)
    compiled = _compiled(engine)
    state = nnx.state(model, nnx.Param)
    assert not any(x.committed for x in jax.tree.leaves(state))
    stepped = jax.device_put(state, jax.devices()[0])
    engine.update_weights(stepped)
    engine.generate(prompts, params)
    engine.update_weights(state)
    engine.generate(prompts, params)
    assert _compiled(engine) == compiled

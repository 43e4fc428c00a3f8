"""The JAX sampler: exactness against transformers and teacher forcing, stopping, determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxalign import sharding
from jaxalign.data.tokenizer import byte_tokenizer
from jaxalign.models import from_pretrained, init_model, tiny
from jaxalign.rollout import JaxEngine, SamplingParams


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A tiny random transformers Qwen2 and the same weights loaded into jaxalign (fp32)."""
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        vocab_size=262,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    ref = transformers.Qwen2ForCausalLM(cfg).eval()
    # Sharper logits than the default init, so greedy argmaxes are not near-ties.
    with torch.no_grad():
        ref.lm_head.weight.mul_(20.0)
    path = tmp_path_factory.mktemp("hf") / "tiny"
    ref.save_pretrained(path)
    return ref, from_pretrained(path, dtype=jnp.float32)


def _prompts(rng, lengths, vocab=262):
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


def test_greedy_matches_transformers_generate(hf_pair):
    ref, model = hf_pair
    prompts = _prompts(np.random.default_rng(0), [5, 11, 1, 8])
    engine = JaxEngine(model, eos_token_ids=(), pad_token_id=0)
    out = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=12))
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    with torch.no_grad():
        gen = ref.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    for i, completions in enumerate(out):
        assert len(completions) == 1
        c = completions[0]
        assert c.token_ids == gen[i, width:].tolist()
        assert c.finish_reason == "length" and len(c.token_ids) == 12


@pytest.mark.parametrize("eos, min_tokens", [((), 0), ((5, 6, 7), 8)])
def test_sampled_logprobs_equal_teacher_forcing(hf_pair, eos, min_tokens):
    """Also while min_tokens masks EOS: the reported log-prob is the model's, not the masked
    distribution's (a GRPO ratio against a teacher-forced pass must start at exactly 1)."""
    _, model = hf_pair
    prompts = _prompts(np.random.default_rng(1), [4, 9])
    engine = JaxEngine(model, eos_token_ids=eos, pad_token_id=0)
    out = engine.generate(prompts, SamplingParams(temperature=1.0, max_tokens=10, n=3, seed=7,
                                                  min_tokens=min_tokens))
    for prompt, completions in zip(prompts, out, strict=True):
        assert len(completions) == 3
        for c in completions:
            seq = np.asarray([prompt + c.token_ids])
            logp = jax.nn.log_softmax(np.asarray(model(seq), np.float32)[0], axis=-1)
            want = [float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(c.token_ids)]
            np.testing.assert_allclose(c.logprobs, want, atol=2e-5)
    # n samples of one prompt are not all the same sequence.
    assert len({tuple(c.token_ids) for c in out[0]}) > 1


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.4, 0), (0.7, 3)])
def test_sampled_tokens_follow_the_model_distribution(temperature, top_k):
    """Frequencies of the first sampled token over many rows match softmax(logits / T),
    renormalised over the top k: the engine's per-row streams and sampler, end to end."""
    model = init_model(tiny(vocab_size=12), seed=4)
    prompt = [3, 1, 4, 1, 5]
    logits = np.asarray(model(np.asarray([prompt])), np.float64)[0, -1] / temperature
    if top_k:
        logits[np.argsort(logits)[:-top_k]] = -np.inf
    want = np.exp(logits - logits.max())
    want /= want.sum()
    n = 6000
    engine = JaxEngine(model, eos_token_ids=(), pad_token_id=0, max_batch_size=2048)
    out = engine.generate([prompt], SamplingParams(temperature=temperature, top_k=top_k,
                                                   max_tokens=1, n=n, seed=11))
    freq = np.bincount([c.token_ids[0] for c in out[0]], minlength=12) / n
    # 5 standard errors of each frequency (binomial), plus a hair for float32 logits.
    tol = 5 * np.sqrt(want * (1 - want) / n) + 1e-3
    assert np.all(np.abs(freq - want) <= tol), (freq, want)
    if top_k:
        assert (freq[want == 0] == 0).all()


def test_deterministic_given_seed(hf_pair):
    _, model = hf_pair
    prompts = _prompts(np.random.default_rng(2), [6, 3])
    engine = JaxEngine(model, eos_token_ids=(), pad_token_id=0)

    def run(seed):
        params = SamplingParams(temperature=1.0, max_tokens=8, n=2, seed=seed)
        return [[c.token_ids for c in cs] for cs in engine.generate(prompts, params)]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_micro_batching_does_not_change_greedy_output(hf_pair):
    _, model = hf_pair
    prompts = _prompts(np.random.default_rng(3), [2, 7, 4, 13, 5])
    params = SamplingParams(temperature=0, max_tokens=6, n=2)
    big = JaxEngine(model, eos_token_ids=(), pad_token_id=0, max_batch_size=16)
    small = JaxEngine(model, eos_token_ids=(), pad_token_id=0, max_batch_size=3,
                      refill=False)
    a = [[c.token_ids for c in cs] for cs in big.generate(prompts, params)]
    b = [[c.token_ids for c in cs] for cs in small.generate(prompts, params)]
    assert a == b
    assert small.num_compiles <= 2  # 3-row batches and the 1-row remainder, one prompt bucket


def test_top_k_1_and_tiny_top_p_are_greedy(hf_pair):
    _, model = hf_pair
    prompts = _prompts(np.random.default_rng(4), [5, 9])
    engine = JaxEngine(model, eos_token_ids=(), pad_token_id=0)
    greedy = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=6))
    for params in [
        SamplingParams(temperature=1.0, top_k=1, max_tokens=6, seed=1),
        SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=6, seed=1),
    ]:
        out = engine.generate(prompts, params)
        assert [c[0].token_ids for c in out] == [c[0].token_ids for c in greedy]


def test_eos_and_min_tokens(hf_pair):
    _, model = hf_pair
    prompt = _prompts(np.random.default_rng(5), [6])
    probe = JaxEngine(model, eos_token_ids=(), pad_token_id=0)
    first = probe.generate(prompt, SamplingParams(temperature=0, max_tokens=4))[0][0]
    eos = first.token_ids[0]
    engine = JaxEngine(model, eos_token_ids=(eos,), pad_token_id=0)
    c = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=4))[0][0]
    assert c.token_ids == [eos] and c.finish_reason == "stop" and c.stop_reason == eos
    c = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=4, min_tokens=3))[0][0]
    assert len(c.token_ids) >= 3 and eos not in c.token_ids[:3]


def test_stop_strings_end_on_text_and_keep_token_prefix():
    tok = byte_tokenizer()
    model = init_model(tiny(vocab_size=len(tok)), seed=11)
    engine = JaxEngine(model, tok, decode_chunk=4)
    prompt = "Question: 2 + 2? <think>"
    free = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=24))[0][0]
    assert free.finish_reason == "length" and len(free.text) > 6
    stop = free.text[5:8]  # a stop string that appears mid-way, likely across tokens
    begin = free.text.find(stop)
    for include in (True, False):
        params = SamplingParams(
            temperature=0, max_tokens=24, stop=(stop,), include_stop_str_in_output=include
        )
        c = engine.generate([prompt], params)[0][0]
        assert c.finish_reason == "stop" and c.stop_reason == stop
        assert c.text == free.text[: begin + len(stop)] if include else free.text[:begin]
        assert c.token_ids == free.token_ids[: len(c.token_ids)]
        # The kept tokens are the shortest prefix whose text contains the stop string.
        assert stop in tok.decode(c.token_ids, skip_special_tokens=False)
        assert stop not in tok.decode(c.token_ids[:-1], skip_special_tokens=False)
        assert len(c.logprobs) == len(c.token_ids)


def test_string_prompts_and_update_weights():
    tok = byte_tokenizer()
    cfg = tiny(vocab_size=len(tok))
    engine = JaxEngine(init_model(cfg, seed=0), tok)
    params = SamplingParams(temperature=0, max_tokens=5)
    before = engine.generate(["abc"], params)[0][0]
    assert before.prompt_token_ids == tok("abc")["input_ids"]
    assert before.weights_version == 0
    assert engine.update_weights(init_model(cfg, seed=1)) == 1
    after = engine.generate(["abc"], params)[0][0]
    assert after.weights_version == 1 and after.logprobs != before.logprobs
    with pytest.raises(ValueError, match="do not match"):
        engine.update_weights(init_model(tiny(vocab_size=len(tok), num_hidden_layers=3)))


def test_sharded_engine_matches_single_device(hf_pair):
    _, model = hf_pair
    prompts = _prompts(np.random.default_rng(6), [4, 10, 7, 2, 5, 8, 3, 9])
    params = SamplingParams(temperature=0, max_tokens=6)
    single = JaxEngine(model, eos_token_ids=(), pad_token_id=0).generate(prompts, params)
    mesh = sharding.make_mesh(data=4, fsdp=1, tensor=2)
    engine = JaxEngine(model, eos_token_ids=(), pad_token_id=0, mesh=mesh)
    q = engine.state["model"]["layers"][0]["self_attn"]["q_proj"]["weight"][...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", None)
    sharded = engine.generate(prompts, params)
    assert [c[0].token_ids for c in sharded] == [c[0].token_ids for c in single]


def test_bad_requests():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
    engine = JaxEngine(init_model(tiny(), seed=0))
    with pytest.raises(ValueError, match="need a tokenizer"):
        engine.generate(["text"], SamplingParams())
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([[]], SamplingParams())


@pytest.mark.parametrize("fresh", [False, True], ids=["prefill_over_cache", "fresh_prefill"])
@pytest.mark.parametrize("window", [None, 3])
def test_kv_cache_decoding_equals_full_forward(fresh, window):
    arch = {}
    if window:
        arch = dict(use_sliding_window=True, sliding_window=window, max_window_layers=1)
    model = init_model(tiny(tie_word_embeddings=False, **arch), seed=2)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1024, (3, 9))
    mask = np.ones_like(ids, bool)
    mask[0, :4] = False
    mask[2, :1] = False
    full = np.asarray(model(ids, mask))
    cache = model.init_cache(3, 12)
    if fresh:  # the engine's prefill: attend among the prompt's tokens only
        hidden, cache = model.model(ids[:, :6], mask[:, :6], cache=cache, fresh_cache=True)
        logits = model.logits(hidden)
    else:
        logits, cache = model(ids[:, :6], mask[:, :6], cache=cache)
    steps = [np.asarray(logits)]
    for t in range(6, 9):
        logits, cache = model(ids[:, t : t + 1], mask[:, t : t + 1], cache=cache)
        steps.append(np.asarray(logits))
    incremental = np.concatenate(steps, axis=1)
    np.testing.assert_allclose(incremental[mask], full[mask], atol=1e-5)
    assert int(cache.index) == 9
    np.testing.assert_array_equal(np.asarray(cache.next_pos), mask.sum(-1))
    graphdef, state = nnx.split(model)
    assert graphdef is not None and state is not None


def test_samples_do_not_depend_on_batching_and_shares_with_offsets_add_up(hf_pair):
    """Each row's noise comes from its (prompt, sample) index: micro-batch sizes do not
    change the samples, and two processes sampling halves of a batch (each passing its
    offset) draw what one call on the whole batch draws."""
    _, model = hf_pair
    prompts = _prompts(np.random.default_rng(7), [3, 9, 5, 6])
    params = SamplingParams(temperature=1.0, max_tokens=6, n=3, seed=11)

    def tokens(outs):
        return [[c.token_ids for c in cs] for cs in outs]

    whole = tokens(JaxEngine(model, eos_token_ids=(), pad_token_id=0).generate(prompts, params))
    small = JaxEngine(model, eos_token_ids=(), pad_token_id=0, max_batch_size=4)
    assert tokens(small.generate(prompts, params)) == whole
    halves = (tokens(small.generate(prompts[:2], params, prompt_offset=0))
              + tokens(small.generate(prompts[2:], params, prompt_offset=2)))
    assert halves == whole
    assert tokens(small.generate(prompts[2:], params)) != whole[2:]  # the offset matters


def test_a_lora_model_is_sampled_with_its_adapters_merged():
    """The loops hand the engine the trainer's model as it is (under LoRA, with adapters);
    the engine samples the merged weights, at construction and at every update."""
    from lora_helpers import adapted

    from jaxalign.models import lora

    tok = byte_tokenizer()
    greedy = SamplingParams(temperature=0, max_tokens=8)
    prompts = ["1 + 2 =", "abc"]
    first, second = (adapted(init_model(tiny(vocab_size=len(tok)), seed=0), seed=s)
                     for s in (1, 2))
    engine = JaxEngine(first, tok)
    merged = JaxEngine(lora.merge_lora(first), tok)
    want = [c.token_ids for row in merged.generate(prompts, greedy) for c in row]
    assert [c.token_ids for row in engine.generate(prompts, greedy) for c in row] == want
    engine.update_weights(second)
    merged.update_weights(lora.merge_lora(second))
    want = [c.token_ids for row in merged.generate(prompts, greedy) for c in row]
    assert [c.token_ids for row in engine.generate(prompts, greedy) for c in row] == want

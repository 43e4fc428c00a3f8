"""Expert Iteration: selection, fixed-shape SFT batches, one end-to-end iteration."""

import pathlib

import numpy as np
from cfg_helpers import load_config, shrink

from jaxalign import train
from jaxalign.algorithms import expert_iteration
from jaxalign.logging import read_metrics


def test_select_correct_dedupes_and_caps_per_question():
    questions = [0, 0, 0, 0, 1, 1, 1, 1]
    texts = ["a", "a", "b", "c", "x", "y", "y", "z"]
    rewards = [1, 1, 1, 0, 0, 1, 1, 1]
    kept = expert_iteration.select_correct(questions, texts, rewards, dedupe=True,
                                           max_per_question=0)
    assert kept == [0, 2, 5, 7]
    kept = expert_iteration.select_correct(questions, texts, rewards, dedupe=False,
                                           max_per_question=2)
    assert kept == [0, 1, 5, 6]


def test_sft_micro_batches_have_fixed_shape_and_cover_every_row_once_per_epoch():
    prompts = [[1, 2], [3], [4, 5, 6], [7], [8, 9]]
    responses = [[10], [11, 12], [13], [14, 15, 16], [17]]
    batches = list(expert_iteration.sft_micro_batches(
        prompts, responses, micro_batch=2, pad_id=0, width_multiple=8, epochs=2, seed=0))
    assert len(batches) == 6  # ceil(5 / 2) per epoch
    assert {b["input_ids"].shape for b in batches} == {(2, 8)}
    # every response token is trained once per epoch; the filler row has no mask
    assert sum(int(b["response_mask"].sum()) for b in batches[:3]) == sum(map(len, responses))
    assert not batches[2]["response_mask"][1].any()


def test_one_expert_iteration_step_keeps_verified_rollouts_and_trains(tmp_path, monkeypatch):
    # A user reward a tiny random model can earn (an even number of characters), named in
    # the config as a user names theirs, with a weighted second term that is only logged.
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[1] / "verify"))
    cfg = shrink(load_config("ei"), tmp_path)
    cfg.data.reward = "my_rewards:even_length + 0*my_rewards:length_penalty"
    cfg.ei.n_ei_steps, cfg.ei.questions_per_step, cfg.ei.group_size = 1, 8, 4
    cfg.ei.batch_size = 8
    summary = train.run(cfg)
    assert summary["ei_steps"] == 1 and summary["eval_after"] is not None
    (record,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
                 if "train/kept_fraction" in r]
    assert 0 < record["train/kept_fraction"] <= 1
    assert record["train/sft_micro_steps"] >= 1 and np.isfinite(record["train/loss"])
    # kept = answer reward 1 = an even length; both terms logged, the zero-weight one too
    assert record["train/reward/even_length"] == record["train/answer_reward"]
    assert record["train/reward"] == record["train/answer_reward"]
    assert record["train/reward/length_penalty"] < 0

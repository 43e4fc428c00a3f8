"""Reward specs: parsing, resolution errors, composite values, user functions in the worker
pool (imports, time limits), and ``jaxalign.evaluation`` with a resolved reward."""

import pathlib
import pickle
import sys

import pytest

from jaxalign import evaluation
from jaxalign.verify import (
    Reward,
    RewardSpecError,
    ScoringPool,
    parse_reward_spec,
    r1_zero_reward_fn,
    resolve_reward,
)

HERE = pathlib.Path(__file__).resolve().parent
RIGHT = " so </think> <answer>4</answer>"  # r1_zero: format 1, answer 1 for "4"


@pytest.fixture(autouse=True)
def _my_rewards_importable(monkeypatch):
    """``my_rewards`` (this folder) importable by name, as a user's module on PYTHONPATH."""
    monkeypatch.syspath_prepend(str(HERE))


# --- parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, terms", [
    ("r1_zero", [(1.0, "r1_zero")]),
    ("  question_only ", [(1.0, "question_only")]),
    ("my_rewards:length_penalty", [(1.0, "my_rewards:length_penalty")]),
    ("r1_zero + 0.1*my_rewards:length_penalty", [(1.0, "r1_zero"),
                                                 (0.1, "my_rewards:length_penalty")]),
    ("r1_zero - 0.001*pkg.mod:fn", [(1.0, "r1_zero"), (-0.001, "pkg.mod:fn")]),
    ("r1_zero-pkg.mod:fn", [(1.0, "r1_zero"), (-1.0, "pkg.mod:fn")]),
    ("-2 * a.b:C.method+1e-3*question_only", [(-2.0, "a.b:C.method"),
                                              (0.001, "question_only")]),
    (".5*r1_zero", [(0.5, "r1_zero")]),
])
def test_spec_parsing(spec, terms):
    assert parse_reward_spec(spec) == terms


@pytest.mark.parametrize("spec, message", [
    ("", "the reward spec is empty"),
    ("   ", "the reward spec is empty"),
    ("r1_zero +", r"cannot read reward spec 'r1_zero \+' at '\+'"),
    ("r1_zero r1_zero", "cannot read reward spec .* joined by \\+ or -"),
    ("0.1 my_rewards:length_penalty", "cannot read reward spec"),
    ("r1_zero * 2", "cannot read reward spec"),
    ("my_rewards:", "cannot read reward spec"),
    ("1e999*r1_zero", "is not a finite number"),
    ("r1_zero + 0.5*r1_zero", "names 'r1_zero' twice"),
])
def test_unreadable_specs(spec, message):
    with pytest.raises(RewardSpecError, match=message):
        parse_reward_spec(spec)


@pytest.mark.parametrize("spec, message", [
    ("r1", r"unknown reward 'r1': name a registered reward \(question_only, r1_zero, s1\) or an "
           r"importable function as package.module:function"),
    ("my_rewards", "unknown reward 'my_rewards'.*module:function"),
    ("no_such_module_xyz:fn", r"cannot import module 'no_such_module_xyz' \(ModuleNotFoundError"
                              r".*put the folder that holds it on PYTHONPATH"),
    ("my_rewards:nope", r"module 'my_rewards' \(.*my_rewards.py\) has no attribute 'nope'; the "
                        r"functions it defines: even_answer_or_even_e, even_e, even_length"),
    ("my_rewards:NOT_A_FUNCTION", "is a int, not a function"),
    ("my_rewards:no_timeout", r"cannot be called as fn\(response, ground_truth, \*, timeout\)"),
    ("r1_zero + 0.1*my_rewards:nope", "has no attribute 'nope'"),
])
def test_resolution_errors_say_what_to_change(spec, message):
    with pytest.raises(RewardSpecError, match=message) as info:
        resolve_reward(spec)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


# --- values ---------------------------------------------------------------------------------


def test_a_registered_name_is_the_builtin_unchanged():
    reward = resolve_reward("r1_zero")
    assert reward.plain and reward.components == () and reward.base == "r1_zero"
    assert reward(RIGHT, "4") == r1_zero_reward_fn(RIGHT, "4")


def test_composite_values_and_components():
    reward = resolve_reward("r1_zero + 0.1*my_rewards:length_penalty - 2*my_rewards:says_yes")
    assert reward.spec == "r1_zero + 0.1*my_rewards:length_penalty - 2.0*my_rewards:says_yes"
    assert reward.components == ("reward/r1_zero", "reward/length_penalty", "reward/says_yes")
    out = reward(RIGHT, "4", timeout=3.0)
    penalty = -len(RIGHT) / 100
    assert out == pytest.approx({
        "format_reward": 1.0, "answer_reward": 1.0,  # from r1_zero, the first that gives them
        "reward": 1.0 + 0.1 * penalty - 2 * 0.0,
        "reward/r1_zero": 1.0, "reward/length_penalty": penalty, "reward/says_yes": 0.0,
    })
    wrong = reward(RIGHT + " yes", "5", timeout=3.0)  # r1_zero: broken format (text after)
    assert wrong["format_reward"] == 0.0 and wrong["answer_reward"] == 0.0
    assert wrong["reward"] == pytest.approx(0.1 * -len(RIGHT + " yes") / 100 - 2.0)


def test_user_functions_alone_define_format_and_answer():
    reward = resolve_reward("my_rewards:says_yes")
    assert not reward.plain and reward.base is None
    # no term gives verdicts: format 1, answer = reward > 0; other dict keys are dropped
    assert reward("yes", "4") == {"format_reward": 1.0, "answer_reward": 1.0, "reward": 1.0,
                                  "reward/says_yes": 1.0}
    assert reward("no", "4")["answer_reward"] == 0.0
    # a term that gives them, after one that does not
    both = resolve_reward("my_rewards:length_penalty + my_rewards:even_e")
    assert both("ee", "4")["answer_reward"] == 1.0 and both("e", "4")["answer_reward"] == 0.0


def test_same_function_names_in_two_modules_keep_their_module(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE.parents[1]))  # the repository root: tests.verify
    reward = resolve_reward("my_rewards:even_e + tests.verify.my_rewards:even_e")
    assert reward.components == ("reward/my_rewards:even_e",
                                 "reward/tests.verify.my_rewards:even_e")


def test_bad_return_values_raise_type_error():
    with pytest.raises(TypeError, match="gave reward='1.0'"):
        resolve_reward("my_rewards:returns_text")("x", "1")
    # a NaN would make every advantage of its group NaN: refused, not trained on
    with pytest.raises(TypeError, match="gave reward=nan; a reward must be a finite number"):
        resolve_reward("r1_zero + my_rewards:returns_nan")("x", "1")


def test_reward_pickles_as_its_spec():
    reward = resolve_reward("r1_zero + 0.1*my_rewards:length_penalty")
    data = pickle.dumps(reward)
    assert b"my_rewards:length_penalty" in data
    back = pickle.loads(data)
    assert isinstance(back, Reward) and back.spec == reward.spec
    assert back(RIGHT, "4") == reward(RIGHT, "4")
    assert resolve_reward(reward) is reward


# --- time limits ------------------------------------------------------------------------------


def test_a_user_term_past_the_soft_limit_scores_zero_in_process():
    reward = resolve_reward("r1_zero + my_rewards:sleepy")
    out = reward(RIGHT, "4", timeout=0.3)
    assert out["timed_out"] and out["reward/sleepy"] == 0.0
    assert out["reward"] == 1.0 and out["answer_reward"] == 1.0  # r1_zero's own verdict
    assert resolve_reward("my_rewards:sleepy")("quick", "4", timeout=0.3)["reward"] == 1.0


@pytest.fixture(scope="module")
def pool():
    """Workers that see ``my_rewards`` only through the parent's sys.path (not PYTHONPATH)."""
    sys.path.insert(0, str(HERE))
    try:
        with ScoringPool(num_workers=2, timeout=0.5, grace=0.5, warm_up=False) as p:
            yield p
    finally:
        sys.path.remove(str(HERE))


def test_user_rewards_run_in_the_worker_pool(pool, monkeypatch):
    monkeypatch.delenv("PYTHONPATH", raising=False)
    reward = resolve_reward("r1_zero + 0.1*my_rewards:length_penalty")
    responses = [RIGHT, "no format", RIGHT + "x"] * 5
    truths = ["4", "4", "4"] * 5
    assert pool.score(responses, truths, reward) == [reward(r, g) for r, g in
                                                     zip(responses, truths, strict=True)]
    worker_pid = pool.map(_pid, [()])[0]
    assert worker_pid != __import__("os").getpid()


def _pid(timeout=None):
    import os

    return os.getpid()


def test_a_user_reward_sleeping_past_the_timeout_scores_zero_in_a_worker(pool):
    reward = resolve_reward("my_rewards:sleepy")
    out = pool.score(["slow", "quick"], ["1", "1"], reward)
    assert out[0]["reward"] == 0.0 and out[0]["timed_out"]  # the soft limit: the worker lives
    assert out[1]["reward"] == 1.0 and not out[1].get("timed_out")


def test_a_stuck_user_reward_is_killed_and_scores_zero(pool):
    killed = pool.stats["killed"]
    out = pool.score(["x"], ["1"], resolve_reward("r1_zero + my_rewards:stuck"))
    assert out[0]["reward"] == 0.0 and out[0]["timed_out"] and pool.stats["killed"] == killed + 1
    # evaluation.score fills the terms of a killed response with 0
    scores = evaluation.score(["x"], ["1"], resolve_reward("r1_zero + my_rewards:stuck"), 1,
                              timeout=0.3)
    assert scores[0]["timed_out"] and scores[0]["reward/stuck"] == 0.0
    assert scores[0]["reward/r1_zero"] == 0.0


def test_a_user_module_in_the_run_folder_is_imported_by_workers(tmp_path, monkeypatch):
    """``python -m jaxalign.train`` from a folder holding the module: '' on sys.path."""
    (tmp_path / "folder_reward_mod.py").write_text(
        "def fn(response, ground_truth, *, timeout):\n    return float(len(response))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend("")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    reward = resolve_reward("folder_reward_mod:fn")
    with ScoringPool(num_workers=1, warm_up=False) as p:
        assert [s["reward"] for s in p.score(["ab", "abc"], ["1", "1"], reward)] == [2.0, 3.0]


# --- jaxalign.evaluation ------------------------------------------------------------------------


def test_score_responses_records_the_terms_and_extracts_with_the_base_format():
    from jaxalign.data.datasets import MathExample

    examples = [MathExample(id="a", question="2+2?", answer="4", source="t:1")]
    responses = [[evaluation.Response(RIGHT, 8, "stop"), evaluation.Response("yes", 1, "stop")]]
    reward = resolve_reward("r1_zero + 0.5*my_rewards:says_yes")
    records = evaluation.score_responses(examples, [None], responses, reward=reward,
                                         num_workers=0)
    assert [r["extracted"] for r in records] == ["4", None]  # r1_zero's format
    assert [r["reward/says_yes"] for r in records] == [0.0, 1.0]
    assert [r["reward"] for r in records] == [1.0, 0.5]
    metrics = evaluation.reward_metrics(records)
    assert metrics["reward/r1_zero"] == 0.5 and metrics["reward/says_yes"] == 0.5
    # a spec string works too (eval/evaluate.py --reward), and gives the same records
    assert evaluation.score_responses(examples, [None], responses, num_workers=0,
                                      reward=reward.spec) == records
    plain = evaluation.score_responses(examples, [None], responses, reward="r1_zero",
                                       num_workers=0)
    assert not any(k.startswith("reward/") for k in plain[0])
    assert set(evaluation.reward_metrics(plain)) == {
        "answer_reward", "format_reward", "reward", "response_length",
        "response_length_correct", "response_length_incorrect", "truncated_fraction"}


def test_answer_format_and_stop_of_composite_specs():
    assert evaluation.answer_format("r1_zero") == "r1_zero"
    assert evaluation.answer_format("my_rewards:says_yes + question_only") == "question_only"
    assert evaluation.answer_format("my_rewards:says_yes") == "question_only"
    assert evaluation.default_stop("r1_zero", "0.5*r1_zero - my_rewards:length_penalty") == (
        "</answer>",)
    assert evaluation.default_stop("question_only",
                                   resolve_reward("my_rewards:length_penalty")) == ()
    assert evaluation.extract_answer("thus \\boxed{4}", "my_rewards:says_yes") == "4"


def test_a_reward_unpickles_where_its_module_is_not_on_the_path(tmp_path, monkeypatch):
    """A verifier worker started before the parent put the user's folder on ``sys.path``
    (or in another directory) still imports the module: the reward carries its roots."""
    import subprocess

    monkeypatch.syspath_prepend(str(HERE))
    reward = resolve_reward("r1_zero + 0.5*my_rewards:length_penalty")
    assert reward.paths == (str(HERE),)
    code = ("import pickle, sys; r = pickle.loads(sys.stdin.buffer.read()); "
            "print(r('x </think> <answer>5</answer>', '5', timeout=5)['reward/length_penalty'])")
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(reward),
                         capture_output=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr.decode()
    assert float(out.stdout) == -len("x </think> <answer>5</answer>") / 100

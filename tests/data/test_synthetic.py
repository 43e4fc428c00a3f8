"""The generated arithmetic task: deterministic, correct, disjoint splits, verifiable traces."""

import pytest

from jaxalign.data import synthetic
from jaxalign.verify import r1_zero_reward_fn


def test_problems_are_deterministic_and_their_steps_compute_the_answer():
    a = synthetic.arithmetic_problems(200, seed=3)
    assert a == synthetic.arithmetic_problems(200, seed=3)
    assert a != synthetic.arithmetic_problems(200, seed=4)
    for e in a:
        value = None
        for step in e.solution.rstrip(".").split(". "):
            lhs, rhs = step.split(" = ")
            x, op, k = lhs.split()
            assert value is None or int(x) == value
            value = int(x) + int(k) if op == "+" else int(x) - int(k)
            assert value == int(rhs) and 0 <= value <= 20
        assert value == int(e.answer)
        assert eval(e.question) == value  # the question is the expression itself


def test_held_out_questions_never_occur_in_training():
    train, held_out = synthetic.split_problems(3000, 300, seed=0)
    assert not {e.question for e in train} & {e.question for e in held_out}


def test_traces_score_1_and_slips_score_0():
    (e,) = synthetic.arithmetic_problems(1, seed=0)
    prompt, response = synthetic.sft_trace(e)
    assert prompt.endswith("<think>") and e.question in prompt
    assert r1_zero_reward_fn(response, e.answer)["reward"] == 1.0
    _, slipped = synthetic.sft_trace(e, slip=2)
    assert r1_zero_reward_fn(slipped, e.answer) == {
        "format_reward": 1.0, "answer_reward": 0.0, "reward": 0.0}
    assert f"<answer> {int(e.answer) + 2} </answer>" in slipped
    assert e.solution in slipped  # the steps stay right


def test_slip_rate_controls_the_fraction_of_wrong_traces():
    problems = synthetic.arithmetic_problems(2000, seed=1)
    pairs = synthetic.sft_traces(problems, slip_rate=0.3, seed=0)
    wrong = sum(r1_zero_reward_fn(r, e.answer)["answer_reward"] == 0
                for (_, r), e in zip(pairs, problems, strict=True))
    assert 0.25 < wrong / len(pairs) < 0.35
    with pytest.raises(ValueError, match="slip_rate"):
        synthetic.sft_traces(problems, slip_rate=1.0)

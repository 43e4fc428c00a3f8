"""Reward functions on the real benchmark answers in ``../shared/data``."""

import json

import pytest
import sympy

from jaxalign.verify import extract_boxed, grader, question_only_reward_fn, r1_zero_reward_fn

RIGHT = {"format_reward": 1.0, "answer_reward": 1.0, "reward": 1.0}
WRONG = {"format_reward": 1.0, "answer_reward": 0.0, "reward": 0.0}
BROKEN = {"format_reward": 0.0, "answer_reward": 0.0, "reward": 0.0}


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def r1(answer, thinking="Let me work it out step by step."):
    return f"{thinking} </think> <answer>{answer}</answer>"


@pytest.fixture(scope="module")
def math500(shared_data):
    return [row["answer"] for row in read(shared_data / "math500" / "test.jsonl")]


@pytest.fixture(scope="module")
def gsm8k(shared_data):
    return [
        row["answer"].split("####")[-1].strip().replace(",", "")
        for split in ("train", "test")
        for row in read(shared_data / "gsm8k" / f"{split}.jsonl")
    ]


def test_every_math500_gold_scores_one(math500):
    assert len(math500) == 500
    for gold in math500:
        assert r1_zero_reward_fn(r1(gold), gold) == RIGHT, gold
        assert r1_zero_reward_fn(r1(f"The answer is $\\boxed{{{gold}}}$."), gold) == RIGHT, gold
        assert question_only_reward_fn(f"So \\boxed{{{gold}}}.", gold) == RIGHT, gold


def test_every_math500_gold_in_another_form_scores_one(math500):
    """The gold as sympy writes it back (``\\frac{9 a}{20} + \\frac{11}{20}`` for
    ``\\frac{11+9a}{20}``): a different surface form, judged by math-verify, not by string."""
    rewritten = 0
    for gold in math500:
        parsed = grader._parse(gold)
        assert parsed and isinstance(parsed[0], sympy.Basic | sympy.MatrixBase), gold
        other = sympy.latex(parsed[0])
        rewritten += grader.normalize(other) != grader.normalize(gold)
        assert r1_zero_reward_fn(r1(other), gold) == RIGHT, (gold, other)
    assert rewritten >= 50  # enough of them really take the math-verify path


def test_wrong_math500_answers_score_zero(math500):
    for i, gold in enumerate(math500):
        assert r1_zero_reward_fn(r1(f"{gold}+1"), gold) == WRONG, gold
        # Rows 7 apart never hold equal answers except identical strings ("3" and "3"),
        # skipped here. (Adjacent rows do: "x=5" and "5".)
        other = math500[(i + 7) % len(math500)]
        if grader.normalize(other) != grader.normalize(gold):
            assert r1_zero_reward_fn(r1(other), gold) == WRONG, (other, gold)


def test_every_gsm8k_gold_scores_one_and_neighbours_zero(gsm8k):
    assert len(gsm8k) == 7473 + 1319
    for gold in gsm8k:
        assert r1_zero_reward_fn(r1(gold), gold) == RIGHT, gold
        assert r1_zero_reward_fn(r1(f"{int(gold):,}"), gold) == RIGHT, gold
        assert r1_zero_reward_fn(r1(f"{gold}.0"), gold) == RIGHT, gold
        assert r1_zero_reward_fn(r1(str(int(gold) + 1)), gold) == WRONG, gold


def test_amc23_float_and_aime24_zero_padded_answers(shared_data):
    for row in read(shared_data / "amc23" / "test.jsonl"):
        assert isinstance(row["answer"], float)
        assert r1_zero_reward_fn(r1(str(int(row["answer"]))), row["answer"]) == RIGHT
        assert r1_zero_reward_fn(r1(str(int(row["answer"]) + 1)), row["answer"]) == WRONG
    for row in read(shared_data / "aime24" / "test.jsonl"):
        assert r1_zero_reward_fn(r1(str(int(row["answer"]))), row["answer"]) == RIGHT  # "025"


def test_minerva_boxed_solutions_score_one_question_only(shared_data):
    for row in read(shared_data / "minerva_math" / "test.jsonl")[:100]:
        gold = extract_boxed(row["solution"])
        assert gold is not None
        assert question_only_reward_fn(row["solution"], gold) == RIGHT, gold


# --- the format rule, through the reward -------------------------------------------------


@pytest.mark.parametrize(
    "response",
    [
        "x </think> <answer>5</answer>",
        "x </think>\n<answer>5</answer>",
        "x </think>\n<answer>\\boxed{5}</answer><|endoftext|>",
        "x </think> <answer>x = 5</answer>\n",
    ],
)
def test_well_formed_correct(response):
    assert r1_zero_reward_fn(response, "5") == RIGHT


@pytest.mark.parametrize(
    "response",
    [
        "x <answer>5</answer>",
        "x </think> </think> <answer>5</answer>",
        "<think> x </think> <answer>5</answer>",
        "x </think> <answer>5</answer> <answer>5</answer>",
        "x </think> <answer>5",
        "x </think> <answer>5</answer> Hence 5.",
        "x </think> 5",
    ],
)
def test_a_malformed_response_earns_nothing_even_with_the_right_answer(response):
    assert r1_zero_reward_fn(response, "5") == BROKEN


def test_well_formed_but_wrong_or_empty():
    assert r1_zero_reward_fn("x </think> <answer>6</answer>", "5") == WRONG
    assert r1_zero_reward_fn("x </think> <answer></answer>", "5") == WRONG
    assert r1_zero_reward_fn("x </think> <answer>\\boxed{}</answer>", "5") == WRONG


def test_list_ground_truths():
    assert r1_zero_reward_fn(r1("5"), ["4", "5"]) == RIGHT
    assert r1_zero_reward_fn(r1("\\frac{1}{2}"), ["0.5", "\\frac{2}{4}"]) == RIGHT
    assert r1_zero_reward_fn(r1("6"), ["4", "5"]) == WRONG
    assert question_only_reward_fn("\\boxed{4}", [4.0, "5"]) == RIGHT


def test_format_bonus_is_off_by_default_and_opt_in():
    assert r1_zero_reward_fn(r1("6"), "5")["reward"] == 0.0
    assert r1_zero_reward_fn(r1("6"), "5", format_bonus=0.1) == dict(WRONG, reward=0.1)
    assert r1_zero_reward_fn(r1("5"), "5", format_bonus=0.1) == dict(RIGHT, reward=1.1)
    assert r1_zero_reward_fn("x <answer>5</answer>", "5", format_bonus=0.1) == BROKEN


def test_strict_form_option():
    assert r1_zero_reward_fn(r1("\\frac{6}{4}"), "\\frac{3}{2}") == RIGHT
    assert r1_zero_reward_fn(r1("\\frac{6}{4}"), "\\frac{3}{2}", strict_form=True) == WRONG


def test_question_only_format():
    assert question_only_reward_fn("The answer is \\boxed{5}.", "5") == RIGHT
    assert question_only_reward_fn("\\boxed{1} no wait \\boxed{5}", "5") == RIGHT
    assert question_only_reward_fn("\\boxed{6}", "5") == WRONG
    assert question_only_reward_fn("The answer is 5.", "5") == BROKEN  # nothing boxed
    assert question_only_reward_fn("\\boxed{ }", "5") == BROKEN
    assert question_only_reward_fn("\\boxed{5", "5") == BROKEN  # cut off


def test_timeout_scores_zero_and_is_flagged():
    result = r1_zero_reward_fn(r1("10^{10^{10^{10}}}"), "5", timeout=0.3)
    assert result == dict(WRONG, timed_out=True)
    assert "timed_out" not in r1_zero_reward_fn(r1("5"), "5")


def test_s1_answers_are_read_after_the_answer_delimiter():
    """s1's format: ``<|im_start|>think ... <|im_start|>answer\\nAnswer: X<|im_end|>``; a
    forced end of thinking (budget forcing) writes the same delimiter."""
    from jaxalign.verify import answer_from_s1, s1_reward_fn

    turn = "<|im_start|>think\nso 6*7 is 42. Answer: 41?\n<|im_start|>answer\nAnswer: 42<|im_end|>"
    assert answer_from_s1(turn) == "42"  # the answer section, not the thinking's "Answer:"
    assert answer_from_s1("x<|im_start|>answer\nAnswer: $\\frac{1}{2}$.\nbecause...") == (
        "\\frac{1}{2}")
    assert answer_from_s1("x<|im_start|>answer\nThe area is \\boxed{12} square units.") == "12"
    assert answer_from_s1("x<|im_start|>answer\n7") == "7"  # no "Answer:": the section
    assert answer_from_s1("thinking that never ends") is None
    assert answer_from_s1("x<|im_start|>answer\n  <|im_end|>") is None
    assert s1_reward_fn(turn, "42") == {"format_reward": 1.0, "answer_reward": 1.0,
                                        "reward": 1.0}
    assert s1_reward_fn(turn, "41")["answer_reward"] == 0.0
    assert s1_reward_fn("no answer section", "42")["format_reward"] == 0.0

"""The r1_zero format rule, boxed extraction and the GSM8K / MMLU answer parsers."""

import pytest

from jaxalign.verify import (
    answer_from_r1_zero,
    extract_boxed,
    parse_gsm8k_response,
    parse_mmlu_response,
    parse_r1_zero,
)

# --- the r1_zero format rule ----------------------------------------------------------------

WELL_FORMED = [
    ("Let me think. </think> <answer>5</answer>", "5"),
    ("x </think>\n<answer>5</answer>", "5"),  # newline between the blocks
    ("x </think>\n\n  \t<answer> 5 </answer>\n", "5"),
    ("x</think><answer>5</answer>", "5"),  # no whitespace at all
    ("x </think> <answer>5</answer><|endoftext|>", "5"),
    ("x </think> <answer>5</answer> <|im_end|>\n", "5"),
    ("x </think> <answer>5</answer></s>", "5"),
    ("x </think> <answer>\\frac{1}{2}\n</answer>", "\\frac{1}{2}"),
    ("x </think> <answer></answer>", ""),  # well-formed, nothing to grade
]

MALFORMED = [
    "x <answer>5</answer>",  # no </think>
    "x </think> 5",  # no answer block
    "x </think> <answer>5",  # unclosed answer
    "x </think> 5</answer>",  # no opening tag
    "x </think> </think> <answer>5</answer>",  # second </think>
    "x <think> y </think> <answer>5</answer>",  # a second <think>
    "x </think> <answer>5</answer> <answer>5</answer>",  # second answer block
    "x </think> <answer>5</answer>\n<answer>6</answer>",
    "x <answer>4</answer> </think> <answer>5</answer>",  # answer block inside the thinking
    "x </think> <answer>5</answer> So the answer is 5.",  # text after </answer>
    "x </think> <answer>5</answer><|endoftext|>more text",
    "x </think> text <answer>5</answer>",  # text between </think> and <answer>
    "x </answer> </think> <answer>5</answer>",
    "<answer>5</answer> </think>",  # order reversed
    "",
    None,
    42,
]


@pytest.mark.parametrize("response,answer", WELL_FORMED)
def test_well_formed_responses_give_their_answer(response, answer):
    assert parse_r1_zero(response) == answer


@pytest.mark.parametrize("response", MALFORMED)
def test_malformed_responses_give_none(response):
    assert parse_r1_zero(response) is None


def test_answer_prefers_the_boxed_content_inside_the_answer():
    assert answer_from_r1_zero("x </think> <answer>So \\boxed{\\frac{1}{2}}.</answer>") == (
        "\\frac{1}{2}"
    )
    assert answer_from_r1_zero("x </think> <answer>\\boxed{1} or \\boxed{2}</answer>") == "2"
    assert answer_from_r1_zero("x </think> <answer>x = 5</answer>") == "x = 5"
    # A box in the thinking part is not the answer.
    assert answer_from_r1_zero("\\boxed{7} </think> <answer>5</answer>") == "5"
    assert answer_from_r1_zero("x </think> <answer>5</answer> <answer>") is None


# --- \boxed{} ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("so \\boxed{5}.", "5"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{2}", "2"),  # the last box
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces are not structure
        ("\\boxed{a \\\\ b}", "a \\\\ b"),  # an escaped backslash before a real brace
        ("\\fbox{7}", "7"),
        ("\\boxed 5 apples", "5"),  # brace-less form
        ("$\\boxed 5$", "5"),
        ("\\boxed {5}", "5"),
        ("\\boxed{}", ""),
        ("\\boxed{\\boxed{3}}", "3"),
        ("no box here", None),
        ("\\boxed{5", None),  # unclosed: cut-off generation
        ("\\boxed{1} and \\boxed{2", None),  # the last one is unclosed
        ("\\boxed", None),
        ("\\boxedx", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_boxed_is_linear_on_deep_nesting():
    deep = "\\boxed{" + "{" * 200_000 + "x" + "}" * 200_000 + "}"
    assert extract_boxed(deep) == "{" * 200_000 + "x" + "}" * 200_000
    assert extract_boxed("\\boxed{" + "{" * 500_000) is None


# --- GSM8K ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("She has 3 apples and buys 4, so 7.", "7"),
        ("The total is $1,234.", "1234"),
        ("1,000,000 people", "1000000"),
        ("It costs $18.90.", "18.90"),
        ("The answer is -3", "-3"),
        ("#### 72", "72"),
        ("from 3,4 we get", "4"),  # "3,4" is not a thousands-separated number
        ("12,5", "5"),
        ("no number at all", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_gsm8k_response(text, expected):
    assert parse_gsm8k_response(text) == expected


def test_parse_gsm8k_response_on_a_megabyte():
    assert parse_gsm8k_response("1 " * 500_000 + "42") == "42"


# --- MMLU -------------------------------------------------------------------------------------

EXAMPLE = {"question": "Capital of France?", "options": ["Berlin", "Paris", "Rome", "Madrid"]}


@pytest.mark.parametrize(
    "text,expected",
    [
        ("The correct answer is B.", "B"),
        ("The correct answer is B", "B"),
        ("Answer: (C)", "C"),
        ("answer: D", "D"),
        ("So the answer is **A**.", "A"),
        ("The answer is option D", "D"),
        ("I first thought the answer is A, but the answer is C.", "C"),  # the last statement
        ("The answer is Paris.", "B"),  # an option's text, stated as the answer
        ("the answer is a bit unclear", None),  # lowercase 'a' is a word
        ("The answer is Bob.", None),
        ("Paris is lovely. Rome too.", None),  # options mentioned, none stated as the answer
        ("I do not know.", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_mmlu_response(text, expected):
    assert parse_mmlu_response(EXAMPLE, text) == expected


def test_parse_mmlu_response_reads_hf_choices_and_tolerates_no_options():
    assert parse_mmlu_response({"choices": ["1", "2", "3", "4"]}, "The answer is 3") == "C"
    assert parse_mmlu_response({}, "The answer is 3") is None
    assert parse_mmlu_response({}, "The correct answer is B.") == "B"

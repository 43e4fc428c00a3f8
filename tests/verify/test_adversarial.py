"""Nasty inputs: none may crash or hang the caller, every one gets an exact, bounded verdict.

Each case is an r1_zero response (or an answer placed in one) graded against the gold "5",
with the reward it must get. Runs through the shared process pool (the training path) and
in this process's main thread (the signal-based limit), both under a 0.5 s limit.
"""

import time

import pytest

from jaxalign.verify import grader, r1_zero_reward_fn, shared_pool

TIMEOUT = 0.3
MB = 1 << 20


def nest(opening, closing, depth, inner="1"):
    return opening * depth + inner + closing * depth


# name -> (answer placed in a well-formed response, expected reward against gold "5")
ANSWERS = {
    # computations that explode: the time limit stops them
    "power_tower_10": ("10^{10^{10^{10}}}", 0.0),
    "power_tower_9": ("9^{9^{9^{9}}}", 0.0),
    "power_tower_2": ("2^{2^{2^{2^{2^{2^{2}}}}}}", 0.0),
    "factorial_huge": ("(10^{8})!", 0.0),
    "binomial_huge": ("\\binom{10^{9}}{10^{8}}", 0.0),
    "cancel_huge": ("10^{10^{10}} - 10^{10^{10}} + 5", 0.0),  # is 5, but not within the limit
    "sqrt_huge": ("\\sqrt{10^{10^{10}}}", 0.0),
    "exp_tower": ("e^{e^{e^{e^{100}}}}", 0.0),
    "sum_huge": ("\\sum_{n=1}^{10^{10}} n", 0.0),
    "prod_huge": ("\\prod_{k=1}^{10^{9}} k", 0.0),
    "integral": ("\\int_0^1 e^{x^{100}} dx", 0.0),
    "limit": ("\\lim_{x \\to \\infty} x^{x^{x}}", 0.0),
    "complex_tower": ("i^{i^{i^{i^{i}}}}", 0.0),
    "poly_cancel": ("(x+1)^{10000} - (x+1)^{10000} + 5", 1.0),  # sympy cancels it: it is 5
    # huge or strange numbers
    "float_exponent": ("1e1000000000", 0.0),
    "digits_5000": ("9" * 5000, 0.0),
    "decimal_tiny": ("0." + "0" * 5000 + "1", 0.0),
    "digits_near_5": ("5." + "0" * 3000 + "1", 0.0),  # long: compared as a string only
    "nan": ("NaN", 0.0),
    "inf_minus_inf": ("\\infty - \\infty", 0.0),
    "div_zero": ("\\frac{1}{0}", 0.0),
    "zero_zero": ("0/0", 0.0),
    "log_zero": ("\\log 0", 0.0),
    # deep nesting
    "parens_300": (nest("(", ")", 300), 0.0),
    "parens_5000": (nest("(", ")", 5000), 0.0),
    "frac_200": (nest("\\frac{1}{", "}", 200), 0.0),
    "sqrt_300": (nest("\\sqrt{", "}", 300), 0.0),
    "braces_100k": (nest("{", "}", 100_000), 0.0),
    "x_tower_200": (nest("x^{", "}", 200, "x"), 0.0),
    "five_in_braces": (nest("{", "}", 50, "5"), 1.0),
    # malformed LaTeX
    "open_braces_1mb": ("{" * MB, 0.0),
    "close_braces_1mb": ("}" * MB, 0.0),
    "boxed_spam": ("\\boxed{" * 10_000, 0.0),
    "backslashes": ("\\" * 10_000, 0.0),
    "dollars": ("$" * 10_000, 0.0),
    "unclosed_left": ("\\left( 1, 2", 0.0),
    "unclosed_env": ("\\begin{pmatrix} 1 & 2", 0.0),
    "frac_empty": ("\\frac{}{}", 0.0),
    "text_unclosed": ("\\text{5", 0.0),
    "macro_loop": ("\\def\\x{\\x}\\x", 0.0),
    "newcommand": ("\\newcommand{\\a}{\\a\\a}\\a", 0.0),
    "input_file": ("\\input{/etc/passwd}", 0.0),
    "many_equals": ("=" * 5000, 0.0),
    "percent_spam": ("\\%" * 5000, 0.0),
    "subscript_spam": ("x_" * 5000, 0.0),
    "interval_backwards": ("(5, -\\infty]", 0.0),
    "matrix_30x30": (
        "\\begin{pmatrix}" + "\\\\".join(["&".join(["x"] * 30)] * 30) + "\\end{pmatrix}",
        0.0,
    ),
    "set_2000": ("\\{" + ",".join(str(i) for i in range(2000)) + "\\}", 0.0),
    "text_1mb": ("a+b=c " * (MB // 6), 0.0),
    # code that must never run
    "py_import": ("__import__('os').system('touch {marker}')", 0.0),
    "py_lambda": ("(lambda: __import__('os').system('touch {marker}'))()", 0.0),
    "py_dunder": ("().__class__.__bases__[0].__subclasses__()", 0.0),
    "py_eval": ("eval(\"__import__('os').system('touch {marker}')\")", 0.0),
    # unicode and control characters (5 with invisible junk is still 5)
    "nul_bytes": ("5\x00\x00\x00", 1.0),
    "control_chars": ("\x1b[31m5\x1b[0m\x07\x08", 0.0),
    "lone_surrogate": ("5\ud800", 1.0),
    "zero_width": ("5\u200b\u200d\ufeff", 1.0),
    "rtl_override": ("\u202e5\u202c", 0.0),
    "fullwidth_five": ("\uff15", 1.0),
    "vulgar_half": ("\u00bd", 0.0),
    "emoji_1000": ("\U0001f600" * 1000, 0.0),
    "combining_marks": ("5" + "\u0301" * 10_000, 0.0),
    "crlf_ff_vt": ("5\r\n\f\v", 1.0),
}

# Whole responses (the format rule on hostile text), with their expected reward.
RESPONSES = {
    "think_spam": ("</think>" * 10_000 + "<answer>5</answer>", 0.0),
    "answer_spam": ("x </think> " + "<answer>5</answer>" * 10_000, 0.0),
    "megabyte_thinking": ("x" * MB + " </think> <answer>5</answer>", 1.0),
    "megabyte_after_answer": ("x </think> <answer>5</answer>" + " " * MB, 1.0),
    "eot_spam_after_answer": ("x </think> <answer>5</answer>" + "<|endoftext|>" * 10_000, 1.0),
    "junk_after_eot": ("x </think> <answer>5</answer><|endoftext|>" + "y" * MB, 0.0),
    "unclosed_answer_1mb": ("x </think> <answer>" + "5" * MB, 0.0),
    "nested_answer_tags": ("x </think> <answer><answer>5</answer></answer>", 0.0),
    "empty": ("", 0.0),
    "only_whitespace": (" \n\t" * 1000, 0.0),
}


def cases(marker):
    out = []
    for name, (answer, reward) in ANSWERS.items():
        answer = answer.replace("{marker}", str(marker))
        out.append((name, f"Thinking. </think> <answer>{answer}</answer>", reward))
    out += [(name, response, reward) for name, (response, reward) in RESPONSES.items()]
    return out


def test_there_are_at_least_fifty_cases(tmp_path):
    assert len(cases(tmp_path)) >= 50


def _check(name, result, reward):
    assert set(result) <= {"format_reward", "answer_reward", "reward", "timed_out"}, name
    assert result["reward"] == reward, (name, result)
    assert all(result[k] in (0.0, 1.0) for k in ("format_reward", "answer_reward")), name


def test_adversarial_inputs_through_the_pool(tmp_path):
    marker = tmp_path / "pwned"
    names, responses, rewards = zip(*cases(marker), strict=True)
    pool = shared_pool()
    pool.stats["max_item_seconds"] = 0.0
    start = time.monotonic()
    results = pool.score(list(responses), ["5"] * len(responses), timeout=TIMEOUT)
    elapsed = time.monotonic() - start
    for name, result, reward in zip(names, results, rewards, strict=True):
        _check(name, result, reward)
    timed_out = sum(1 for r in results if r.get("timed_out"))
    assert 5 <= timed_out <= 20  # the exploding computations, and nothing else en masse
    # No item held a worker past the kill deadline (timeout + grace), plus scheduling slack.
    assert pool.stats["max_item_seconds"] < TIMEOUT + pool.grace + 0.5
    assert elapsed < 60
    assert not marker.exists()


def test_adversarial_inputs_in_the_main_thread(tmp_path):
    marker = tmp_path / "pwned"
    grader.warm_up()
    for name, response, reward in cases(marker):
        start = time.monotonic()
        result = r1_zero_reward_fn(response, "5", timeout=TIMEOUT)
        # The signal fires at TIMEOUT; C code can delay it (about 0.3 s seen on a quiet
        # machine, 1.7 s with a second test run on the same 2 cores). Without the timeout
        # these inputs run for minutes.
        assert time.monotonic() - start < TIMEOUT + 3.0, name
        _check(name, result, reward)
    assert not marker.exists()


HOSTILE_GROUND_TRUTHS = {
    "none": None,
    "empty_list": [],
    "list_of_none": [None],
    "empty_string": "",
    "open_braces_1mb": "{" * MB,
    "power_tower": "10^{10^{10^{10}}}",
    "nan": float("nan"),
    "inf": float("inf"),
    "nested_list": [[5]],
}


@pytest.mark.parametrize(
    "ground_truth", HOSTILE_GROUND_TRUTHS.values(), ids=HOSTILE_GROUND_TRUTHS.keys()
)
def test_hostile_ground_truths_do_not_crash(ground_truth):
    grader.warm_up()  # the first parse imports half of sympy: not what this test times
    start = time.monotonic()
    result = r1_zero_reward_fn("x </think> <answer>5</answer>", ground_truth, timeout=TIMEOUT)
    assert result["format_reward"] == 1.0 and result["reward"] in (0.0, 1.0)
    # Same slack as above: a CI run once saw 1.66 s here (the alarm landed in a gc
    # callback, which swallows it, and fired again 50 ms later on a loaded machine).
    assert time.monotonic() - start < TIMEOUT + 3.0

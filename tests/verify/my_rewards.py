"""User reward functions for the tests: a module like one a user names in ``data.reward``
(``"my_rewards:length_penalty"`` with this folder on the path, or
``"tests.verify.my_rewards:length_penalty"`` from the repository root).

Each is ``fn(response, ground_truth, *, timeout) -> float | dict``.
"""

import signal
import time


def length_penalty(response, ground_truth, *, timeout):
    """A float: minus the response's length in hundreds of characters."""
    return -len(response) / 100


def even_e(response, ground_truth, *, timeout):
    """A reward a random tiny model can earn (an even number of 'e's), as a dict."""
    ok = float(response.count("e") % 2 == 0)
    return {"reward": ok, "answer_reward": ok, "format_reward": 1.0}


def says_yes(response, ground_truth, *, timeout):
    """A dict without format or answer verdicts."""
    return {"reward": float("yes" in response), "note": "ignored"}


def sleepy(response, ground_truth, *, timeout):
    """Sleeps past its time limit unless the response is "quick"."""
    if response != "quick":
        time.sleep(30)
    return 1.0


def stuck(response, ground_truth, *, timeout):
    """Ignores the soft limit (SIGALRM blocked), like C code: only the worker's kill stops it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(30)
    return 1.0


def returns_text(response, ground_truth, *, timeout):
    return "1.0"


def no_timeout(response, ground_truth):
    return 1.0


NOT_A_FUNCTION = 3


def solved(response, ground_truth, *, timeout):
    """Every response right: every group's rewards are equal (no GRPO signal)."""
    return {"reward": 1.0, "answer_reward": 1.0, "format_reward": 1.0}


def even_length(response, ground_truth, *, timeout):
    """A reward a random tiny model can earn (an even number of characters), as a dict."""
    ok = float(len(response) % 2 == 0)
    return {"reward": ok, "answer_reward": ok, "format_reward": 1.0}


def even_answer_or_even_e(response, ground_truth, *, timeout):
    """1 for every sample of a question whose answer is even (a group with no signal);
    else ``even_e``: a mix of informative and zero-std groups, for dynamic sampling."""
    if int(float(ground_truth)) % 2 == 0:
        return 1.0
    return even_e(response, ground_truth, timeout=timeout)["reward"]


def returns_nan(response, ground_truth, *, timeout):
    return float("nan")

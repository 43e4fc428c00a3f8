"""Pulling answers out of model text: the r1_zero format rule, boxed answers, GSM8K, MMLU.

Everything here is a linear-time string scan: no regex that can backtrack over model text,
no parsing of mathematics. A 1 MB response or 100,000 nested braces cost milliseconds, so
these functions run in the caller's process without a time limit.
"""

from __future__ import annotations

import re

# End-of-text tokens a generator may leave after ``</answer>`` (Qwen2, Llama 2 and 3 styles).
END_OF_TEXT = ("<|endoftext|>", "<|im_end|>", "</s>", "<|eot_id|>", "<|end_of_text|>")

_BOX_COMMANDS = ("\\boxed", "\\fbox")
# A backslash escape (``\{``, ``\\``) or a brace: brace matching skips escaped braces.
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``.

    Braces are matched and escaped braces skipped, so ``\\boxed{\\frac{1}{2}}`` gives
    ``\\frac{1}{2}`` and ``\\boxed{\\{1,2\\}}`` gives ``\\{1,2\\}``. The brace-less form
    ``\\boxed 5`` gives ``5`` (up to the next space or ``$``), as in the MATH reference code.

    Returns:
        The content (possibly empty), or None when there is no box or the last one is
        unclosed: an unclosed box means the generation was cut off, so there is no answer.
    """
    if not isinstance(text, str):
        return None
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    i = start + len(next(c for c in _BOX_COMMANDS if text.startswith(c, start)))
    j = i
    while j < len(text) and text[j] in " \t\n":
        j += 1
    if j == len(text):
        return None
    if text[j] != "{":
        if j == i or not text[j].isalnum():  # "\boxedx" is another command; "\boxed }" junk
            return None
        end = j
        while end < len(text) and not text[end].isspace() and text[end] != "$":
            end += 1
        return text[j:end]
    depth = 0
    for m in _BRACE_TOKEN.finditer(text, j):
        c = m.group()
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[j + 1 : m.start()]
    return None


def parse_r1_zero(response: str) -> str | None:
    """The ``<answer>`` content of a well-formed r1_zero continuation, else None.

    The response continues a prompt that already ends with ``<think>``. Well-formed means:
    exactly one ``</think>`` and no ``<think>``; after it only whitespace, then exactly one
    ``<answer> ... </answer>`` block; after ``</answer>`` only whitespace or end-of-text
    tokens (``END_OF_TEXT``). Stricter than the reference graders on purpose: a second
    ``<think>`` or ``<answer>`` block lets a policy farm format reward.

    Args:
        response: the model's continuation (the text after the prompt).

    Returns:
        The text between ``<answer>`` and ``</answer>``, stripped (possibly empty), or None
        when the format is wrong.
    """
    if not isinstance(response, str):
        return None
    if response.count("</think>") != 1 or "<think>" in response:
        return None
    if response.count("<answer>") != 1 or response.count("</answer>") != 1:
        return None
    after_think = response.split("</think>")[1].lstrip()
    if not after_think.startswith("<answer>"):
        return None
    inner, tail = after_think[len("<answer>") :].split("</answer>")
    for eot in END_OF_TEXT:
        tail = tail.replace(eot, "")
    if tail.strip():
        return None
    return inner.strip()


def answer_from_r1_zero(response: str) -> str | None:
    """The answer to grade: the ``<answer>`` content, or its last ``\\boxed{}`` if it has one.

    Returns None when the format is wrong (see ``parse_r1_zero``).
    """
    inner = parse_r1_zero(response)
    if inner is None:
        return None
    boxed = extract_boxed(inner)
    return boxed.strip() if boxed is not None else inner


# s1's answer section (Muennighoff et al. 2025): the assistant turn is
# "<|im_start|>think\n...<|im_start|>answer\nAnswer: ...<|im_end|>".
S1_ANSWER_MARK = "<|im_start|>answer"
_S1_ANSWER_PREFIX = re.compile(r"(?:final\s+)?answer\s*[:：]", re.IGNORECASE)


def answer_from_s1(response: str) -> str | None:
    """The answer to grade in an s1-format response: the text after the last
    ``<|im_start|>answer`` (without ``<|im_end|>`` and what follows it); there, the last
    ``\boxed{}`` if it has one, else what follows the last ``Answer:`` up to the end of its
    line. None when there is no answer section or nothing in it (the format is wrong)."""
    if not isinstance(response, str):
        return None
    head, found, section = response.rpartition(S1_ANSWER_MARK)
    if not found:
        return None
    section = section.split("<|im_end|>", 1)[0]
    boxed = extract_boxed(section)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    marks = list(_S1_ANSWER_PREFIX.finditer(section))
    text = section[marks[-1].end():] if marks else section
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    answer = lines[0].rstrip(".").strip().strip("$").strip() if lines else ""
    return answer or None


# "1,234,567.5" as one number (thousands groups), else a plain integer or decimal. The
# separator form comes first so "1,000" is not read as "1" and "000".
_GSM8K_NUMBER = re.compile(r"[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def parse_gsm8k_response(text: str) -> str | None:
    """The last number in ``text``, thousands separators removed, or None if there is none.

    ``"... so she pays $1,234.50."`` gives ``"1234.50"``; ``"-3"`` gives ``"-3"``. The
    number is returned as written (no rounding); ``grade`` compares it by value.
    """
    if not isinstance(text, str):
        return None
    last = None
    for last in _GSM8K_NUMBER.finditer(text):  # noqa: B007 -- we want the last match
        pass
    if last is None:
        return None
    return last.group().replace(",", "").replace("\u2212", "-")


# "answer is B", "Answer: (C)", "answer is **D**", "answer is option A". The letter must be
# a capital not followed by a letter, so "the answer is a bit" and "answer is Bob" give
# nothing. Possessive quantifiers: no backtracking over long whitespace runs.
_MMLU_LETTER = re.compile(
    r"(?i:answer)(?:\s++(?i:is))?\s*+:?\s*+(?:(?i:option)\s++)?[*(\[]{0,3}([ABCD])(?![A-Za-z])"
)
# The text of a stated answer, for matching an option's text: "answer is Paris."
_MMLU_STATED = re.compile(r"(?i:answer)(?:\s++(?i:is))?\s*+:?[ \t]*+([^\n]{1,200})")


def _option_key(text: str) -> str:
    return " ".join(text.strip(" \t*.()[]").split()).casefold()


def parse_mmlu_response(example: dict, text: str) -> str | None:
    """The option ('A'-'D') an MMLU response chooses, or None.

    Recognises the last statement of the form "The correct answer is B", "Answer: (C)",
    "answer is **D**". Failing that, if the text after the last "answer is" / "answer:" is
    exactly one option's text ("The answer is Paris."), that option. Never guesses from stray
    letters or from option texts mentioned in the reasoning.

    Args:
        example: the MMLU example; its options are read from ``options`` or ``choices``
            (a list of 4 strings) when present.
        text: the model's response.
    """
    if not isinstance(text, str):
        return None
    letters = _MMLU_LETTER.findall(text)
    if letters:
        return letters[-1]
    options = (example or {}).get("options") or (example or {}).get("choices") or []
    stated = _MMLU_STATED.findall(text)
    if not stated or not options:
        return None
    said = _option_key(stated[-1])
    hits = [
        i for i, opt in enumerate(options[:4]) if isinstance(opt, str) and _option_key(opt) == said
    ]
    return "ABCD"[hits[0]] if len(hits) == 1 else None

"""Prompt templates: the files in ``jaxalign/data/prompts/`` and ``format_prompt``.

A template is plain text with one ``{question}`` placeholder. Two ship with the package,
byte-identical to ``../shared/data/prompts/``:

- ``r1_zero``: the DeepSeek R1-Zero prompt of CS336 assignment 5 and Dr. GRPO. It ends with
  ``Assistant: <think>``, so a response continues the thinking part and must contain
  ``</think> <answer> ... </answer>`` (the format ``jaxalign.verify`` scores).
- ``question_only``: the bare question.

    format_prompt("r1_zero", "What is 2+3?")        # a shipped template, by name
    format_prompt("Q: {question}\\nA:", "2+3?")     # or any template text
"""

from __future__ import annotations

import functools
import importlib.resources

PLACEHOLDER = "{question}"
TEMPLATE_NAMES = ("r1_zero", "question_only")


@functools.cache
def load_template(name: str) -> str:
    """Text of the shipped template ``name`` (one of ``TEMPLATE_NAMES``), exactly as in the file."""
    if name not in TEMPLATE_NAMES:
        raise ValueError(f"unknown prompt template {name!r}; shipped templates: {TEMPLATE_NAMES}")
    path = importlib.resources.files("jaxalign.data") / "prompts" / f"{name}.prompt"
    # newline="" keeps the bytes as they are: the prompt is part of the training distribution.
    with path.open("r", encoding="utf-8", newline="") as f:
        return f.read()


def format_prompt(template: str, question: str) -> str:
    """The prompt for ``question``.

    Args:
        template: a shipped template's name (``"r1_zero"``, ``"question_only"``) or template
            text containing ``{question}``.
        question: the problem text, inserted verbatim.

    Returns:
        The template with every ``{question}`` replaced by ``question``. Plain replacement,
        not ``str.format``: templates and questions hold LaTeX braces (``\\frac{1}{2}``) that
        ``format`` would read as fields. For templates without other braces (both shipped
        ones) the result equals ``template.format(question=question)``, as in CS336.

    Raises:
        ValueError: the template has no ``{question}`` placeholder.
        TypeError: ``question`` is not a string.
    """
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    text = load_template(template) if template in TEMPLATE_NAMES else template
    if PLACEHOLDER not in text:
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise ValueError(
            f"prompt template has no {PLACEHOLDER} placeholder (template {shown!r}); "
            f"pass one of {TEMPLATE_NAMES} or text containing {PLACEHOLDER}"
        )
    return text.replace(PLACEHOLDER, question)

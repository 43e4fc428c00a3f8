"""Prompt templates: the files in ``jaxalign/data/prompts/`` and ``format_prompt``.

A template is plain text with one ``{question}`` placeholder. Two ship with the package,
byte-identical to ``../shared/data/prompts/``:

- ``r1_zero``: the DeepSeek R1-Zero prompt of CS336 assignment 5 and Dr. GRPO. It ends with
  ``Assistant: <think>``, so a response continues the thinking part and must contain
  ``</think> <answer> ... </answer>`` (the format ``jaxalign.verify`` scores).
- ``question_only``: the bare question.

    format_prompt("r1_zero", "What is 2+3?")        # a shipped template, by name
    format_prompt("Q: {question}\\nA:", "2+3?")     # or any template text

Two more names need the model's tokenizer (``build_prompt``, the one function that turns a
question into a prompt for every template):

- ``chat``: the tokenizer's chat template (``apply_chat_template`` with
  ``add_generation_prompt``) around the question, after a system prompt (default
  ``CHAT_SYSTEM``, the Qwen2.5-Math CoT prompt; ``""``: no system message, so the template's
  own default, e.g. Qwen2.5's "You are Qwen, ...", applies). A response ends with the
  template's end-of-turn text (``end_of_turn``: ``<|im_end|>`` for Qwen).
- ``s1``: the chat template with no system message and the assistant turn opened by
  ``<|im_start|>think\\n``, the delimiters of s1 (Muennighoff et al. 2025): the model
  thinks, then writes ``<|im_start|>answer\\nAnswer: ...<|im_end|>`` (``s1_response``
  builds that turn for training).

    build_prompt("chat", "What is 2+3?", tokenizer)                    # CHAT_SYSTEM
    build_prompt("chat", "What is 2+3?", tokenizer, system_prompt="")  # the template's own
"""

from __future__ import annotations

import functools
import importlib.resources

PLACEHOLDER = "{question}"
TEMPLATE_NAMES = ("r1_zero", "question_only")

# Templates that need the model's tokenizer (its chat template).
CHAT = "chat"
S1 = "s1"
CHAT_TEMPLATES = (CHAT, S1)
# The Qwen2.5-Math evaluation suite's CoT system prompt: the answer is the last \\boxed{}.
CHAT_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
# Each chat template's system prompt when none is given: s1 trained with none (Qwen2.5's
# template then writes its own default system message).
DEFAULT_SYSTEM = {CHAT: CHAT_SYSTEM, S1: ""}
# s1's delimiters inside the assistant turn (its training data and budget forcing).
S1_THINK = "<|im_start|>think\n"
S1_ANSWER = "<|im_start|>answer\n"
S1_ANSWER_PREFIX = "Answer: "


class ChatTemplateError(ValueError):
    """A chat prompt asked of a tokenizer without a chat template; says what to change."""


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


def has_chat_template(tokenizer) -> bool:
    """Whether ``tokenizer`` has a chat template (``tokenizer_config.json``'s
    ``chat_template`` or ``chat_template.jinja``); the byte tokenizer of the tiny and small
    random presets has none."""
    return bool(getattr(tokenizer, "chat_template", None))


def _require_chat_template(template: str, tokenizer) -> None:
    if tokenizer is None or not has_chat_template(tokenizer):
        which = "no tokenizer was given" if tokenizer is None else (
            f"the tokenizer ({type(tokenizer).__name__}) has none")
        raise ChatTemplateError(
            f"the {template!r} prompt needs a tokenizer with a chat template "
            "(tokenizer_config.json 'chat_template' or chat_template.jinja), and "
            f"{which}: use a model whose tokenizer has one (e.g. an Instruct model) or a "
            f"plain template ({', '.join(TEMPLATE_NAMES)} or text with {PLACEHOLDER})")


def build_prompt(template: str, question: str, tokenizer=None, *,
                 system_prompt: str | None = None) -> str:
    """The prompt text for ``question`` under any template: the one function for it.

    Args:
        template: ``"chat"`` or ``"s1"`` (the tokenizer's chat template, see the module
            docstring), a shipped template's name or template text with ``{question}``.
        question: the problem text, inserted verbatim.
        tokenizer: a ``transformers`` tokenizer; needed for ``chat`` and ``s1`` only.
        system_prompt: ``chat`` and ``s1`` only: the system message; ``""`` for none (the
            chat template's own default then applies); None for ``DEFAULT_SYSTEM``.

    Raises:
        ChatTemplateError: ``chat`` or ``s1`` without a tokenizer that has a chat template.
        ValueError: a template text without ``{question}``.
        TypeError: ``question`` is not a string.
    """
    if template not in CHAT_TEMPLATES:
        return format_prompt(template, question)
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    _require_chat_template(template, tokenizer)
    system = DEFAULT_SYSTEM[template] if system_prompt is None else system_prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt + (S1_THINK if template == S1 else "")


def end_of_turn(tokenizer) -> str:
    """The text the chat template closes an assistant turn with (``<|im_end|>`` for Qwen's
    ChatML, ``<|eot_id|>`` for Llama 3), read off a rendered conversation; the EOS token
    when the template writes nothing after the content.

    A chat-template SFT response ends with it, so the model learns to end its turn where
    generation stops (``<|im_end|>`` is a stop string of ``chat`` evaluation).

    Raises:
        ChatTemplateError: the tokenizer has no chat template.
    """
    _require_chat_template(CHAT, tokenizer)
    marker = "\x00jaxalign-end-of-turn\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}],
        tokenize=False)
    _, found, after = text.rpartition(marker)
    after = after.strip() if found else ""
    return after or (getattr(tokenizer, "eos_token", None) or "")


def s1_response(thinking: str, answer: str) -> str:
    """s1's assistant turn (without the end-of-turn token): ``<|im_start|>think\\n{thinking}
    \\n<|im_start|>answer\\nAnswer: {answer}``.

    As s1's training data formats it: the thinking trace and answer stripped, and
    ``Answer: `` put before the answer unless it already contains ``Answer:``.
    """
    answer = answer.strip()
    if "Answer:" not in answer:
        answer = S1_ANSWER_PREFIX + answer
    return f"{S1_THINK}{thinking.strip()}\n{S1_ANSWER}{answer}"


def as_template_text(template: str, tokenizer=None, *, system_prompt: str | None = None) -> str:
    """``template`` as template text with one ``{question}``, for code that takes template
    text (``format_prompt``) but no tokenizer: a chat template rendered once around the
    placeholder; other templates' own text.

    Raises:
        ChatTemplateError: ``chat`` or ``s1`` without a chat template.
        ValueError: a chat template that does not insert the question verbatim (then
            ``build_prompt`` must be called per question).
    """
    if template not in CHAT_TEMPLATES:
        return load_template(template) if template in TEMPLATE_NAMES else template
    text = build_prompt(template, PLACEHOLDER, tokenizer, system_prompt=system_prompt)
    probe = "What is 2+3? {x} \\frac{1}{2}"
    if text.count(PLACEHOLDER) != 1 or format_prompt(text, probe) != build_prompt(
            template, probe, tokenizer, system_prompt=system_prompt):
        raise ValueError(f"the tokenizer's chat template does not insert the question "
                         f"verbatim, so the {template!r} prompt has no template text")
    return text

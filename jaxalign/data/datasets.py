"""Math datasets: ``MathExample``, loaders for JSONL files and Hugging Face datasets, benchmarks.

Every source goes through one row validator, so a bad row is reported the same way
wherever it comes from: ``DataError("path:line: reason")``. With ``skip_invalid=True`` bad
rows are skipped instead and their count (and the first reasons) logged as a warning.
A row is bad when it is not a JSON object, a mapped field is missing, not text, or empty,
no answer can be parsed from it, or its text is longer than ``max_chars``.

    train = load_benchmark("gsm8k", "../shared/data", split="train")
    prompt, response = gsm8k_sft_trace(train[0])           # an r1_zero SFT pair
    mine = load_jsonl("my.jsonl", FieldMap(question="problem", answer="answer"))
    hub = load_hf_dataset("json", "train", FieldMap(), data_files="my.jsonl")

The five benchmarks of ``../shared/data/README.md`` and how their fields map are in
``BENCHMARKS``: GSM8K's answer is the number after ``####`` (thousands separators
removed), Minerva's the last ``\\boxed{}`` of the solution, the others a field as given
(AMC23's floats stay as written, ``"27.0"``: the grader equates ``27`` and ``27.0``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from jaxalign.data.prompts import format_prompt
from jaxalign.verify.extract import extract_boxed

logger = logging.getLogger(__name__)

# How many skipped-row reasons a warning quotes; the count is always complete.
_REASONS_SHOWN = 5


class DataError(ValueError):
    """A bad row, with ``where`` (``"path:line"`` or ``"name[split] row i"``) in the message."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class MathExample:
    """One problem with its reference answer.

    Attributes:
        question: the problem statement, inserted into a prompt template.
        answer: the gold answer as text (``"72"``, ``"\\frac{1}{2}"``, ``"27.0"``).
        solution: a worked solution when the source has one (GSM8K: the steps and
            ``#### N``, unchanged), else None.
        id: the source's identifier (``unique_id``, ``id``, ``idx``) as text, else None.
        source: where the row came from, ``"path:line"`` (1-based line) or
            ``"name[split] row i"``, so later errors can point at it.
        meta: the row's other fields (``subject``, ``level``, ``url``, ...), unchanged.
    """

    question: str
    answer: str
    solution: str | None = None
    id: str | None = None
    source: str | None = None
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class FieldMap:
    """Which row fields hold the question, answer, solution and id.

    Attributes:
        question: the field with the problem text.
        answer: the field the answer is read from (a string, or a number kept as ``str``).
        solution: the field with a worked solution, or None.
        id: the field with an identifier, or None.
        parse_answer: applied to the answer field's text; returns the answer, or None when
            there is none (a bad row). None keeps the text as is (stripped).
    """

    question: str = "question"
    answer: str = "answer"
    solution: str | None = None
    id: str | None = None
    parse_answer: Callable[[str], str | None] | None = None


def gsm8k_final_answer(text: str) -> str | None:
    """The number after the last ``####`` of a GSM8K solution, without thousands separators.

    ``"... #### 1,234"`` gives ``"1234"``; text without ``####`` gives None.
    """
    head, sep, tail = text.rpartition("####")
    if not sep:
        return None
    answer = tail.strip().replace(",", "")
    return answer or None


BENCHMARKS: dict[str, FieldMap] = {
    "gsm8k": FieldMap("question", "answer", solution="answer", parse_answer=gsm8k_final_answer),
    "math500": FieldMap("problem", "answer", solution="solution", id="unique_id"),
    "aime24": FieldMap("problem", "answer", solution="solution", id="id"),
    "amc23": FieldMap("problem", "answer", id="id"),
    "minerva_math": FieldMap("problem", "solution", solution="solution", id="idx",
                             parse_answer=extract_boxed),
}  # fmt: skip


def _text(row: Mapping[str, Any], field: str, *, numbers: bool = False) -> str:
    """``row[field]`` as non-empty text; numbers allowed (as ``str``) for answers and ids."""
    if field not in row:
        raise ValueError(f"missing field {field!r} (fields: {sorted(row)})")
    value = row[field]
    if numbers and isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError(f"field {field!r} is {type(value).__name__}, not text")
    if not value.strip():
        raise ValueError(f"field {field!r} is empty")
    return value


def example_from_row(
    row: Any, fields: FieldMap, *, source: str | None = None, max_chars: int | None = None
) -> MathExample:
    """One validated ``MathExample`` from a row (a dict); ``ValueError`` says what is wrong.

    Args:
        row: the decoded row.
        fields: which fields to read.
        source: recorded on the example (``"path:line"``).
        max_chars: when set, a row whose question plus solution is longer is bad.
    """
    if not isinstance(row, Mapping):
        raise ValueError(f"row is a JSON {type(row).__name__}, not an object")
    question = _text(row, fields.question)
    raw_answer = _text(row, fields.answer, numbers=True)
    if fields.parse_answer is None:
        answer = raw_answer.strip()
    else:
        answer = fields.parse_answer(raw_answer)
        if answer is None or not answer.strip():
            name = getattr(fields.parse_answer, "__name__", "parse_answer")
            raise ValueError(f"no answer in field {fields.answer!r} ({name} found none)")
        answer = answer.strip()
    solution = None if fields.solution is None else _text(row, fields.solution)
    id_ = None if fields.id is None else _text(row, fields.id, numbers=True)
    if max_chars is not None:
        n = len(question) + len(solution or "")
        if n > max_chars:
            raise ValueError(f"over-long: {n} characters of question and solution > {max_chars}")
    used = {fields.question, fields.answer, fields.solution, fields.id}
    meta = {k: v for k, v in row.items() if k not in used}
    return MathExample(question, answer, solution, id_, source, meta)


def _collect(
    rows: Iterable[tuple[str, Any]],
    decode: Callable[[Any], Any],
    fields: FieldMap,
    *,
    what: str,
    skip_invalid: bool,
    max_chars: int | None,
) -> list[MathExample]:
    """Validates ``(where, raw row)`` pairs: raises on the first bad row, or skips and logs."""
    examples, skipped = [], []
    for where, raw in rows:
        try:
            example = example_from_row(decode(raw), fields, source=where, max_chars=max_chars)
        except json.JSONDecodeError as e:
            error, reason = e, f"invalid JSON: {e.msg} (column {e.colno})"
        except ValueError as e:
            error, reason = e, str(e)
        else:
            examples.append(example)
            continue
        if not skip_invalid:
            raise DataError(where, reason) from error
        skipped.append(f"{where}: {reason}")
    if skipped:
        shown = "; ".join(skipped[:_REASONS_SHOWN])
        n_more = len(skipped) - _REASONS_SHOWN
        more = f"; and {n_more} more" if n_more > 0 else ""
        logger.warning(
            "skipped %d invalid rows of %s (kept %d): %s%s",
            len(skipped), what, len(examples), shown, more,
        )  # fmt: skip
    return examples


def load_jsonl(
    path: str | os.PathLike,
    fields: FieldMap = FieldMap(),
    *,
    skip_invalid: bool = False,
    max_chars: int | None = None,
) -> list[MathExample]:
    """Examples from a JSONL file, one JSON object per line; blank lines are ignored.

    Args:
        path: the file.
        fields: which fields hold question, answer, solution and id.
        skip_invalid: skip bad rows (their count is logged) instead of raising.
        max_chars: rows whose question plus solution exceed this many characters are bad.

    Raises:
        DataError: a bad row (unless ``skip_invalid``), message ``"path:line: reason"``.
        FileNotFoundError: no such file.
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()  # a whole benchmark is a few MB
    rows = ((f"{path}:{i}", line) for i, line in enumerate(lines, start=1) if line.strip())
    return _collect(
        rows, json.loads, fields, what=path, skip_invalid=skip_invalid, max_chars=max_chars
    )


def load_hf_dataset(
    name_or_path: str,
    split: str,
    fields: FieldMap = FieldMap(),
    *,
    skip_invalid: bool = False,
    max_chars: int | None = None,
    **load_kwargs: Any,
) -> list[MathExample]:
    """Examples from a Hugging Face dataset, via ``datasets.load_dataset``.

    Args:
        name_or_path: a Hub name (``"openai/gsm8k"``), a local dataset directory, or a
            builder (``"json"`` with ``data_files=...``).
        split: the split to load (``"train"``, ``"test"``).
        fields: which fields hold question, answer, solution and id.
        skip_invalid: skip bad rows (their count is logged) instead of raising.
        max_chars: rows whose question plus solution exceed this many characters are bad.
        **load_kwargs: passed to ``datasets.load_dataset`` (``name``, ``data_files``,
            ``revision``, ...).

    Raises:
        DataError: a bad row, message ``"name_or_path[split] row i: reason"`` (0-based i).
    """
    import datasets  # slow to import; only this loader needs it

    ds = datasets.load_dataset(name_or_path, split=split, **load_kwargs)
    what = f"{name_or_path}[{split}]"
    rows = ((f"{what} row {i}", row) for i, row in enumerate(ds))
    return _collect(
        rows, lambda row: row, fields, what=what, skip_invalid=skip_invalid, max_chars=max_chars
    )


def load_benchmark(
    name: str,
    data_dir: str | os.PathLike,
    split: str = "test",
    *,
    skip_invalid: bool = False,
    max_chars: int | None = None,
) -> list[MathExample]:
    """A benchmark of ``BENCHMARKS`` from ``data_dir/name/split.jsonl``.

    Args:
        name: ``"gsm8k"``, ``"math500"``, ``"aime24"``, ``"amc23"`` or ``"minerva_math"``.
        data_dir: the folder holding one subfolder per benchmark (``../shared/data``).
        split: ``"test"``, or ``"train"`` for GSM8K.
        skip_invalid: skip bad rows (their count is logged) instead of raising.
        max_chars: rows whose question plus solution exceed this many characters are bad.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    path = os.path.join(os.fspath(data_dir), name, f"{split}.jsonl")
    return load_jsonl(path, BENCHMARKS[name], skip_invalid=skip_invalid, max_chars=max_chars)


# GSM8K's calculator annotations, "48/2 = <<48/2=24>>24": the model should not learn them.
_CALCULATOR = re.compile(r"<<[^<>]*>>")


def gsm8k_sft_trace(example: MathExample, template: str = "r1_zero") -> tuple[str, str]:
    """A GSM8K training example as an r1_zero SFT pair: the steps think, the number answers.

    ``"A = <<2*3=6>>6.\\n#### 6"`` becomes the response
    ``" A = 6. </think> <answer> 6 </answer>"``, continuing a prompt that ends in ``<think>``
    (as r1_zero's does; for a template that does not, the response opens with ``<think>``).

    Args:
        example: a GSM8K example whose ``solution`` is the original answer text.
        template: the prompt template's name or text.

    Returns:
        ``(prompt, response)``.

    Raises:
        ValueError: no solution, no ``####`` in it, or no steps before it.
    """
    if example.solution is None:
        raise ValueError(f"{example.source}: a GSM8K SFT trace needs the solution text")
    steps, sep, _ = example.solution.rpartition("####")
    steps = _CALCULATOR.sub("", steps).strip()
    if not sep or not steps:
        raise ValueError(f"{example.source}: GSM8K solution without steps before '#### N'")
    prompt = format_prompt(template, example.question)
    opening = "" if prompt.endswith("<think>") else "<think>"
    return prompt, f"{opening} {steps} </think> <answer> {example.answer} </answer>"

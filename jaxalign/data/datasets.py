"""Math datasets: ``MathExample``, loaders for JSONL files and Hugging Face datasets, benchmarks.

Every source goes through one row validator, so a bad row is reported the same way
wherever it comes from: ``DataError("path:line: reason")``. With ``skip_invalid=True`` bad
rows are skipped instead and their count (and the first reasons) logged as a warning.
A row is bad when it is not valid UTF-8 or JSON, not a JSON object, a required field
(question, answer; SFT: prompt, response) is missing, not text, or empty, no answer can be
parsed from it, or its text is longer than ``max_chars``. Optional fields (solution, id)
are read when the row has them and never required. A file with no rows, or none valid,
is a ``DataError`` naming the file: nothing downstream trains on an empty list.

    train = load_benchmark("gsm8k", "../shared/data", split="train")
    prompt, response = gsm8k_sft_trace(train[0])           # an r1_zero SFT pair
    mine = load_jsonl("my.jsonl", FieldMap(question="problem", answer="answer"))
    hub = load_hf_dataset("json", "train", FieldMap(), data_files="my.jsonl")
    problems, fields = load_problems("math_train.jsonl")   # MATH or GSM8K shape, detected
    pairs = load_sft_jsonl("traces.jsonl")                 # {"prompt", "response"} rows

The five benchmarks of ``../shared/data/README.md`` and how their fields map are in
``BENCHMARKS``: GSM8K's answer is the number after ``####`` (thousands separators
removed), Minerva's the last ``\\boxed{}`` of the solution, the others a field as given
(AMC23's floats stay as written, ``"27.0"``: the grader equates ``27`` and ``27.0``).
Training files for GRPO and Expert Iteration come in the shapes of MATH and GSM8K;
``problem_fields`` reads which from the file's first row (``load_problems``).
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from jaxalign.data.prompts import format_prompt
from jaxalign.verify.extract import extract_boxed

logger = logging.getLogger(__name__)

T = TypeVar("T")

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
        kind = "null" if value is None else type(value).__name__
        raise ValueError(f"field {field!r} is {kind}, not text")
    if not value.strip():
        raise ValueError(f"field {field!r} is empty")
    return value


def _optional_text(
    row: Mapping[str, Any], field: str | None, *, numbers: bool = False
) -> str | None:
    """``row[field]`` as text, or None when no field is mapped or the row's is absent, null
    or blank. An optional field never costs a row; one of the wrong type (a list, an
    object) does: it says the row is not what the field map takes it for."""
    if field is None or row.get(field) is None:
        return None
    if isinstance(row[field], str) and not row[field].strip():
        return None
    return _text(row, field, numbers=numbers)


def _object(row: Any) -> Mapping[str, Any]:
    if not isinstance(row, Mapping):
        raise ValueError(f"row is a JSON {type(row).__name__}, not an object")
    return row


def example_from_row(
    row: Any, fields: FieldMap, *, source: str | None = None, max_chars: int | None = None
) -> MathExample:
    """One validated ``MathExample`` from a row (a dict); ``ValueError`` says what is wrong.

    Question and answer are required; solution and id are read when the row has them.

    Args:
        row: the decoded row.
        fields: which fields to read.
        source: recorded on the example (``"path:line"``).
        max_chars: when set, a row whose question plus solution is longer is bad.
    """
    row = _object(row)
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
    solution = _optional_text(row, fields.solution)
    id_ = _optional_text(row, fields.id, numbers=True)
    if max_chars is not None:
        n = len(question) + len(solution or "")
        if n > max_chars:
            raise ValueError(f"over-long: {n} characters of question and solution > {max_chars}")
    used = {fields.question, fields.answer, fields.solution, fields.id}
    meta = {k: v for k, v in row.items() if k not in used}
    return MathExample(question, answer, solution, id_, source, meta)


def sft_pair_from_row(
    row: Any, *, prompt: str = "prompt", response: str = "response"
) -> tuple[str, str]:
    """``(prompt, response)`` of an SFT row; ``ValueError`` says what is wrong.

    Both fields are required and must be non-empty text, kept exactly as written
    (whitespace is part of what the model learns). A number or null is not text: coerced,
    ``null`` would train the model to answer ``None``.
    """
    row = _object(row)
    return _text(row, prompt), _text(row, response)


# --- reading: one validator for every source -------------------------------------------


def _jsonl_rows(path: str) -> list[tuple[str, bytes]]:
    """``("path:line", raw bytes)`` of each non-blank line (1-based, as editors number them)."""
    with open(path, "rb") as f:
        data = f.read()  # a whole benchmark is a few MB
    # Bytes split on "\n" only: decoding first and str.splitlines() would also cut a row at
    # the separators (U+2028, \x1c, ...) a JSON string may hold unescaped, and one bad byte
    # would fail the whole file instead of naming its line.
    lines = data.split(b"\n")
    if lines[0].startswith(codecs.BOM_UTF8):  # some editors write one; it is not row text
        lines[0] = lines[0][len(codecs.BOM_UTF8) :]
    return [(f"{path}:{i}", line) for i, line in enumerate(lines, start=1) if line.strip()]


def _json_row(raw: bytes) -> Any:
    """One JSONL line, decoded; ``ValueError`` says what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"not UTF-8: byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line "
            "(re-encode the file as UTF-8)"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e.msg} (column {e.colno})") from None


def _collect(
    rows: Iterable[tuple[str, Any]],
    parse: Callable[[Any, str], T],
    *,
    what: str,
    skip_invalid: bool,
) -> list[T]:
    """``parse(raw row, where)`` over ``(where, raw row)`` pairs: the first bad row raises, or
    with ``skip_invalid`` every bad row is skipped and counted in one warning.

    Raises:
        DataError: a bad row (``where``); or no rows, or no valid rows, at all (``what``):
            an empty list would only fail later, far from the file that caused it.
    """
    items, skipped = [], []
    for where, raw in rows:
        try:
            items.append(parse(raw, where))
        except ValueError as e:
            if not skip_invalid:
                raise DataError(where, str(e)) from e
            skipped.append(f"{where}: {e}")
    shown = "; ".join(skipped[:_REASONS_SHOWN])
    n_more = len(skipped) - _REASONS_SHOWN
    more = f"; and {n_more} more" if n_more > 0 else ""
    if not items:
        if skipped:
            raise DataError(what, f"no valid rows: all {len(skipped)} are invalid ({shown}{more})")
        raise DataError(what, "no rows (empty)")
    if skipped:
        logger.warning(
            "skipped %d invalid rows of %s (kept %d): %s%s",
            len(skipped), what, len(items), shown, more,
        )  # fmt: skip
    return items


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
        DataError: a bad row (unless ``skip_invalid``), message ``"path:line: reason"``;
            a file without (valid) rows, ``"path: reason"``.
        FileNotFoundError: no such file.
    """
    path = os.fspath(path)

    def parse(raw: bytes, where: str) -> MathExample:
        return example_from_row(_json_row(raw), fields, source=where, max_chars=max_chars)

    return _collect(_jsonl_rows(path), parse, what=path, skip_invalid=skip_invalid)


def load_sft_jsonl(path: str | os.PathLike, *, skip_invalid: bool = False) -> list[tuple[str, str]]:
    """``(prompt, response)`` pairs from a JSONL file of ``{"prompt", "response"}`` objects.

    Rows are validated as math rows are (``sft_pair_from_row``): the same errors, the same
    counted skips.

    Raises:
        DataError: a bad row (unless ``skip_invalid``), ``"path:line: reason"``; a file
            without (valid) rows, ``"path: reason"``.
        FileNotFoundError: no such file.
    """
    path = os.fspath(path)
    return _collect(
        _jsonl_rows(path),
        lambda raw, where: sft_pair_from_row(_json_row(raw)),
        what=path,
        skip_invalid=skip_invalid,
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
        DataError: a bad row, message ``"name_or_path[split] row i: reason"`` (0-based i);
            a split without (valid) rows, ``"name_or_path[split]: reason"``.
    """
    import datasets  # slow to import; only this loader needs it

    ds = datasets.load_dataset(name_or_path, split=split, **load_kwargs)
    what = f"{name_or_path}[{split}]"
    rows = ((f"{what} row {i}", row) for i, row in enumerate(ds))

    def parse(row: Any, where: str) -> MathExample:
        return example_from_row(row, fields, source=where, max_chars=max_chars)

    return _collect(rows, parse, what=what, skip_invalid=skip_invalid)


# --- training problems: MATH- or GSM8K-shaped files ------------------------------------


def gsm8k_or_plain_answer(text: str) -> str | None:
    """GSM8K's ``"steps #### N"`` gives N (``gsm8k_final_answer``); other text is the answer
    as written. Per row, so a MATH-shaped file with some GSM8K rows still grades right."""
    if "####" in text:
        return gsm8k_final_answer(text)
    return text.strip() or None


# The identifier fields of the common math datasets, in the order they are looked for.
_ID_FIELDS = ("unique_id", "id", "idx")


def problem_fields(row: Any) -> FieldMap:
    """Which fields of a MATH- or GSM8K-style row hold a training problem.

    Only what GRPO and Expert Iteration use is required: a question and an answer.

    - question: ``problem`` (MATH), else ``question`` (GSM8K).
    - answer: ``answer``. When it holds GSM8K's ``"steps #### N"`` the answer is N, and
      every row must have the ``####``; otherwise N is taken from rows that have one and the
      text as written from the rest (``gsm8k_or_plain_answer``). Without an ``answer`` field,
      the last ``\\boxed{}`` of ``solution`` (MATH train rows often have only the solution).
    - solution: ``solution`` (for GSM8K rows, the ``answer`` text, as in ``BENCHMARKS``);
      id: the first of ``unique_id``, ``id``, ``idx``. Each mapped when this row has it, and
      never required of other rows.

    Raises:
        ValueError: the row is not an object, or has no question or no answer field.
    """
    row = _object(row)
    question = next((f for f in ("problem", "question") if f in row), None)
    if question is None:
        raise ValueError(f"no question field: need 'problem' or 'question' (fields: {sorted(row)})")
    if "answer" in row:
        gsm8k = isinstance(row["answer"], str) and "####" in row["answer"]
        parse = gsm8k_final_answer if gsm8k else gsm8k_or_plain_answer
        solution = "solution" if "solution" in row else ("answer" if gsm8k else None)
        answer = "answer"
    elif "solution" in row:
        answer, parse, solution = "solution", extract_boxed, "solution"
    else:
        raise ValueError(
            "no answer field: need 'answer', or 'solution' with the answer in \\boxed{} "
            f"(fields: {sorted(row)})"
        )
    id_ = next((f for f in _ID_FIELDS if f in row), None)
    return FieldMap(question, answer, solution=solution, id=id_, parse_answer=parse)


_PARSE_NOTES = {
    gsm8k_final_answer: "#### N",
    gsm8k_or_plain_answer: "as written, or N of '#### N'",
    extract_boxed: "last \\boxed{}",
}


def describe_fields(fields: FieldMap) -> str:
    """Which field gave what, for the log: ``"question<-'question', answer<-'answer' (#### N)"``."""
    parts = [f"question<-{fields.question!r}", f"answer<-{fields.answer!r}"]
    if fields.parse_answer is not None:
        note = _PARSE_NOTES.get(fields.parse_answer)
        parts[-1] += f" ({note or getattr(fields.parse_answer, '__name__', 'parsed')})"
    if fields.solution is not None:
        parts.append(f"solution<-{fields.solution!r}")
    if fields.id is not None:
        parts.append(f"id<-{fields.id!r}")
    return ", ".join(parts)


def _first_problem_fields(
    rows: Sequence[tuple[str, bytes]], what: str, skip_invalid: bool
) -> FieldMap:
    """``problem_fields`` of the first row (with ``skip_invalid``, the first usable one)."""
    for where, raw in rows:
        try:
            row = _json_row(raw)
            fields = problem_fields(row)
            example_from_row(row, fields)  # the row that decides must itself be usable
            return fields
        except ValueError as e:
            if not skip_invalid:
                raise DataError(where, str(e)) from e
    if not rows:
        raise DataError(what, "no rows (empty)")
    raise DataError(what, f"no valid rows: none of the {len(rows)} has a question and an answer")


def problem_file_fields(path: str | os.PathLike, *, skip_invalid: bool = False) -> FieldMap:
    """The fields ``load_problems`` will read from a file: a config check reads this before
    a model is loaded. Raises ``DataError`` as ``load_problems`` does for the first row."""
    path = os.fspath(path)
    return _first_problem_fields(_jsonl_rows(path), path, skip_invalid)


def load_problems(
    path: str | os.PathLike, *, skip_invalid: bool = False, max_chars: int | None = None
) -> tuple[list[MathExample], FieldMap]:
    """Training problems from a MATH- or GSM8K-shaped JSONL file: what GRPO and EI read.

    The fields are read off the first row (``problem_fields``; with ``skip_invalid``, the
    first usable row), then every row is validated with them, as in ``load_jsonl``.

    Returns:
        ``(examples, fields)``; ``describe_fields(fields)`` says which fields were used.

    Raises:
        DataError: a first row with no question or answer field, a bad row (unless
            ``skip_invalid``), or a file without (valid) rows.
        FileNotFoundError: no such file.
    """
    path = os.fspath(path)
    rows = _jsonl_rows(path)
    fields = _first_problem_fields(rows, path, skip_invalid)

    def parse(raw: bytes, where: str) -> MathExample:
        return example_from_row(_json_row(raw), fields, source=where, max_chars=max_chars)

    return _collect(rows, parse, what=path, skip_invalid=skip_invalid), fields


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

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
    s1 = load_sft_source("hf:simplescaling/s1K-1.1",       # s1-shaped: s1's assistant turn
                         fields="prompt=question,thinking=thinking_trajectories,response=attempt")

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

from jaxalign.data import prompts
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


class SourceUnavailable(DataError):
    """A dataset that cannot be loaded at all (offline, unknown name, config or split): no
    row was read, so no field mapping can help."""


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
    row: Any, *, prompt: str = "prompt", response: str = "response", thinking: str | None = None
) -> tuple[str, str]:
    """``(prompt, response)`` of an SFT row; ``ValueError`` says what is wrong.

    Both fields are required and must be non-empty text, kept exactly as written
    (whitespace is part of what the model learns). A number or null is not text: coerced,
    ``null`` would train the model to answer ``None``.

    With ``thinking`` the row is shaped like s1K / s1K-1.1 (``question``,
    ``thinking_trajectories``, ``attempt``): ``response`` names the answer and ``thinking``
    the reasoning trace, text or a list of texts (s1K's ``thinking_trajectories``; joined
    with newlines, as s1 does: its lists hold one trace), and the response is s1's
    assistant turn, ``prompts.s1_response(thinking, answer)``.
    """
    row = _object(row)
    if thinking is None:
        return _text(row, prompt), _text(row, response)
    return _text(row, prompt), prompts.s1_response(_trace(row, thinking), _text(row, response))


def _trace(row: Mapping[str, Any], field: str) -> str:
    """A thinking trace: non-empty text, or a non-empty list of texts joined by newlines."""
    value = row.get(field)
    if isinstance(value, list):
        if not value or not all(isinstance(v, str) for v in value):
            raise ValueError(f"field {field!r} is a list, but not a non-empty list of text")
        value = "\n".join(value)
        if not value.strip():
            raise ValueError(f"field {field!r} is empty")
        return value
    return _text(row, field)


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
    what = f"{name_or_path}[{split}]"
    rows = ((f"{what} row {i}", row) for i, row in enumerate(_hf_split(name_or_path, split,
                                                                        **load_kwargs)))

    def parse(row: Any, where: str) -> MathExample:
        return example_from_row(row, fields, source=where, max_chars=max_chars)

    return _collect(rows, parse, what=what, skip_invalid=skip_invalid)


def _hf_split(name_or_path: str, split: str, **load_kwargs: Any):
    """One split of a Hugging Face dataset: a Hub name, a folder of data files, or a
    folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (which
    ``load_dataset`` does not read)."""
    import datasets  # slow to import; only the Hugging Face sources need it

    path = os.path.expanduser(name_or_path)
    saved = any(os.path.isfile(os.path.join(path, f))
                for f in ("state.json", "dataset_dict.json"))
    if not saved:
        return datasets.load_dataset(name_or_path, split=split, **load_kwargs)
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise SourceUnavailable(f"{name_or_path}", f"no split {split!r} (splits: "
                                                       f"{sorted(ds)})")
        return ds[split]
    return ds  # a single saved split is the split asked for


# --- sources named in a config or on a command line -----------------------------------

HF_PREFIX = "hf:"
# ``fields=...,parse=NAME``: how an answer field's text becomes the gold answer.
ANSWER_PARSERS: dict[str, Callable[[str], str | None] | None] = {
    "none": None, "gsm8k": gsm8k_final_answer, "boxed": extract_boxed,
}
FIELDS_GRAMMAR = "question=F,answer=F[,solution=F][,id=F][,parse=none|gsm8k|boxed]"


def parse_field_map(spec: str | None) -> FieldMap | None:
    """A field mapping as a config or command line writes it; ``ValueError`` if malformed.

    ``"question=problem,answer=final,parse=boxed"`` -> ``FieldMap("problem", "final",
    parse_answer=extract_boxed)``. Empty: None (the fields are read off the first row,
    ``problem_fields``). Unnamed, question and answer are the fields ``question`` and
    ``answer``; ``parse`` defaults to none (the answer as written).
    """
    if not spec or not spec.strip():
        return None
    kwargs: dict[str, Any] = {}
    for item in spec.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not value or key not in ("question", "answer", "solution", "id", "parse"):
            raise ValueError(f"fields {spec!r}: expected {FIELDS_GRAMMAR}")
        if key in kwargs or (key == "parse" and "parse_answer" in kwargs):
            raise ValueError(f"fields {spec!r}: {key!r} given twice")
        if key == "parse":
            if value not in ANSWER_PARSERS:
                raise ValueError(f"fields {spec!r}: parse={value!r}; choose "
                                 f"{', '.join(ANSWER_PARSERS)}")
            kwargs["parse_answer"] = ANSWER_PARSERS[value]
        else:
            kwargs[key] = value
    return FieldMap(**kwargs)


SFT_FIELDS_GRAMMAR = "prompt=F,response=F[,thinking=F]"


def parse_sft_field_names(spec: str | None) -> dict[str, str | None]:
    """``"prompt=F,response=F[,thinking=F]"`` -> ``sft_pair_from_row``'s keyword arguments
    (empty: ``prompt``, ``response``, no thinking). With ``thinking`` the rows are
    s1-shaped: ``prompt=question,thinking=thinking_trajectories,response=attempt``."""
    names: dict[str, str | None] = {"prompt": "prompt", "response": "response", "thinking": None}
    if spec and spec.strip():
        given = {}
        for item in spec.split(","):
            key, sep, value = (part.strip() for part in item.partition("="))
            if not sep or not value or key not in names or key in given:
                raise ValueError(f"fields {spec!r}: expected {SFT_FIELDS_GRAMMAR} for SFT rows")
            given[key] = value
        names.update(given)
    return names


def parse_sft_fields(spec: str | None) -> tuple[str, str]:
    """``"prompt=F,response=F"`` -> the two field names (empty: ``prompt``, ``response``)."""
    names = parse_sft_field_names(spec)
    return names["prompt"], names["response"]


def hf_source(spec: str) -> tuple[str, str | None]:
    """``"hf:NAME[:CONFIG]"`` -> ``(NAME, CONFIG or None)``; NAME is a Hub id or a local
    folder (data files, or a ``save_to_disk`` dataset)."""
    name, _, config = spec[len(HF_PREFIX):].partition(":")
    if not name:
        raise ValueError(f"{spec!r}: expected hf:NAME[:CONFIG] (a Hub id or a local folder)")
    return name, config or None


def _source_rows(source: str, split: str) -> tuple[str, list[tuple[str, Any]], Callable]:
    """``(what, [(where, raw row)], decode)`` of a JSONL file or an ``hf:`` dataset.

    Raises:
        DataError: an ``hf:`` dataset that cannot be loaded (offline, unknown name or split).
        FileNotFoundError: no such file.
    """
    if not source.startswith(HF_PREFIX):
        return source, _jsonl_rows(source), _json_row
    name, config = hf_source(source)
    what = f"{source}[{split}]"
    try:
        ds = _hf_split(name, split, **({"name": config} if config else {}))
    except DataError:
        raise
    except Exception as e:  # offline, unknown dataset, config or split: one line, not a trace
        raise SourceUnavailable(what, f"cannot load the Hugging Face dataset "
                                      f"({type(e).__name__}: "
                                      f"{str(e).splitlines()[0] if str(e) else e})") from None
    return what, _HfRows(ds, what), lambda row: row


class _HfRows:
    """``(where, row)`` pairs of a Hugging Face split, read lazily: a config check that
    needs the first usable row converts only the rows up to it."""

    def __init__(self, ds, what: str):
        self.ds, self.what = ds, what

    def __len__(self) -> int:
        return len(self.ds)

    def __iter__(self):
        return ((f"{self.what} row {i}", row) for i, row in enumerate(self.ds))


def _first_fields(
    rows: Sequence[tuple[str, Any]], decode: Callable, what: str, fields: FieldMap | None,
    skip_invalid: bool,
) -> FieldMap:
    """The fields the rows are read with: ``fields``, or ``problem_fields`` of the first
    row (with ``skip_invalid``, the first usable one); that row must itself be usable."""
    for where, raw in rows:
        try:
            row = decode(raw)
            found = fields or problem_fields(row)
            example_from_row(row, found)
            return found
        except ValueError as e:
            if not skip_invalid:
                raise DataError(where, str(e)) from e
    if not rows:
        raise DataError(what, "no rows (empty)")
    raise DataError(what, f"no valid rows: none of the {len(rows)} has a question and an answer")


def problem_source_fields(
    source: str, *, fields: FieldMap | None = None, split: str = "train",
    skip_invalid: bool = False,
) -> FieldMap:
    """The fields ``load_problem_source`` will read, checked on the first row: a config
    check calls this before a model is loaded. Raises ``DataError`` as the loader would."""
    what, rows, decode = _source_rows(source, split)
    return _first_fields(rows, decode, what, fields, skip_invalid)


def load_problem_source(
    source: str, *, fields: FieldMap | None = None, split: str = "train",
    skip_invalid: bool = False, max_chars: int | None = None,
) -> tuple[list[MathExample], FieldMap]:
    """Training problems from a JSONL file or a Hugging Face dataset (``hf:NAME[:CONFIG]``,
    split ``split``).

    Args:
        source: a JSONL path, or ``hf:`` + a Hub id or a local dataset folder.
        fields: which fields hold question and answer (``parse_field_map``); None reads
            the MATH or GSM8K shape off the first row (``problem_fields``).
        split: the split of an ``hf:`` dataset (ignored for files).
        skip_invalid: skip bad rows (their count is logged) instead of raising.
        max_chars: rows whose question plus solution exceed this many characters are bad.

    Returns:
        ``(examples, fields)``; ``describe_fields(fields)`` says which fields were used.

    Raises:
        DataError: a bad row (unless ``skip_invalid``), naming ``path:line`` or
            ``hf:NAME[split] row i``; a source without (valid) rows; an ``hf:`` dataset that
            cannot be loaded.
        FileNotFoundError: no such file.
    """
    what, rows, decode = _source_rows(source, split)
    found = _first_fields(rows, decode, what, fields, skip_invalid)

    def parse(raw: Any, where: str) -> MathExample:
        return example_from_row(decode(raw), found, source=where, max_chars=max_chars)

    return _collect(rows, parse, what=what, skip_invalid=skip_invalid), found


def check_sft_source(
    source: str, *, fields: str | None = None, split: str = "train", skip_invalid: bool = False,
) -> None:
    """``load_sft_source``'s checks on the first row (the first usable one with
    ``skip_invalid``), for a config check before a model is loaded. Raises ``DataError``
    (or ``ValueError`` for a malformed ``fields``)."""
    names = parse_sft_field_names(fields)
    what, rows, decode = _source_rows(source, split)
    for where, raw in rows:
        try:
            sft_pair_from_row(decode(raw), **names)
            return
        except ValueError as e:
            if not skip_invalid:
                raise DataError(where, str(e)) from e
    wanted = " and ".join(repr(n) for n in names.values() if n)
    raise DataError(what, "no rows (empty)" if not rows else
                    f"no valid rows: none of the {len(rows)} has text {wanted}")


def load_sft_source(
    source: str, *, fields: str | None = None, split: str = "train", skip_invalid: bool = False,
) -> list[tuple[str, str]]:
    """``(prompt, response)`` pairs from a JSONL file or an ``hf:`` dataset; ``fields``
    (``"prompt=F,response=F[,thinking=F]"``, ``parse_sft_field_names``) maps other field
    names, and with ``thinking`` builds s1's assistant turn. Rows are validated as in
    ``load_sft_jsonl``."""
    names = parse_sft_field_names(fields)
    what, rows, decode = _source_rows(source, split)
    return _collect(
        rows,
        lambda raw, where: sft_pair_from_row(decode(raw), **names),
        what=what,
        skip_invalid=skip_invalid,
    )


# --- evaluation sets named in a config ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """One validation set of ``eval.sets``: logged as ``eval/<name>/...``.

    Attributes:
        name: the benchmark name, or a file's stem / an ``hf:`` dataset's name.
        source: a ``BENCHMARKS`` name, a JSONL path or ``hf:NAME[:CONFIG]``.
        limit: the first ``limit`` problems (None: all).
    """

    name: str
    source: str
    limit: int | None = None


def eval_set_name(source: str) -> str:
    """The name a set is logged under: ``gsm8k``; ``my_val`` for ``/data/my_val.jsonl``;
    ``gsm8k_main`` for ``hf:openai/gsm8k:main``."""
    if source.startswith(HF_PREFIX):
        name, config = hf_source(source)
        return os.path.basename(os.path.normpath(name)) + (f"_{config}" if config else "")
    if source in BENCHMARKS:
        return source
    return os.path.splitext(os.path.basename(source))[0]


def parse_eval_sets(spec: str) -> list[EvalSet]:
    """``"gsm8k:64,math500:128,amc23"`` -> one ``EvalSet`` each; ``ValueError`` if malformed.

    Each item is a benchmark name (``BENCHMARKS``), a JSONL path or ``hf:NAME[:CONFIG]``,
    optionally followed by ``:N``, the first N problems. Names must differ.
    """
    sets: list[EvalSet] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        head, sep, tail = item.rpartition(":")
        limit = None
        if sep and tail.isdigit() and head and head != HF_PREFIX.rstrip(":"):
            item, limit = head, int(tail)
            if limit < 1:
                raise ValueError(f"eval set {item!r}: the limit :{tail} must be >= 1")
        if not (item in BENCHMARKS or item.startswith(HF_PREFIX) or item.endswith(".jsonl")):
            raise ValueError(f"eval set {item!r}: a benchmark ({', '.join(BENCHMARKS)}), a "
                             ".jsonl file or hf:NAME[:CONFIG], optionally followed by :N")
        name = eval_set_name(item)
        if any(s.name == name for s in sets):
            raise ValueError(f"eval set {item!r}: a second set named {name!r}")
        sets.append(EvalSet(name, item, limit))
    return sets


def load_eval_set(
    spec: EvalSet, *, data_dir: str | os.PathLike, split: str = "test"
) -> list[MathExample]:
    """The problems of one ``EvalSet``: a benchmark from ``data_dir/<name>/<split>.jsonl``
    (its own field map), a JSONL file or an ``hf:`` dataset (split ``split``; MATH or GSM8K
    shape, as ``load_problem_source``). Raises ``DataError`` / ``FileNotFoundError``."""
    if spec.source in BENCHMARKS:
        examples = load_benchmark(spec.source, data_dir, split)
    else:
        examples, _ = load_problem_source(spec.source, split=split)
    return examples[: spec.limit] if spec.limit else examples


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


def problem_file_fields(path: str | os.PathLike, *, skip_invalid: bool = False) -> FieldMap:
    """The fields ``load_problems`` will read from a file (``problem_source_fields``)."""
    return problem_source_fields(os.fspath(path), skip_invalid=skip_invalid)


def load_problems(
    path: str | os.PathLike, *, skip_invalid: bool = False, max_chars: int | None = None
) -> tuple[list[MathExample], FieldMap]:
    """Training problems from a MATH- or GSM8K-shaped JSONL file, the fields read off the
    first row (``load_problem_source`` with no field map)."""
    return load_problem_source(os.fspath(path), skip_invalid=skip_invalid, max_chars=max_chars)


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


def gsm8k_sft_trace(
    example: MathExample, template: str = "r1_zero", tokenizer=None, *,
    system_prompt: str | None = None,
) -> tuple[str, str]:
    """A GSM8K training example as an SFT pair: the steps think, the number answers.

    ``"A = <<2*3=6>>6.\\n#### 6"`` becomes the r1_zero response
    ``" A = 6. </think> <answer> 6 </answer>"``, continuing a prompt that ends in ``<think>``
    (as r1_zero's does; for a template that does not, the response opens with ``<think>``).
    Under the ``chat`` template (``prompts.build_prompt``, whose default system prompt asks
    for the final answer in ``\\boxed{}``) the response is the steps, then
    ``"The final answer is $\\boxed{6}$."`` and the template's end-of-turn text
    (``<|im_end|>`` for Qwen), so the model learns to end its turn: ``"A = 6.\\nThe final
    answer is $\\boxed{6}$.<|im_end|>"``, graded by the ``question_only`` reward.

    Args:
        example: a GSM8K example whose ``solution`` is the original answer text.
        template: the prompt template's name or text, or ``"chat"``.
        tokenizer: the model's tokenizer (``chat`` only).
        system_prompt: ``chat`` only: the system message (None: ``prompts.CHAT_SYSTEM``;
            ``""``: none).

    Returns:
        ``(prompt, response)``.

    Raises:
        ValueError: no solution, no ``####`` in it, or no steps before it; ``s1`` (its
            traces come from s1-shaped rows, ``sft_pair_from_row``).
        ChatTemplateError: ``chat`` without a tokenizer that has a chat template.
    """
    if example.solution is None:
        raise ValueError(f"{example.source}: a GSM8K SFT trace needs the solution text")
    steps, sep, _ = example.solution.rpartition("####")
    steps = _CALCULATOR.sub("", steps).strip()
    if not sep or not steps:
        raise ValueError(f"{example.source}: GSM8K solution without steps before '#### N'")
    if template == prompts.S1:
        raise ValueError("GSM8K traces have no s1 form: train with template 'chat' on "
                         "s1-shaped rows (thinking=F in the fields)")
    if template == prompts.CHAT:
        prompt = prompts.build_prompt(template, example.question, tokenizer,
                                      system_prompt=system_prompt)
        return prompt, (f"{steps}\nThe final answer is $\\boxed{{{example.answer}}}$."
                        f"{prompts.end_of_turn(tokenizer)}")
    prompt = format_prompt(template, example.question)
    opening = "" if prompt.endswith("<think>") else "<think>"
    return prompt, f"{opening} {steps} </think> <answer> {example.answer} </answer>"

"""Issue #19, data: nothing lost, nothing silently wrong.

SFT rows are validated like math rows; MATH- and GSM8K-shaped training files need only a
question and an answer; empty files and bad bytes are errors that name the file and line;
prompts that would run past the model's context are refused (or skipped and counted).
"""

import json
import logging
import re

import pytest
from jsonl_rows import row, write_lines

from jaxalign.data.datasets import (
    BENCHMARKS,
    DataError,
    describe_fields,
    load_jsonl,
    load_problems,
    load_sft_jsonl,
    problem_file_fields,
)
from jaxalign.data.tokenize import fit_to_context

# --- SFT rows: checked, never coerced ----------------------------------------------------


@pytest.mark.parametrize(
    "line, reason",
    [
        (row(prompt="Q: 5", response=None), "field 'response' is null, not text"),
        (row(prompt="Q: 5", response=42), "field 'response' is int, not text"),
        (row(prompt="Q: 5", response=""), "field 'response' is empty"),
        (row(prompt="  ", response="A: 5"), "field 'prompt' is empty"),
        (row(prompt="Q: 5"), "missing field 'response'"),
        (row(prompt=["Q: 5"], response="A: 5"), "field 'prompt' is list, not text"),
        ("[1, 2]", "row is a JSON list, not an object"),
        ("42", "row is a JSON int, not an object"),
        ('{"prompt": "Q: 5", ', "invalid JSON"),
    ],
)
def test_bad_sft_row_is_a_data_error_naming_file_and_line(tmp_path, line, reason):
    path = write_lines(tmp_path / "sft.jsonl", [row(prompt="Q: 1", response="A: 1"), line])
    with pytest.raises(DataError, match=re.escape(reason)) as err:
        load_sft_jsonl(path)
    assert err.value.where == f"{path}:2"
    assert str(err.value).startswith(f"{path}:2: ")


def test_sft_rows_keep_their_text_exactly_and_skips_are_counted(tmp_path, caplog):
    good = [row(prompt="Q: 1\n", response=" A: 1 "), row(prompt="Q: 2", response="A: 2")]
    bad = [row(prompt="Q: 5", response=None), row(prompt="Q: 6", response=42), "[]"]
    path = write_lines(tmp_path / "mixed.jsonl", [good[0], *bad, "", good[1]])
    with caplog.at_level(logging.WARNING):
        pairs = load_sft_jsonl(path, skip_invalid=True)
    assert pairs == [("Q: 1\n", " A: 1 "), ("Q: 2", "A: 2")]
    assert f"skipped 3 invalid rows of {path} (kept 2)" in caplog.text
    assert f"{path}:2: field 'response' is null" in caplog.text
    assert "None" not in "".join(p + r for p, r in pairs)


# --- training problems: MATH- and GSM8K-shaped files -----------------------------------


def test_math_rows_with_only_a_solution_take_the_last_boxed_answer(tmp_path):
    path = write_lines(
        tmp_path / "math_train.jsonl",
        [
            row(problem="1+1?", solution="Try \\boxed{3}, no: \\boxed{2}.", level="Level 1"),
            row(problem="Half?", solution="It is $\\boxed{\\frac{1}{2}}$."),
        ],
    )
    problems, fields = load_problems(path)
    assert [(p.question, p.answer) for p in problems] == [("1+1?", "2"), ("Half?", "\\frac{1}{2}")]
    assert problems[0].solution.startswith("Try") and problems[0].id is None
    assert problems[0].meta == {"level": "Level 1"} and problems[1].source == f"{path}:2"
    assert describe_fields(fields) == (
        "question<-'problem', answer<-'solution' (last \\boxed{}), solution<-'solution'"
    )


def test_gsm8k_rows_give_the_number_after_the_marker(tmp_path):
    path = write_lines(
        tmp_path / "gsm8k_like.jsonl",
        [
            row(question="How many?", answer="2 * 3 = <<2*3=6>>6\n#### 6"),
            row(question="How much?", answer="So 1,000 + 234 = 1234.\n#### 1,234"),
        ],
    )
    problems, fields = load_problems(path)
    assert [(p.question, p.answer) for p in problems] == [("How many?", "6"), ("How much?", "1234")]
    assert problems[0].solution == "2 * 3 = <<2*3=6>>6\n#### 6"  # as BENCHMARKS["gsm8k"]
    assert describe_fields(fields) == (
        "question<-'question', answer<-'answer' (#### N), solution<-'answer'"
    )
    # In a GSM8K-shaped file a row without the marker has no answer: an error, not the steps.
    bad = write_lines(tmp_path / "bad.jsonl", [row(question="q", answer="s\n#### 1"),
                                               row(question="r", answer="no marker 7")])
    with pytest.raises(DataError, match=re.escape(f"{bad}:2: no answer in field 'answer'")):
        load_problems(bad)


def test_problem_and_answer_alone_are_enough(tmp_path):
    path = write_lines(
        tmp_path / "pa.jsonl",
        [row(problem="1+1?", answer="2", unique_id="t/1.json"), row(problem="2+2?", answer=4),
         row(problem="3+3?", answer="  6 ", unique_id=None)],
    )
    problems, fields = load_problems(path)
    # Optional fields are read where present and never required.
    assert [(p.question, p.answer, p.id, p.solution) for p in problems] == [
        ("1+1?", "2", "t/1.json", None), ("2+2?", "4", None, None), ("3+3?", "6", None, None)]
    assert describe_fields(fields) == (
        "question<-'problem', answer<-'answer' (as written, or N of '#### N'), id<-'unique_id'")
    assert problem_file_fields(path) == fields
    # The benchmark map that used to require MATH500's solution and unique_id reads it too.
    assert [p.answer for p in load_jsonl(path, BENCHMARKS["math500"])] == ["2", "4", "6"]


@pytest.mark.parametrize(
    "first, reason",
    [
        (row(text="1+1?", answer="2"), "no question field: need 'problem' or 'question'"),
        (row(problem="1+1?", steps="2"), "no answer field: need 'answer', or 'solution'"),
        (row(problem="1+1?", solution="two, no box"), "no answer in field 'solution'"),
    ],
)
def test_problem_files_without_a_question_or_answer_say_which_fields_they_have(
    tmp_path, first, reason
):
    path = write_lines(tmp_path / "p.jsonl", [first, row(problem="2+2?", answer="4")])
    with pytest.raises(DataError, match=re.escape(f"{path}:1: {reason}")):
        load_problems(path)
    # With skip_invalid the first usable row decides, and the bad one is counted out.
    problems, _ = load_problems(path, skip_invalid=True)
    assert [p.answer for p in problems] == ["4"]


# --- errors with a place: empty files, bad bytes ------------------------------------------


def _loaders():
    return {
        "load_jsonl": load_jsonl,
        "load_sft_jsonl": load_sft_jsonl,
        "load_problems": load_problems,
        "problem_file_fields": problem_file_fields,
    }


@pytest.mark.parametrize("loader", sorted(_loaders()))
@pytest.mark.parametrize("text", ["", "\n  \n\n"])
def test_an_empty_file_is_a_data_error_naming_it(tmp_path, loader, text):
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match=re.escape(f"{path}: no rows")):
        _loaders()[loader](path)


@pytest.mark.parametrize("loader", sorted(_loaders()))
def test_a_non_utf8_byte_names_file_and_line(tmp_path, loader):
    good = {"load_sft_jsonl": row(prompt="p", response="r")}.get(
        loader, row(question="1+1?", problem="1+1?", answer="2"))
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good.encode() + b"\n" + '{"question": "caf\xe9", "answer": "1"}'.encode(
        "latin-1") + b"\n")
    if loader == "problem_file_fields":  # reads the first row only: fine
        assert problem_file_fields(path).question == "problem"
        return
    with pytest.raises(DataError, match=re.escape(f"{path}:2: not UTF-8: byte 0xe9")):
        _loaders()[loader](path)


def test_all_rows_skipped_is_an_error_not_an_empty_list(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ["[]", row(prompt="p", response=None)])
    with pytest.raises(DataError, match=re.escape(f"{path}: no valid rows: all 2 are invalid")):
        load_sft_jsonl(path, skip_invalid=True)


def test_rows_are_lines_even_with_unicode_separators_and_a_bom(tmp_path):
    """A JSON string may hold U+2028 unescaped; it is not a line break of the file."""
    path = tmp_path / "u.jsonl"
    text = json.dumps({"question": "a\u2028b\x1cc?", "answer": "1"}, ensure_ascii=False)
    path.write_bytes(b"\xef\xbb\xbf" + (text + "\r\n" + row(question="d?", answer="2")).encode())
    examples = load_jsonl(path)
    assert [(e.question, e.source) for e in examples] == [
        ("a\u2028b\x1cc?", f"{path}:1"), ("d?", f"{path}:2")]


# --- the model's context --------------------------------------------------------------


def test_fit_to_context_refuses_or_skips_and_counts(caplog):
    lengths = [10, 30, 25, 12]
    assert fit_to_context(lengths, 8, 40, skip=False) == [0, 1, 2, 3]
    with pytest.raises(ValueError) as err:
        fit_to_context(lengths, 16, 40, skip=False, names=["a:1", "a:2", "a:3", "a:4"],
                       what="training questions", fix="lower max_tokens")
    msg = str(err.value)
    assert msg.startswith("2 of 4 training questions do not fit the model's context")
    assert "+ 16 new tokens > max_position_embeddings=40" in msg
    assert "the longest, a:2, has 30 prompt tokens: at most 10 new tokens fit it" in msg
    assert msg.endswith("; lower max_tokens")
    with caplog.at_level(logging.WARNING):
        assert fit_to_context(lengths, 16, 40, skip=True) == [0, 3]
    assert "skipped 2 of 4 prompts do not fit" in caplog.text

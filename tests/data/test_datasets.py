"""Prompt templates, JSONL / Hugging Face loaders, the five benchmarks, GSM8K SFT traces."""

import logging
import re

import pytest
from jsonl_rows import row, write_lines

from jaxalign.data.datasets import (
    BENCHMARKS,
    DataError,
    FieldMap,
    MathExample,
    gsm8k_final_answer,
    gsm8k_sft_trace,
    load_benchmark,
    load_hf_dataset,
    load_jsonl,
)
from jaxalign.data.prompts import TEMPLATE_NAMES, format_prompt, load_template
from jaxalign.verify.extract import extract_boxed, parse_r1_zero

# --- prompt templates ------------------------------------------------------------------


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_shipped_templates_are_byte_identical(name, shared_data):
    assert load_template(name).encode() == (shared_data / "prompts" / f"{name}.prompt").read_bytes()


def test_format_prompt():
    question = r"Is $\frac{1}{2} < {x}$?"  # braces that str.format would choke on
    prompt = format_prompt("r1_zero", question)
    assert prompt == load_template("r1_zero").replace("{question}", question)
    assert prompt.endswith(f"User: {question}\nAssistant: <think>")
    assert format_prompt("r1_zero", "2+3?") == load_template("r1_zero").format(question="2+3?")
    assert format_prompt("question_only", question) == question
    assert format_prompt("Q: {question}\nA:", "2+3?") == "Q: 2+3?\nA:"


def test_format_prompt_errors():
    with pytest.raises(ValueError, match=r"no \{question\} placeholder"):
        format_prompt("Q: {problem}", "2+3?")
    with pytest.raises(ValueError, match=r"no \{question\} placeholder"):
        format_prompt("r1-zero", "2+3?")  # a misspelt name is text without the placeholder
    with pytest.raises(TypeError, match="question must be a str"):
        format_prompt("r1_zero", None)
    with pytest.raises(ValueError, match="unknown prompt template"):
        load_template("nope")


# --- the real benchmark files ----------------------------------------------------------


def test_gsm8k_train_all_rows_make_r1_zero_traces(shared_data):
    train = load_benchmark("gsm8k", shared_data, split="train")
    assert len(train) == 7473
    template = load_template("r1_zero")
    for ex in train:
        assert re.fullmatch(r"-?\d+", ex.answer), (ex.source, ex.answer)
        prompt, response = gsm8k_sft_trace(ex)
        assert prompt.endswith("Assistant: <think>") and ex.question in prompt
        assert len(prompt) == len(template) - len("{question}") + len(ex.question)
        assert "<<" not in response and ">>" not in response
        assert response.endswith(f"</think> <answer> {ex.answer} </answer>")
        assert parse_r1_zero(response) == ex.answer  # the verifier's format rule accepts it
    assert train[0].source.endswith("gsm8k/train.jsonl:1")
    prompt, response = gsm8k_sft_trace(train[0])
    assert response == (
        " Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in "
        "April and May. </think> <answer> 72 </answer>"
    )
    # 79 answers have thousands separators in the file; none survive.
    assert sum("," in ex.solution.rpartition("####")[2] for ex in train) == 79


def test_benchmarks_row_counts_and_answers(shared_data):
    counts = {"math500": 500, "aime24": 30, "amc23": 40, "minerva_math": 272}
    loaded = {name: load_benchmark(name, shared_data) for name in counts}
    assert {name: len(rows) for name, rows in loaded.items()} == counts
    assert len(load_benchmark("gsm8k", shared_data)) == 1319
    assert set(BENCHMARKS) == set(counts) | {"gsm8k"}
    for rows in loaded.values():
        assert all(ex.question.strip() and ex.answer.strip() for ex in rows)
    math500 = loaded["math500"]
    assert math500[0].answer == r"\left( 3, \frac{\pi}{2} \right)"
    assert math500[0].id == "test/precalculus/807.json"
    assert set(math500[0].meta) == {"subject", "level"}
    assert len({ex.id for ex in math500}) == 500
    assert loaded["aime24"][0].answer == "204" and loaded["aime24"][0].id == "60"
    for ex in loaded["amc23"]:
        float(ex.answer)  # numeric strings, written as in the file ("27.0")
    assert loaded["amc23"][0].answer == "27.0"
    for ex in loaded["minerva_math"]:
        assert ex.answer and ex.solution and "\\boxed" in ex.solution
    assert loaded["minerva_math"][0].answer == "1.6"


# --- loaders: field mapping and bad rows -----------------------------------------------


def test_load_jsonl_field_mapping(tmp_path):
    path = write_lines(
        tmp_path / "d.jsonl",
        [
            row(problem="1+1?", sol="So \\boxed{2}.", ans=" 2 ", tag="t", idx=7),
            "",  # blank lines are not rows
            row(problem="2+2?", sol="\\boxed{\\frac{8}{2}}", ans=4, tag="u", idx=8),
        ],
    )
    examples = load_jsonl(path, FieldMap("problem", "ans", solution="sol", id="idx"))
    assert examples[0] == MathExample("1+1?", "2", "So \\boxed{2}.", "7", f"{path}:1", {"tag": "t"})
    assert examples[1].answer == "4" and examples[1].source == f"{path}:3"
    boxed = load_jsonl(path, FieldMap("problem", "sol", parse_answer=extract_boxed))
    assert [ex.answer for ex in boxed] == ["2", "\\frac{8}{2}"]
    assert boxed[0].solution is None and boxed[0].meta == {"ans": " 2 ", "tag": "t", "idx": 7}


def test_gsm8k_final_answer():
    assert gsm8k_final_answer("a\nb\n#### 1,234,567") == "1234567"
    assert gsm8k_final_answer("#### -5 ") == "-5"
    assert gsm8k_final_answer("no marker 5") is None
    assert gsm8k_final_answer("####  ") is None


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"question": "1+1?", "answer": ', "invalid JSON"),
        (row(question="1+1?"), "missing field 'answer'"),
        (row(question="   ", answer="2"), "field 'question' is empty"),
        (row(question="1+1?", answer=""), "field 'answer' is empty"),
        (row(question=["1+1?"], answer="2"), "field 'question' is list, not text"),
        ("[1, 2]", "row is a JSON list, not an object"),
    ],
)
def test_bad_row_names_file_and_line(tmp_path, line, reason):
    path = write_lines(tmp_path / "bad.jsonl", [row(question="0?", answer="0"), line])
    with pytest.raises(DataError, match=re.escape(reason)) as err:
        load_jsonl(path)
    assert str(err.value).startswith(f"{path}:2: ")
    assert err.value.where == f"{path}:2"


def test_no_parsed_answer_is_a_bad_row(tmp_path):
    path = write_lines(tmp_path / "g.jsonl", [row(question="q", answer="steps without marker")])
    with pytest.raises(DataError, match=r"g.jsonl:1: no answer in field 'answer'"):
        load_jsonl(path, BENCHMARKS["gsm8k"])


def test_skip_invalid_skips_and_reports_count(tmp_path, caplog):
    good = [row(question=f"{i}?", answer=str(i)) for i in range(3)]
    bad = ["not json", row(question="", answer="1"), row(answer="1"), row(question="q", answer=2)]
    path = write_lines(tmp_path / "mixed.jsonl", [good[0], bad[0], good[1], *bad[1:], good[2]])
    with caplog.at_level(logging.WARNING):
        examples = load_jsonl(path, skip_invalid=True)
    assert [ex.question for ex in examples] == ["0?", "1?", "q", "2?"]
    assert examples[2].answer == "2"  # a number answer is text
    assert f"skipped 3 invalid rows of {path} (kept 4)" in caplog.text
    assert f"{path}:2: invalid JSON" in caplog.text


def test_over_long_rows(tmp_path, caplog):
    path = write_lines(
        tmp_path / "long.jsonl",
        [row(question="short?", answer="1"), row(question="x" * 50, answer="2")],
    )
    with pytest.raises(DataError, match=r"long.jsonl:2: over-long: 50 characters .* > 20"):
        load_jsonl(path, max_chars=20)
    with caplog.at_level(logging.WARNING):
        assert len(load_jsonl(path, max_chars=20, skip_invalid=True)) == 1
    assert "skipped 1 invalid rows" in caplog.text


def test_load_benchmark_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'gsm9k'"):
        load_benchmark("gsm9k", tmp_path)
    with pytest.raises(FileNotFoundError):
        load_benchmark("math500", tmp_path)


def test_load_hf_dataset_from_local_json(tmp_path):
    path = write_lines(
        tmp_path / "hf.jsonl",
        [row(problem="1+1?", answer="2", level=1), row(problem="2+2?", answer="4", level=2)],
    )
    fields = FieldMap(question="problem", answer="answer")
    examples = load_hf_dataset(
        "json", "train", fields, data_files=str(path), cache_dir=str(tmp_path / "cache")
    )
    assert [(ex.question, ex.answer, ex.meta) for ex in examples] == [
        ("1+1?", "2", {"level": 1}),
        ("2+2?", "4", {"level": 2}),
    ]
    assert examples[1].source == "json[train] row 1"
    with pytest.raises(DataError, match=r"json\[train\] row 0: missing field 'question'"):
        load_hf_dataset("json", "train", data_files=str(path), cache_dir=str(tmp_path / "cache"))


# --- GSM8K SFT traces ------------------------------------------------------------------


def test_gsm8k_sft_trace_other_template_and_errors():
    ex = MathExample("How many?", "6", "A = 2*3 = <<2*3=6>>6.\n#### 6", source="f:1")
    prompt, response = gsm8k_sft_trace(ex, template="question_only")
    assert prompt == "How many?"
    assert response == "<think> A = 2*3 = 6. </think> <answer> 6 </answer>"
    with pytest.raises(ValueError, match="f:1: a GSM8K SFT trace needs the solution"):
        gsm8k_sft_trace(MathExample("q", "6", source="f:1"))
    with pytest.raises(ValueError, match="without steps"):
        gsm8k_sft_trace(MathExample("q", "6", "#### 6"))

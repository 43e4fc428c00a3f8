"""The metrics, records and resumable store of ``jaxalign.evaluation``, against hand counts."""

import itertools
import json
import math

import pytest

from jaxalign import evaluation as ev
from jaxalign.data.datasets import MathExample

# --- pass@k ------------------------------------------------------------------------------


def test_pass_at_k_closed_form_by_hand():
    # 1 - C(n-c, k) / C(n, k)
    assert ev.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)
    assert ev.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert ev.pass_at_k(10, 0, 5) == 0.0
    assert ev.pass_at_k(4, 2, 3) == 1.0  # any 3 of 4 include one of the 2 correct
    assert ev.pass_at_k(200, 1, 100) == pytest.approx(0.5)


def test_pass_at_k_equals_the_fraction_of_k_subsets_with_a_correct_sample():
    """The estimator is exact over all k-subsets of the n samples (synthetic case)."""
    for n in range(1, 7):
        for c in range(n + 1):
            outcomes = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                want = sum(any(s) for s in subsets) / len(subsets)
                assert ev.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12), (n, c, k)


@pytest.mark.parametrize("n, c, k", [(3, 4, 1), (3, 1, 0), (3, 1, 4), (0, 0, 1)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k needs"):
        ev.pass_at_k(n, c, k)


def test_sample_ks():
    assert ev.sample_ks(1) == [1]
    assert ev.sample_ks(3) == [1, 2, 3]
    assert ev.sample_ks(8) == [1, 2, 4, 8]
    assert ev.sample_ks(12) == [1, 2, 4, 8, 12]


# --- majority vote -----------------------------------------------------------------------


def test_majority_vote():
    # the most common answer wins
    assert ev.majority_correct(["5", "7", "7"], [True, False, False]) is False
    assert ev.majority_correct(["5", "7", "5"], [True, False, True]) is True
    # a tie goes to the answer seen first
    assert ev.majority_correct(["5", "7"], [True, False]) is True
    assert ev.majority_correct(["7", "5"], [False, True]) is False
    # unformatted samples (None) do not vote, even when they are the most common
    assert ev.majority_correct([None, None, "5"], [False, False, True]) is True
    assert ev.majority_correct([None, None], [False, False]) is False
    # answers vote together after normalisation (\dfrac = \frac, $...$, spaces)
    assert ev.majority_correct(["\\frac{1}{2}", "$\\dfrac{1}{2}$", "3"],
                               [True, True, False]) is True


# --- Wilson interval ---------------------------------------------------------------------


def test_wilson_interval_known_values():
    lo, hi = ev.wilson_interval(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    lo, hi = ev.wilson_interval(3, 5)
    assert (round(lo, 4), round(hi, 4)) == (0.2307, 0.8824)
    assert ev.wilson_interval(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    assert ev.wilson_interval(10, 10) == (pytest.approx(0.7225, abs=1e-4), 1.0)
    assert all(math.isnan(x) for x in ev.wilson_interval(0, 0))
    with pytest.raises(ValueError):
        ev.wilson_interval(11, 10)


# --- records and summaries ---------------------------------------------------------------


def _record(index, sample, *, fmt, ans, extracted=None, length=10, finish="stop", **extra):
    return {"index": index, "sample": sample, "format_reward": float(fmt),
            "answer_reward": float(ans), "reward": float(ans), "extracted": extracted,
            "length": length, "finish_reason": finish, **extra}


def test_outcome_counts_and_reward_metrics_by_hand():
    records = [
        _record(0, 0, fmt=1, ans=1, length=10),
        _record(1, 0, fmt=1, ans=0, length=20),
        _record(2, 0, fmt=0, ans=0, length=30, finish="length"),
        _record(3, 0, fmt=0, ans=0, length=None, finish=None),  # unknown length and finish
    ]
    assert ev.outcome_counts(records) == {"format1_answer1": 1, "format1_answer0": 1,
                                          "format0": 2}
    m = ev.reward_metrics(records)
    assert m["answer_reward"] == 0.25 and m["format_reward"] == 0.5 and m["reward"] == 0.25
    assert m["response_length"] == 20.0  # (10 + 20 + 30) / 3: the unknown one is left out
    assert m["response_length_correct"] == 10.0
    assert m["response_length_incorrect"] == 25.0
    assert m["truncated_fraction"] == pytest.approx(1 / 3)  # of the 3 known finish reasons
    assert math.isnan(ev.reward_metrics([])["answer_reward"])


def test_summarize_several_samples_by_hand():
    """Two problems, three samples each: pass@k, maj@k, counts and CI computed by hand."""
    records = [
        # problem 0, gold 27: right, wrong, unformatted -> c = 1 of 3
        _record(0, 0, fmt=1, ans=1, extracted="27"),
        _record(0, 1, fmt=1, ans=0, extracted="30"),
        _record(0, 2, fmt=0, ans=0, extracted=None),
        # problem 1, gold 36: wrong, right, right -> c = 2 of 3; one grading timed out
        _record(1, 0, fmt=1, ans=0, extracted="10", timed_out=True),
        _record(1, 1, fmt=1, ans=1, extracted="36"),
        _record(1, 2, fmt=1, ans=1, extracted="36", finish="length"),
    ]
    s = ev.summarize(records[::-1])  # order must not matter
    assert (s["examples"], s["samples"], s["n"]) == (2, 6, 3)
    assert s["counts"] == {"format1_answer1": 3, "format1_answer0": 2, "format0": 1}
    assert sum(s["counts"].values()) == s["samples"]
    assert s["accuracy"] == 0.5 and s["answer_reward"] == 0.5
    assert s["format_rate"] == pytest.approx(5 / 6)
    # pass@1 = (1/3 + 2/3) / 2; pass@2 = (1 - C(2,2)/C(3,2) + 1) / 2; pass@3 = 1
    assert s["pass@k"] == {"1": pytest.approx(0.5), "2": pytest.approx(5 / 6), "3": 1.0}
    # maj@1: 27 right, 10 wrong; maj@2: 27 vs 30 tie -> 27, 10 vs 36 tie -> 10; maj@3: 27, 36
    assert s["maj@k"] == {"1": 0.5, "2": 0.5, "3": 1.0}
    assert (s["truncated"], s["timeouts"], s["grading_errors"]) == (1, 1, 0)
    # Wilson over the 2 problems with 1/3 + 2/3 = 1 success
    assert s["accuracy_ci95"] == list(ev.wilson_interval(1.0, 2))


def test_summarize_one_sample_uses_plain_wilson_and_no_pass_at_k():
    records = [_record(i, 0, fmt=1, ans=i < 3) for i in range(5)]
    s = ev.summarize(records)
    assert s["accuracy"] == 0.6
    assert s["accuracy_ci95"] == list(ev.wilson_interval(3, 5))
    assert "pass@k" not in s and "maj@k" not in s


# --- prompts, answers and scoring ----------------------------------------------------------


def test_build_prompt_and_extract_answer():
    assert ev.build_prompt("Q: {question}\nA:", "2+2?") == "Q: 2+2?\nA:"
    assert ev.build_prompt("r1_zero", "2+2?").endswith("User: 2+2?\nAssistant: <think>")
    with pytest.raises(ValueError, match="no \\{question\\} placeholder"):
        ev.build_prompt("Q: {q}", "2+2?")
    assert ev.extract_answer(" so </think> <answer> \\boxed{4} </answer>", "r1_zero") == "4"
    assert ev.extract_answer("4 </answer>", "r1_zero") is None
    assert ev.extract_answer("thus \\boxed{ 4 }.", "question_only") == "4"
    assert ev.extract_answer("thus \\boxed{}", "question_only") is None


def test_default_reward_and_stop():
    assert ev.default_reward("r1_zero") == "r1_zero"
    assert ev.default_reward("question_only") == ev.default_reward("chat") == "question_only"
    assert ev.default_stop("r1_zero", "r1_zero") == ("</answer>",)
    assert ev.default_stop("Q: {question} <think>", "r1_zero") == ("</answer>",)
    assert ev.default_stop("question_only", "question_only") == ()
    assert ev.default_stop("chat", "question_only") == ("<|im_end|>",)


def test_chat_prompt_needs_a_chat_template():
    from jaxalign.data.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        ev.build_prompt("chat", "2+2?", tok)
    tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    prompt = ev.build_prompt("chat", "2+2?", tok)
    assert prompt == f"<|system|>{ev.CHAT_SYSTEM}\n<|user|>2+2?\n<|assistant|>"


def test_score_responses_records():
    examples = [MathExample("q0", "18", id="a"), MathExample("q1", "27.0")]
    responses = [
        [ev.Response(" 9*2 </think> <answer> 18 </answer>", 7, "stop", 30)],
        [ev.Response(" </think> <answer> 27 </answer>", 5, "stop"),
         ev.Response(" 27", 64, "length")],
    ]
    records = ev.score_responses(examples, ["p0", "p1"], responses, reward="r1_zero",
                                 num_workers=0, indices=[4, 9])
    assert [(r["index"], r["sample"]) for r in records] == [(4, 0), (9, 0), (9, 1)]
    assert [r["answer_reward"] for r in records] == [1.0, 1.0, 0.0]
    assert [r["format_reward"] for r in records] == [1.0, 1.0, 0.0]
    assert [r["extracted"] for r in records] == ["18", "27", None]
    first = records[0]
    assert (first["id"], first["prompt"], first["ground_truth"]) == ("a", "p0", "18")
    assert (first["length"], first["prompt_length"], first["finish_reason"]) == (7, 30, "stop")
    assert first["timed_out"] is False
    with pytest.raises(ValueError, match="unknown reward"):
        ev.score_responses(examples, ["p0", "p1"], responses, reward="nope", num_workers=0)


# --- the store -----------------------------------------------------------------------------


def test_store_appends_reloads_and_knows_what_is_done(tmp_path):
    path = tmp_path / "s" / "x.jsonl"
    store = ev.SampleStore(path)
    assert len(store) == 0 and not path.exists()
    store.append([_record(0, 0, fmt=1, ans=1), _record(0, 1, fmt=1, ans=0),
                  _record(1, 0, fmt=0, ans=0)])
    again = ev.SampleStore(path)
    assert len(again) == 3 and (0, 1) in again
    assert again.done(2) == {0}  # problem 1 has one of its two samples
    assert again.done(1) == {0, 1}
    again.append([_record(1, 0, fmt=1, ans=1), _record(1, 1, fmt=1, ans=1)])  # replaces (1, 0)
    rows = ev.SampleStore(path).rows()
    assert [(r["index"], r["sample"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert rows[2]["answer_reward"] == 1.0  # the last line of a key wins
    assert [r["index"] for r in ev.SampleStore(path).rows([1])] == [1, 1]


def test_store_cuts_a_torn_last_line_and_rejects_a_bad_middle_line(tmp_path):
    path = tmp_path / "x.jsonl"
    ev.SampleStore(path).append([_record(0, 0, fmt=1, ans=1), _record(1, 0, fmt=1, ans=1)])
    whole = path.read_bytes()
    path.write_bytes(whole + json.dumps(_record(2, 0, fmt=1, ans=1)).encode()[:25])  # killed
    store = ev.SampleStore(path)
    assert store.done(1) == {0, 1}
    assert path.read_bytes() == whole  # the torn bytes are gone, so appends stay readable
    store.append([_record(2, 0, fmt=0, ans=0)])
    assert ev.SampleStore(path).done(1) == {0, 1, 2}

    path.write_text('{"index": 0, "sample": 0}\nnot json\n{"index": 1, "sample": 0}\n')
    with pytest.raises(ValueError, match="x.jsonl:2: not a sample record"):
        ev.SampleStore(path)

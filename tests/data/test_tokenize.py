"""tokenize_prompt_and_output / collate_prompt_and_output: CS336 layout, fixed widths, buckets,
the truncation policies, and the unhappy paths."""

import logging

import numpy as np
import pytest

from jaxalign.data.tokenize import (
    collate_prompt_and_output,
    fit_to_length,
    pick_bucket,
    tokenize_prompt_and_output,
)
from jaxalign.data.tokenizer import byte_tokenizer

PAD = 1
A, B, C, D, E, F = 70, 71, 72, 73, 74, 75  # byte-tokenizer ids of "a".."f"
ANSWER = 4  # "<answer>", one special token


@pytest.fixture(scope="module")
def tok():
    t = byte_tokenizer()
    assert t.convert_tokens_to_ids(list("abcdef") + ["<answer>"]) == [A, B, C, D, E, F, ANSWER]
    assert t.pad_token_id == PAD
    return t


def test_cs336_layout_hand_computed(tok):
    # Row 0: prompt "ab", output "de<answer>" -> a b | d e <answer>   (L = 5)
    # Row 1: prompt "c",  output "f"          -> c | f                (L = 2)
    # Width T = max L - 1 = 4; right-padded with PAD; labels are the next tokens.
    out = tokenize_prompt_and_output(["ab", "c"], ["de<answer>", "f"], tok)
    assert set(out) == {"input_ids", "labels", "response_mask"}
    np.testing.assert_array_equal(out["input_ids"], [[A, B, D, E], [C, F, PAD, PAD]])
    np.testing.assert_array_equal(out["labels"], [[B, D, E, ANSWER], [F, PAD, PAD, PAD]])
    np.testing.assert_array_equal(
        out["response_mask"], [[False, True, True, True], [True, False, False, False]]
    )
    assert out["input_ids"].dtype == np.int32 and out["labels"].dtype == np.int32
    assert out["response_mask"].dtype == bool


def test_prompt_and_output_are_tokenized_separately(tok):
    # "<answ" + "er>" tokenized jointly would merge into the <answer> token; separately it
    # must stay bytes, so the mask boundary is exact.
    out = tokenize_prompt_and_output(["<answ"], ["er>"], tok)
    np.testing.assert_array_equal(out["labels"][0], tok("<answer>"[1:])["input_ids"])
    np.testing.assert_array_equal(out["response_mask"][0], [0, 0, 0, 0, 1, 1, 1])


def test_fixed_width_pads_and_matches_unpadded(tok):
    loose = tokenize_prompt_and_output(["ab", "c"], ["de<answer>", "f"], tok)
    fixed = tokenize_prompt_and_output(["ab", "c"], ["de<answer>", "f"], tok, pad_to=7)
    for key in loose:
        assert fixed[key].shape == (2, 7)
        np.testing.assert_array_equal(fixed[key][:, :4], loose[key])
    # The wider input also holds each row's last token (loose drops it in the longest row).
    np.testing.assert_array_equal(fixed["input_ids"][:, 4:], [[ANSWER, PAD, PAD], [PAD] * 3])
    np.testing.assert_array_equal(fixed["labels"][:, 4:], PAD)
    assert not fixed["response_mask"][:, 4:].any()


def test_buckets_pick_smallest_width_that_fits():
    # A row of L tokens fits width T when L <= T + 1.
    assert pick_bucket(5, (4, 8)) == 4
    assert pick_bucket(6, (4, 8)) == 8
    assert pick_bucket(10, (4, 8)) is None
    prompts, outputs = [[A, B]], [[C, D, E]]  # L = 5
    assert collate_prompt_and_output(prompts, outputs, PAD, pad_to=(8, 4))["labels"].shape == (1, 4)
    prompts, outputs = [[A, B]], [[C, D, E, F]]  # L = 6
    assert collate_prompt_and_output(prompts, outputs, PAD, pad_to=(8, 4))["labels"].shape == (1, 8)


def test_ids_variant_does_not_retokenize(tok):
    # Sampled ids that spell "<answer>" byte by byte stay bytes (a re-tokenization would not).
    spelled = tok.convert_tokens_to_ids(list("<answer>"))
    out = collate_prompt_and_output([[A]], [spelled], PAD)
    np.testing.assert_array_equal(out["labels"][0], spelled)
    from_strings = tokenize_prompt_and_output(["ab", "c"], ["de<answer>", "f"], tok, pad_to=6)
    from_ids = collate_prompt_and_output(
        [[A, B], [C]], [[D, E, ANSWER], [F]], PAD, pad_to=(6,), truncate="error"
    )
    for key in from_strings:
        np.testing.assert_array_equal(from_ids[key], from_strings[key])


def test_truncate_error_names_rows():
    prompts, outputs = [[A], [A, B, C]], [[B], [D, E, F]]  # L = 2 and 6
    with pytest.raises(ValueError, match=r"1 of 2 rows longer than 5 tokens \(row 1: 6 tokens"):
        collate_prompt_and_output(prompts, outputs, PAD, pad_to=4)
    with pytest.raises(ValueError, match="row 1: 6 tokens"):  # "error" is the default
        collate_prompt_and_output(prompts, outputs, PAD, pad_to=(2, 4), truncate="error")


def test_truncate_right_keeps_the_first_tokens(caplog):
    prompts, outputs = [[A], [A, B, C]], [[B], [D, E, F]]
    with caplog.at_level(logging.WARNING):
        out = collate_prompt_and_output(prompts, outputs, PAD, pad_to=4, truncate="right")
    assert "truncated 1 of 2 rows" in caplog.text
    np.testing.assert_array_equal(out["input_ids"], [[A, B, PAD, PAD], [A, B, C, D]])
    np.testing.assert_array_equal(out["labels"], [[B, PAD, PAD, PAD], [B, C, D, E]])
    np.testing.assert_array_equal(out["response_mask"], [[1, 0, 0, 0], [0, 0, 1, 1]])


def test_truncate_right_prompt_longer_than_width_keeps_no_response(caplog):
    with caplog.at_level(logging.WARNING):
        out = collate_prompt_and_output([[A, B, C, D]], [[E]], PAD, pad_to=2, truncate="right")
    assert "keep no response token" in caplog.text
    np.testing.assert_array_equal(out["input_ids"], [[A, B]])
    assert not out["response_mask"].any()


def test_truncate_drop_reports_kept_rows(caplog):
    prompts, outputs = [[A, B, C], [A], [C]], [[D, E, F], [B], [D, E]]  # L = 6, 2, 3
    with caplog.at_level(logging.WARNING):
        out = collate_prompt_and_output(prompts, outputs, PAD, pad_to=(2, 4), truncate="drop")
    assert "dropped 1 of 3 rows" in caplog.text
    np.testing.assert_array_equal(out["row_index"], [1, 2])
    np.testing.assert_array_equal(out["input_ids"], [[A, B], [C, D]])  # width 2 fits L = 3
    np.testing.assert_array_equal(out["response_mask"], [[1, 0], [1, 1]])
    # The keys do not depend on whether anything was dropped.
    assert "row_index" in collate_prompt_and_output([[A]], [[B]], PAD, truncate="drop")


def test_fit_to_length_uses_names():
    with pytest.raises(ValueError, match=r"gsm8k/train.jsonl:7: 3 tokens"):
        fit_to_length([[A, B]], [[C]], 2, "error", names=["gsm8k/train.jsonl:7"])


def test_unhappy_arguments(tok):
    with pytest.raises(ValueError, match="2 prompts but 1 outputs"):
        tokenize_prompt_and_output(["a", "b"], ["c"], tok)
    with pytest.raises(ValueError, match="truncate must be one of"):
        collate_prompt_and_output([[A]], [[B]], PAD, pad_to=4, truncate="left")
    with pytest.raises(ValueError, match="pad_to must be"):
        collate_prompt_and_output([[A]], [[B]], PAD, pad_to=0)
    with pytest.raises(ValueError, match="pad_to must be"):
        collate_prompt_and_output([[A]], [[B]], PAD, pad_to=())
    with pytest.raises(ValueError, match="empty batch"):
        collate_prompt_and_output([], [], PAD)
    assert collate_prompt_and_output([], [], PAD, pad_to=4)["input_ids"].shape == (0, 4)
    no_pad = byte_tokenizer()
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        tokenize_prompt_and_output(["a"], ["b"], no_pad)

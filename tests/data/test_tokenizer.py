"""The locally built byte-level tokenizer round-trips text and reloads as a Qwen2 tokenizer."""

import transformers

from jaxalign.data.tokenizer import R1_TAGS, byte_tokenizer


def test_byte_tokenizer_round_trip_and_reload(tmp_path):
    tok = byte_tokenizer()
    text = "Q: 1,234 + 5?\n<think> steps é ∑ </think> <answer>42</answer>"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    for tag in R1_TAGS:  # each tag is a single token
        assert len(tok(tag)["input_ids"]) == 1
    assert tok.eos_token_id == 0 and tok.pad_token_id == 1
    tok.save_pretrained(tmp_path)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids
    assert len(again) == len(tok)

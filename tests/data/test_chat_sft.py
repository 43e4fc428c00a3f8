"""Chat templates in SFT data: one prompt function, end-of-turn tokens, s1-shaped rows,
the prompt masked out of the loss, and the row-cut report of the pipeline."""

import json

import pytest
import transformers
from chat_tokenizer import QWEN_DEFAULT_SYSTEM, with_chat_template

from jaxalign.data import datasets, pipeline, prompts
from jaxalign.data.datasets import DataError, MathExample
from jaxalign.data.prompts import ChatTemplateError
from jaxalign.data.tokenizer import byte_tokenizer
from jaxalign.verify import question_only_reward_fn


@pytest.fixture(scope="module")
def chat_tok(qwen2p5_math_tokenizer_dir, tmp_path_factory):
    """The Qwen2.5-Math tokenizer stand-in with Qwen2.5's chat template (eos <|endoftext|>)."""
    out = with_chat_template(qwen2p5_math_tokenizer_dir, tmp_path_factory.mktemp("chat_tok"))
    return transformers.AutoTokenizer.from_pretrained(out)


S1_ROWS = [
    {"question": "What is 2+3?", "thinking_trajectories": ["2 plus 3 is 5."],
     "attempt": "The answer is $\\boxed{5}$.", "cot_type": "math"},
    {"question": "What is 4*4?", "thinking_trajectories": ["4 times 4", "is 16."],
     "attempt": "Answer: 16"},
]
S1_FIELDS = "prompt=question,thinking=thinking_trajectories,response=attempt"


def test_chat_prompt_is_the_tokenizers_template_with_a_system_prompt(chat_tok):
    q = "What is $\\frac{1}{2}+1$?"
    want = chat_tok.apply_chat_template(
        [{"role": "system", "content": prompts.CHAT_SYSTEM}, {"role": "user", "content": q}],
        tokenize=False, add_generation_prompt=True)
    assert prompts.build_prompt("chat", q, chat_tok) == want
    assert want.endswith(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")
    mine = prompts.build_prompt("chat", q, chat_tok, system_prompt="Be brief.")
    assert mine.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    # '': no system message, so the template's own default applies (what s1 trained with)
    none = prompts.build_prompt("chat", q, chat_tok, system_prompt="")
    assert none.startswith(f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>")
    s1 = prompts.build_prompt("s1", q, chat_tok)
    assert s1 == none + "<|im_start|>think\n"
    # Plain templates need no tokenizer and are unchanged.
    assert prompts.build_prompt("r1_zero", q) == prompts.format_prompt("r1_zero", q)
    assert prompts.end_of_turn(chat_tok) == "<|im_end|>"
    text = prompts.as_template_text("s1", chat_tok)
    assert prompts.format_prompt(text, q) == s1


def test_chat_without_a_chat_template_is_a_clear_error(qwen2p5_math_tokenizer_dir):
    plain = transformers.AutoTokenizer.from_pretrained(qwen2p5_math_tokenizer_dir)
    for tok, why in ((byte_tokenizer(), "has none"), (plain, "has none"),
                     (None, "no tokenizer was given")):
        for template in ("chat", "s1"):
            with pytest.raises(ChatTemplateError, match=f"needs a tokenizer with a chat "
                               f"template .*{why}.*r1_zero"):
                prompts.build_prompt(template, "q", tok)
    with pytest.raises(ChatTemplateError):
        prompts.end_of_turn(byte_tokenizer())


def test_gsm8k_chat_trace_ends_its_turn_and_earns_the_boxed_reward(chat_tok):
    ex = MathExample("Tom has 2 bags of 3 apples. How many?", "6",
                     "Each bag has 3, so 2*3 = <<2*3=6>>6 apples.\n#### 6", source="g:1")
    prompt, response = datasets.gsm8k_sft_trace(ex, "chat", chat_tok)
    assert prompt == prompts.build_prompt("chat", ex.question, chat_tok)
    assert response == ("Each bag has 3, so 2*3 = 6 apples.\nThe final answer is "
                        "$\\boxed{6}$.<|im_end|>")
    assert question_only_reward_fn(response, "6")["reward"] == 1.0
    mine, _ = datasets.gsm8k_sft_trace(ex, "chat", chat_tok, system_prompt="")
    assert QWEN_DEFAULT_SYSTEM in mine
    r1_prompt, r1_response = datasets.gsm8k_sft_trace(ex)  # unchanged default
    assert r1_response == " Each bag has 3, so 2*3 = 6 apples. </think> <answer> 6 </answer>"
    with pytest.raises(ChatTemplateError):
        datasets.gsm8k_sft_trace(ex, "chat", byte_tokenizer())
    with pytest.raises(ValueError, match="s1"):
        datasets.gsm8k_sft_trace(ex, "s1", chat_tok)


def test_s1_rows_become_s1s_assistant_turn(tmp_path):
    path = tmp_path / "s1k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in S1_ROWS))
    pairs = datasets.load_sft_source(str(path), fields=S1_FIELDS)
    assert pairs[0] == ("What is 2+3?", "<|im_start|>think\n2 plus 3 is 5.\n<|im_start|>answer\n"
                                        "Answer: The answer is $\\boxed{5}$.")
    # a list of traces is joined by newlines (as s1 does); "Answer:" is not repeated
    assert pairs[1][1] == "<|im_start|>think\n4 times 4\nis 16.\n<|im_start|>answer\nAnswer: 16"
    # the same rows as a Hugging Face dataset folder (s1K is a Hub dataset)
    hf = pytest.importorskip("datasets")
    hf.Dataset.from_list(S1_ROWS).save_to_disk(str(tmp_path / "s1k"))
    assert datasets.load_sft_source(f"hf:{tmp_path / 's1k'}", fields=S1_FIELDS) == pairs
    datasets.check_sft_source(f"hf:{tmp_path / 's1k'}", fields=S1_FIELDS)
    # bad thinking fields are bad rows, named
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**S1_ROWS[0], "thinking_trajectories": []}) + "\n"
                   + json.dumps({**S1_ROWS[0], "thinking_trajectories": [1]}) + "\n")
    with pytest.raises(DataError, match=f"{bad}:1: field 'thinking_trajectories' is a list, "
                                        "but not a non-empty list of text"):
        datasets.load_sft_source(str(bad), fields=S1_FIELDS)
    with pytest.raises(DataError, match="no valid rows"):
        datasets.load_sft_source(str(bad), fields=S1_FIELDS, skip_invalid=True)
    with pytest.raises(ValueError, match=r"prompt=F,response=F\[,thinking=F\]"):
        datasets.parse_sft_field_names("prompt=question,thought=x")


def test_a_chat_turn_trains_on_the_response_only_and_ends_once(chat_tok, qwen3_tokenizer_dir,
                                                               tmp_path):
    """The prompt (system, user, assistant header) is masked; the loss covers s1's whole
    assistant turn through <|im_end|>; an EOS that is the end-of-turn is not appended twice."""
    prompt = prompts.build_prompt("chat", "What is 2+3?", chat_tok, system_prompt="")
    response = prompts.s1_response("2 plus 3 is 5.", "5") + prompts.end_of_turn(chat_tok)
    it = pipeline.make_sft_iterator([(prompt, response)], chat_tok, batch_size=1,
                                    seq_buckets=(128,), seed=0)
    batch = next(it)
    p_ids = chat_tok(prompt)["input_ids"]
    r_ids = chat_tok(response, add_special_tokens=False)["input_ids"] + [chat_tok.eos_token_id]
    mask, labels = batch["response_mask"][0], batch["labels"][0]
    # labels[t] is the token after input t: the response's tokens are the labels at
    # positions len(prompt)-1 .. len(prompt)+len(response)-2, and only those are in the loss.
    assert mask.sum() == len(r_ids)
    assert list(labels[mask]) == r_ids
    assert not mask[: len(p_ids) - 1].any()
    assert chat_tok.decode(labels[mask]).startswith("<|im_start|>think\n")
    # Qwen3's tokenizer: eos is <|im_end|>, which already ends the turn: not doubled.
    q3 = transformers.AutoTokenizer.from_pretrained(
        with_chat_template(qwen3_tokenizer_dir, tmp_path / "q3"))
    assert q3.eos_token == "<|im_end|>"
    it3 = pipeline.make_sft_iterator([(prompt, response)], q3, batch_size=1, seq_buckets=(128,),
                                     seed=0)
    b3 = next(it3)
    ended = b3["labels"][0][b3["response_mask"][0]]
    assert list(ended[-1:]) == [q3.eos_token_id] and ended[-2] != q3.eos_token_id


def test_rows_cut_per_width_is_reported_and_named_in_the_error(caplog):
    rows = [("Q" * 10, "A" * n) for n in (20, 60, 200)]  # byte tokenizer: 1 token a character
    tok = byte_tokenizer()
    lengths = [len(tok(p)["input_ids"]) + len(r) + 1 for p, r in rows]
    assert pipeline.rows_cut_per_width(lengths, (32, 64, 256)) == {32: 2, 64: 2, 256: 0}
    with caplog.at_level("INFO", logger="jaxalign.data.pipeline"):
        it = pipeline.make_sft_iterator(rows, tok, batch_size=1, seq_buckets=(32, 64, 256),
                                        seed=0)
    assert it.stats["rows_cut_per_width"] == {32: 2, 64: 2, 256: 0}
    assert it.stats["longest"] == max(lengths)
    assert "rows longer than each width: {32: 2, 64: 2, 256: 0}" in caplog.text
    with pytest.raises(ValueError, match=r"rows longer than each width: \{32: 2, 64: 2\}"):
        pipeline.make_sft_iterator(rows, tok, batch_size=1, seq_buckets=(32, 64), seed=0,
                                   truncate="error")

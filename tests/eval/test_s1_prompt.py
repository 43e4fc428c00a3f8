"""``eval/evaluate.py --prompt s1``: the chat template with s1's delimiters, and budget
forcing that ends thinking at ``<|im_start|>answer`` and extends it with ``Wait``; a
scripted engine and the real Qwen tokenizer given Qwen2.5's chat template."""

import json

import pytest
import transformers
from chat_tokenizer import QWEN_DEFAULT_SYSTEM, with_chat_template

from jaxalign.rollout import Completion
from jaxalign.rollout.budget import S1_DELIMITERS, BudgetForcing, generate_with_budget

THINK = "Add them: 2 + 3 = 5.\n"
ANSWER = " $\\boxed{5}$<|im_end|>"


class S1Engine:
    """Thinks ``THINK`` then ends thinking with ``<|im_start|>answer``; answers ``ANSWER``
    (or, unforced, writes the whole s1 turn). Records the prompts it is given, decoded."""

    weights_version = 0

    def __init__(self, tok):
        self.tok = tok
        self.calls = []

    def generate(self, prompts, params):
        decoded = [p if isinstance(p, str) else self.tok.decode(p) for p in prompts]
        self.calls.append((decoded, params))
        if params.stop == (S1_DELIMITERS["end_think"],):  # thinking, ended by the delimiter
            text, stop = THINK, S1_DELIMITERS["end_think"]
            ids = self.tok(THINK + stop, add_special_tokens=False)["input_ids"]
        elif decoded[0].endswith("Answer:"):  # the answer after a forced or natural end
            text, stop = ANSWER, "<|im_end|>"
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
        else:  # no budget forcing: the whole turn after <|im_start|>think\n
            text = THINK + "<|im_start|>answer\nAnswer:" + ANSWER
            stop, ids = "<|im_end|>", self.tok(text, add_special_tokens=False)["input_ids"]
        finish = "stop"
        if len(ids) > params.max_tokens:  # cut at the budget, as an engine would
            ids, stop, finish = ids[: params.max_tokens], None, "length"
            text = self.tok.decode(ids)
        return [[Completion(text, ids, None, finish, stop)] for _ in prompts]

    def update_weights(self, weights, version=None):
        return 0


@pytest.fixture(scope="module")
def chat_tok(qwen2p5_math_tokenizer_dir, tmp_path_factory):
    out = with_chat_template(qwen2p5_math_tokenizer_dir, tmp_path_factory.mktemp("chat_tok"))
    return transformers.AutoTokenizer.from_pretrained(out)


def test_budget_forcing_with_s1_delimiters(chat_tok):
    engine = S1Engine(chat_tok)
    from jaxalign.rollout import SamplingParams

    prompt = "P<|im_start|>assistant\n<|im_start|>think\n"
    params = SamplingParams(temperature=0, max_tokens=10, stop=("<|im_end|>",))
    budget = BudgetForcing(max_thinking_tokens=1000, num_waits=1, **S1_DELIMITERS)
    c = generate_with_budget(engine, chat_tok, [prompt], params, budget)[0][0]
    # a natural end is replaced by "Wait" once, then the answer section is forced open
    assert c.text == f"{THINK}Wait{THINK}\n<|im_start|>answer\nAnswer:{ANSWER}"
    assert engine.calls[-1][0][0] == prompt + f"{THINK}Wait{THINK}\n<|im_start|>answer\nAnswer:"
    # a budget spent on thinking forces the end at once
    short = BudgetForcing(max_thinking_tokens=3, num_waits=4, **S1_DELIMITERS)
    engine.calls.clear()
    c = generate_with_budget(engine, chat_tok, [prompt], params, short)[0][0]
    cut = chat_tok.decode(chat_tok(THINK, add_special_tokens=False)["input_ids"][:3])
    assert c.text == f"{cut}\n<|im_start|>answer\nAnswer:{ANSWER}"
    assert "Wait" not in c.text


def test_s1_prompt_and_budget_sweep_end_to_end(ev, tiny_dir, tmp_path, chat_tok, monkeypatch):
    engine = S1Engine(chat_tok)
    monkeypatch.setattr(ev, "build_engine", lambda cfg, source, out: (engine, chat_tok))
    bench = tmp_path / "add.jsonl"
    bench.write_text(json.dumps({"question": "What is 2+3?", "answer": "5"}) + "\n")
    common = ["--model", str(tiny_dir), "--benchmarks", str(bench), "--prompt", "s1",
              "--num-workers", "0", "--no-progress", "--no-plots"]
    out = tmp_path / "bf"
    summary = ev.run(ev.parse_args([*common, "--budget-forcing", "max_thinking=64,wait=0,1",
                                    "--out", str(out)]))
    assert summary["settings"]["prompt"] == "s1"
    assert summary["settings"]["reward"] == "s1"  # the answer section after <|im_start|>answer
    assert set(summary["results"]) == {"add@think64", "add@think64-wait1"}
    for name, result in summary["results"].items():
        assert result["accuracy"] == 1.0, name
        (row,) = [json.loads(line) for line in (out / "samples" / f"{name}.jsonl").open()]
        assert row["prompt"] == (f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n"
                                 "<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
                                 "<|im_start|>assistant\n<|im_start|>think\n")
        assert row["response"].endswith("\n<|im_start|>answer\nAnswer:" + ANSWER)
        assert ("Wait" in row["response"]) == name.endswith("wait1")
    # the answer phase stops at the end of the turn
    assert "<|im_end|>" in engine.calls[-1][1].stop
    # without budget forcing: one call per problem, the turn generated whole
    summary = ev.run(ev.parse_args([*common, "--out", str(tmp_path / "plain")]))
    assert summary["results"]["add"]["accuracy"] == 1.0
    assert engine.calls[-1][1].stop == ("<|im_end|>",)


def test_s1_prompt_needs_a_chat_template(ev, tiny_dir, tmp_path):
    """The tiny model's byte tokenizer has none: a one-line error before any generation."""
    bench = tmp_path / "add.jsonl"
    bench.write_text(json.dumps({"question": "What is 2+3?", "answer": "5"}) + "\n")
    with pytest.raises(ev.EvalError, match="--prompt s1: the 'chat' prompt needs a tokenizer "
                       "with a chat template"):
        ev.run(ev.parse_args(["--model", str(tiny_dir), "--benchmarks", str(bench), "--prompt",
                              "s1", "--engine", "jax", "--num-workers", "0", "--no-progress",
                              "--out", str(tmp_path / "o")]))

"""Budget forcing: thinking is capped by forcing the delimiter, extended by 'Wait'."""

from jaxalign.data.tokenizer import byte_tokenizer
from jaxalign.models import init_model, tiny
from jaxalign.rollout import Completion, JaxEngine, SamplingParams
from jaxalign.rollout.budget import BudgetForcing, generate_with_budget


def test_thinking_is_capped_with_the_jax_engine():
    tok = byte_tokenizer()
    engine = JaxEngine(init_model(tiny(vocab_size=len(tok)), seed=3), tok)
    forced = tok(" </think> <answer>", add_special_tokens=False)["input_ids"]
    prompt = "Q: 1+1? <think>"
    # Greedy: the outcome depends on the weights only, not on the sampler's random stream.
    params = SamplingParams(temperature=0.0, max_tokens=6, n=2, seed=1)
    free = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=5))[0][0]
    assert free.finish_reason == "length" and "</think>" not in free.text, "pick another seed"
    out = generate_with_budget(engine, tok, [prompt], params, BudgetForcing(max_thinking_tokens=5))
    assert len(out) == 1 and len(out[0]) == 2
    for c in out[0]:
        # These weights do not close </think> in 5 tokens: 5 sampled, then the forced end.
        assert c.token_ids[:5] == free.token_ids
        assert c.token_ids[5 : 5 + len(forced)] == forced
        assert len(c.token_ids) <= 5 + len(forced) + 6
        assert "</think> <answer>" in c.text
        assert c.prompt_token_ids == tok(prompt)["input_ids"]


class ScriptedEngine:
    """Ends every thinking call with '</think>' after 'abc'; answers 'x</answer>'."""

    weights_version = 0

    def __init__(self, tok):
        self.tok = tok
        self.calls = []

    def generate(self, prompts, params):
        self.calls.append([self.tok.decode(p) for p in prompts])
        out = []
        for _ in prompts:
            if params.stop == ("</think>",):
                ids = self.tok("abc</think>")["input_ids"]
                c = Completion("abc", ids, None, "stop", "</think>")
            else:
                ids = self.tok("x</answer>")["input_ids"]
                c = Completion("x</answer>", ids, None, "stop", "</answer>")
            out.append([c])
        return out

    def update_weights(self, weights, version=None):
        return 0


def _answer(engine, num_waits):
    """The one completion of prompt 'P<think>' with a 100-token budget."""
    params = SamplingParams(temperature=0, max_tokens=10, stop=("</answer>",))
    budget = BudgetForcing(max_thinking_tokens=100, num_waits=num_waits)
    return generate_with_budget(engine, engine.tok, ["P<think>"], params, budget)[0][0]


def test_waits_extend_thinking_then_force_the_end():
    tok = byte_tokenizer()
    engine = ScriptedEngine(tok)
    params = SamplingParams(temperature=0, max_tokens=10, stop=("</answer>",))
    c = _answer(engine, num_waits=2)
    assert c.text == "abc Waitabc Waitabc </think> <answer>x</answer>"
    assert len(engine.calls) == 4  # three thinking rounds, one answer
    assert engine.calls[-1][0] == "P<think>abc Waitabc Waitabc </think> <answer>"
    # Budget exhausted by the waits: the third round gets only what is left.
    engine2 = ScriptedEngine(tok)
    out2 = generate_with_budget(
        engine2,
        tok,
        ["P<think>"],
        params,
        BudgetForcing(max_thinking_tokens=len(tok("abc</think>")["input_ids"]), num_waits=5),
    )
    assert out2[0][0].text.count("Wait") == 1
    assert out2[0][0].text == "abc Wait </think> <answer>x</answer>"


class EosEngine(ScriptedEngine):
    """Thinking ends with the EOS token after 'ab'; answers 'x</answer>'."""

    def generate(self, prompts, params):
        self.calls.append([self.tok.decode(p) for p in prompts])
        if params.stop == ("</think>",):
            ids = self.tok("ab", add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            c = Completion("ab", ids, None, "stop", self.tok.eos_token_id)
        else:
            ids = self.tok("x</answer>")["input_ids"]
            c = Completion("x</answer>", ids, None, "stop", "</answer>")
        return [[c] for _ in prompts]


def test_an_eos_that_ends_thinking_is_not_fed_back():
    tok = byte_tokenizer()
    engine = EosEngine(tok)
    c = _answer(engine, num_waits=1)
    assert tok.eos_token_id not in c.token_ids
    assert c.text == "ab Waitab </think> <answer>x</answer>"
    assert engine.calls[-1][0] == "P<think>ab Waitab </think> <answer>"

"""Budget forcing (s1, "simple test-time scaling") on top of any rollout engine.

Thinking is capped at ``max_thinking_tokens`` by forcing the end-of-thinking delimiter,
and can be extended by suppressing the delimiter and appending "Wait" up to ``num_waits``
times. It is a loop over ``engine.generate`` calls with prompt continuation, so it works
with every backend. Continuations are built from token ids (the sampled ids are fed back
unchanged; only the forced strings are tokenized), and sampled ids outside the tokenizer's
vocabulary are dropped when re-fed: Qwen's embedding has more rows than its tokenizer.

Delimiters default to the r1_zero format (thinking ends with ``</think>``; a forced end
appends `` </think> <answer>``); for Qwen chat templates pass e.g. ``end_think="</think>"``
and ``force_end="\\n</think>\\n\\n"``; for s1-trained models (prompt ending in
``<|im_start|>think\\n``, ``eval/evaluate.py --prompt s1``) ``S1_DELIMITERS``:

    BudgetForcing(max_thinking_tokens=8192, num_waits=1, **S1_DELIMITERS)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jaxalign.rollout.types import Completion, Prompt, RolloutEngine, SamplingParams

# s1's delimiters (Muennighoff et al. 2025): thinking ends where the answer section opens; a
# forced end opens it and starts the answer line; a wait is appended as s1 does, bare.
S1_DELIMITERS = dict(
    end_think="<|im_start|>answer",
    force_end="\n<|im_start|>answer\nAnswer:",
    wait="Wait",
)


@dataclasses.dataclass(frozen=True)
class BudgetForcing:
    """Settings.

    Attributes:
        max_thinking_tokens: thinking tokens at most (sampled tokens before the forced end).
        num_waits: how many times a natural end of thinking is replaced by ``wait``.
        end_think: the string that ends thinking.
        force_end: appended to force the end of thinking (then the answer is sampled).
        wait: appended instead of ``end_think`` to extend thinking.
    """

    max_thinking_tokens: int
    num_waits: int = 0
    end_think: str = "</think>"
    force_end: str = " </think> <answer>"
    wait: str = " Wait"

    def __post_init__(self):
        if self.max_thinking_tokens < 0 or self.num_waits < 0:
            raise ValueError("max_thinking_tokens and num_waits must be >= 0")


def generate_with_budget(
    engine: RolloutEngine,
    tokenizer,
    prompts: Sequence[Prompt],
    params: SamplingParams,
    budget: BudgetForcing,
) -> list[list[Completion]]:
    """Like ``engine.generate``, with thinking capped (and optionally extended).

    ``params.max_tokens`` bounds the answer phase; ``params.stop`` applies to it (e.g.
    ``</answer>``). Returned completions hold every token after the prompt (sampled
    thinking, forced strings, sampled answer); ``logprobs`` is None because forced tokens
    were not sampled.
    """
    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    base = [encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    # n samples become separate rows with distinct seeds: each row's loop differs.
    rows = [_Row(prompt=i, context=list(base[i]), waits_left=budget.num_waits)
            for i in range(len(base)) for _ in range(params.n)]
    active, round_index = list(rows), 0
    while active:
        active = _think_round(engine, encode, len(tokenizer), active, params, budget,
                              seed=params.seed + 7919 * round_index)
        round_index += 1

    outs = engine.generate([r.context for r in rows],
                           dataclasses.replace(params, n=1, logprobs=False))
    results: list[list[Completion]] = [[] for _ in base]
    for r, (c,) in zip(rows, outs, strict=True):
        forced_and_thought = r.context[len(base[r.prompt]):]
        results[r.prompt].append(Completion(
            text=tokenizer.decode(forced_and_thought, skip_special_tokens=False) + c.text,
            token_ids=forced_and_thought + list(c.token_ids),
            logprobs=None,
            finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
            prompt_token_ids=list(base[r.prompt]),
            weights_version=c.weights_version,
        ))
    return results


@dataclasses.dataclass
class _Row:
    """One sample's state: its prompt's index, prompt + everything so far, thinking tokens
    sampled, waits still to append."""

    prompt: int
    context: list[int]
    waits_left: int
    thinking_used: int = 0


def _think_round(engine: RolloutEngine, encode, vocab: int, active: list[_Row],
                 params: SamplingParams, budget: BudgetForcing, seed: int) -> list[_Row]:
    """One round of thinking for the ``active`` rows; returns the rows that go on thinking
    (a natural end with a wait left: ``budget.wait`` appended). Every other row gets
    ``budget.force_end`` (its budget spent, or its thinking ended for good)."""
    for r in active:
        if r.thinking_used >= budget.max_thinking_tokens:
            r.context += encode(budget.force_end)
    stepping = [r for r in active if r.thinking_used < budget.max_thinking_tokens]
    next_active = []
    # One generate call per distinct remaining budget keeps max_tokens exact.
    for left in sorted({budget.max_thinking_tokens - r.thinking_used for r in stepping}):
        group = [r for r in stepping if budget.max_thinking_tokens - r.thinking_used == left]
        think = SamplingParams(
            n=1, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
            max_tokens=left, stop=(budget.end_think,), include_stop_str_in_output=False,
            seed=seed, logprobs=False,
        )
        outs = engine.generate([r.context for r in group], think)
        for r, (c,) in zip(group, outs, strict=True):
            ids = [t for t in c.token_ids if t < vocab]
            if c.stop_reason == budget.end_think:
                ids = encode(c.text)  # the stop string's token may be cut: re-encode text
            elif isinstance(c.stop_reason, int) and ids and ids[-1] == c.stop_reason:
                # An end-of-sequence token ended thinking: a natural end, like the
                # delimiter. It is not fed back (the continuation would follow an EOS).
                ids = ids[:-1]
            r.context += ids
            r.thinking_used += len(c.token_ids)
            if c.finish_reason == "stop" and r.waits_left > 0:
                r.waits_left -= 1
                r.context += encode(budget.wait)
                next_active.append(r)
            else:
                r.context += encode(budget.force_end)
    return next_active

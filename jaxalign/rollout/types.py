"""The rollout interface every engine implements: sampling parameters, completions, engines.

One set of semantics for all backends (the JAX sampler, the HTTP sidecar, vLLM), so a
training loop or ``eval/`` never cares which one produced a completion. Token ids are the
source of truth: they go in and come out unchanged, never re-tokenized, so training sees
exactly what was sampled.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal, Protocol

Prompt = str | Sequence[int]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample (names and meanings follow vLLM's ``SamplingParams``).

    Attributes:
        n: samples per prompt.
        temperature: 0 means greedy.
        top_p: nucleus sampling mass (1.0 disables).
        top_k: keep the k most likely tokens (0 or -1 disables).
        max_tokens: new tokens at most.
        min_tokens: EOS and stop strings are ignored before this many new tokens.
        stop: strings that end a completion when they appear in its text.
        include_stop_str_in_output: keep the stop string at the end of ``text``.
        stop_token_ids: extra token ids that end a completion (the engine adds EOS).
        seed: sampling is deterministic given the seed and the request.
        logprobs: return per-token log-probs of the sampled tokens (raw model
            distribution: no temperature, top-k or top-p applied).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0
    logprobs: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        problems = []
        if self.n < 1:
            problems.append(f"n={self.n} must be >= 1")
        if not 0 <= self.temperature < math.inf:  # NaN fails every comparison
            problems.append(f"temperature={self.temperature} must be finite and >= 0")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < -1:
            problems.append(f"top_k={self.top_k} must be -1, 0 (off) or positive")
        if self.max_tokens < 1:
            problems.append(f"max_tokens={self.max_tokens} must be >= 1")
        if not 0 <= self.min_tokens <= self.max_tokens:
            problems.append(f"min_tokens={self.min_tokens} must be in [0, max_tokens]")
        if any(not s for s in self.stop):
            problems.append("stop strings must be non-empty")
        if problems:
            raise ValueError("invalid SamplingParams: " + "; ".join(problems))


@dataclasses.dataclass
class Completion:
    """One sampled continuation.

    Attributes:
        text: the decoded continuation (cut at the stop string; EOS not included).
        token_ids: the sampled token ids, EOS included when it ended the completion; for a
            stop string, up to and including the token that completed it.
        logprobs: log-prob of each token in ``token_ids`` under the sampling model, or None.
        finish_reason: "stop" (EOS, stop token or stop string) or "length".
        stop_reason: the stop string or token id that ended it, else None.
        prompt_token_ids: the prompt as the engine saw it.
        weights_version: version of the weights that produced it.
    """

    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: Literal["stop", "length"]
    stop_reason: str | int | None = None
    prompt_token_ids: list[int] | None = None
    weights_version: int = 0


class RolloutEngine(Protocol):
    """What a training loop and ``eval/`` need from a generator."""

    weights_version: int

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[Completion]]:
        """Outer list per prompt, inner list of ``params.n`` completions."""
        ...

    def update_weights(self, weights, version: int | None = None) -> int:
        """Installs new policy weights; returns the new weights version."""
        ...

"""The verifier: format and answer rewards for training and evaluation. Never imports jax.

One module scores every response: SFT data filtering, Expert Iteration, GRPO rewards and
``eval/``. Equivalence is math-verify's (with sympy); the format rules, the fast path, the
time limits and the process pool are ours.

    from jaxalign.verify import r1_zero_reward_fn, score_batch

    r1_zero_reward_fn("... </think> <answer>\\frac{6}{4}</answer>", "\\frac32")
    # {'format_reward': 1.0, 'answer_reward': 1.0, 'reward': 1.0}
    rewards = score_batch(responses, ground_truths)            # a process pool, input order
    with ScoringPool(num_workers=4, timeout=3.0) as pool:      # or a pool you own
        rewards = pool.score(responses, ground_truths, question_only_reward_fn)

Modules:
    extract   the r1_zero format rule, ``\\boxed{}``, GSM8K and MMLU answer parsers
    grader    ``grade``: fast path, math-verify, string fallback, the time limit
    rewards   ``r1_zero_reward_fn``, ``question_only_reward_fn``; the reward spec a config
              names (``"r1_zero + 0.1*my_rewards:length_penalty"``), ``resolve_reward``
              into a picklable ``Reward``
    pool      ``ScoringPool``, ``score_batch``: worker processes with per-item deadlines
"""

from jaxalign.verify.extract import (
    END_OF_TEXT,
    answer_from_r1_zero,
    answer_from_s1,
    extract_boxed,
    parse_gsm8k_response,
    parse_mmlu_response,
    parse_r1_zero,
)
from jaxalign.verify.grader import (
    DEFAULT_TIMEOUT,
    GradingTimeout,
    grade,
    grade_with_status,
    normalize,
    warm_up,
)
from jaxalign.verify.pool import ScoringPool, score_batch, shared_pool
from jaxalign.verify.rewards import (
    REWARDS,
    Reward,
    RewardSpecError,
    parse_reward_spec,
    question_only_reward_fn,
    r1_zero_reward_fn,
    resolve_reward,
    s1_reward_fn,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "END_OF_TEXT",
    "GradingTimeout",
    "REWARDS",
    "Reward",
    "RewardSpecError",
    "ScoringPool",
    "answer_from_r1_zero",
    "answer_from_s1",
    "extract_boxed",
    "grade",
    "grade_with_status",
    "normalize",
    "parse_gsm8k_response",
    "parse_mmlu_response",
    "parse_r1_zero",
    "parse_reward_spec",
    "question_only_reward_fn",
    "r1_zero_reward_fn",
    "resolve_reward",
    "s1_reward_fn",
    "score_batch",
    "shared_pool",
    "warm_up",
]

"""Expert Iteration: sample, keep what the verifier accepts, fine-tune on it, repeat.

    python -m jaxalign.train --config configs/ei.py

For ``ei.n_ei_steps`` steps:

1. draw ``ei.questions_per_step`` training questions and sample ``ei.group_size`` (G)
   rollouts each with the current policy;
2. keep the rollouts with reward 1 (``ei.keep``: ``answer`` keeps answer-correct ones,
   ``reward`` needs format and answer), optionally without duplicate responses per
   question (``ei.dedupe``) and at most ``ei.max_per_question`` per question;
3. run ``ei.sft_epochs`` epochs of SFT on the kept rollouts' *token ids* (exactly what was
   sampled; never re-tokenized), in micro-batches of fixed shape;
4. push the weights to the engine, log the kept fraction, entropy and held-out accuracy.

"Verified" is ``data.reward``, resolved once (``PolicyRun.reward``): a registered verifier
reward, your own ``module:function`` or a weighted sum (``jaxalign.verify.rewards``; for a
reward of user functions alone, ``answer_reward`` is 1 where the reward is positive). Each
term of a composite or user reward is logged as ``train/reward/<term>``.

The policy is fine-tuned continuously (one optimizer across steps, constant learning rate
by default), as in CS336's expert-iteration experiment.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxalign import evaluation, optim
from jaxalign.algorithms import sft
from jaxalign.algorithms.driver import drive
from jaxalign.algorithms.policy_run import PolicyRun, validate_rollout_config
from jaxalign.config import check, check_micro_batch
from jaxalign.data import packing
from jaxalign.data.tokenize import collate_prompt_and_output
from jaxalign.optim import make_optimizer
from jaxalign.trainer import Trainer


def validate(cfg: ml_collections.ConfigDict) -> None:
    e = cfg.ei
    check(e.n_ei_steps >= 1, f"config.ei.n_ei_steps={e.n_ei_steps} must be >= 1")
    check(e.group_size >= 1, f"config.ei.group_size={e.group_size} must be >= 1")
    check(e.questions_per_step >= 1,
          f"config.ei.questions_per_step={e.questions_per_step} must be >= 1")
    check(e.sft_epochs >= 1, f"config.ei.sft_epochs={e.sft_epochs} must be >= 1")
    check(e.keep in ("answer", "reward"), f"config.ei.keep={e.keep!r}; choose answer or reward")
    check_micro_batch(cfg, "ei.batch_size", e.batch_size)
    validate_rollout_config(cfg)


def select_correct(
    questions_of_rows: Sequence[int],
    texts: Sequence[str],
    rewards: Sequence[float],
    *,
    dedupe: bool,
    max_per_question: int,
) -> list[int]:
    """Indices of the rollouts to keep: reward > 0, deduplicated and capped per question.

    Args:
        questions_of_rows: the question index of each rollout.
        texts: each rollout's response text (for ``dedupe``).
        rewards: each rollout's reward (kept when > 0).
        dedupe: keep one rollout per distinct response text of a question.
        max_per_question: at most this many per question (0: no cap).

    Returns:
        Kept indices, in input order.
    """
    kept, seen, count = [], set(), {}
    for i, (q, t, r) in enumerate(zip(questions_of_rows, texts, rewards, strict=True)):
        if r <= 0 or (dedupe and (q, t) in seen):
            continue
        if max_per_question and count.get(q, 0) >= max_per_question:
            continue
        seen.add((q, t))
        count[q] = count.get(q, 0) + 1
        kept.append(i)
    return kept


def sft_micro_batches(prompt_ids, response_ids, *, micro_batch: int, pad_id: int,
                      width_multiple: int, epochs: int, seed: int, packed: bool = False):
    """Fixed-shape micro-batches of (prompt, response) ids for ``epochs`` shuffled passes.

    The last micro-batch of an epoch is filled with all-masked rows (no loss, no gradient),
    so every micro-batch has ``micro_batch`` rows; the width is one multiple of
    ``width_multiple`` for the whole call. ``packed``: each row holds several sequences
    (first-fit in the shuffled order, ``jaxalign.data.packing``; ``segment_ids`` added),
    and ``micro_batch`` counts packed rows, as SFT's ``train.packing`` does.
    """
    n = len(prompt_ids)
    lengths = np.array([len(p) + len(r) for p, r in zip(prompt_ids, response_ids, strict=True)])
    width = -(-(lengths.max() - 1) // width_multiple) * width_multiple
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(n)
        if packed:
            rows = [[int(order[j]) for j in row] for row in packing.plan_rows(lengths[order],
                                                                              width)]
            for start in range(0, len(rows), micro_batch):
                part = rows[start:start + micro_batch]
                yield packing.collate_packed(prompt_ids, response_ids,
                                             part + [[]] * (micro_batch - len(part)),
                                             pad_id, width)
            continue
        for start in range(0, n, micro_batch):
            rows = order[start : start + micro_batch]
            batch = collate_prompt_and_output([prompt_ids[i] for i in rows],
                                              [response_ids[i] for i in rows], pad_id,
                                              pad_to=width)
            fill = micro_batch - len(rows)
            if fill:
                for k, v in batch.items():
                    pad = np.zeros((fill, width), v.dtype) if k == "response_mask" else np.full(
                        (fill, width), pad_id, v.dtype)
                    batch[k] = np.concatenate([v, pad])
            yield batch


class ExpertIteration(PolicyRun):
    """An Expert Iteration run: the shared policy/engine/data set-up plus SFT on the kept."""

    name, title, steps_key = "expert_iteration", "Expert Iteration", "ei_steps"

    def __init__(self, cfg: ml_collections.ConfigDict, run_dir: Path):
        e = cfg.ei
        super().__init__(cfg, run_dir, prompts_per_step=e.questions_per_step)
        self.steps = e.n_ei_steps
        # Optimizer steps are not known in advance (they depend on what is kept): the
        # schedule spans an upper bound, every rollout kept.
        upper = e.n_ei_steps * e.sft_epochs * -(-e.questions_per_step * e.group_size
                                                // e.batch_size)
        tx, self.schedule = make_optimizer(optim.optim_config(cfg.optim, upper))
        self.trainer = Trainer.create(self.policy, tx, sft.sft_loss_fn(cfg.train.loss_chunk_size),
                                      self.mesh, dropout_seed=cfg.seed)
        self.start_engine(self.trainer.model())

    def step(self, step: int) -> dict[str, float]:
        """Sample, keep the verified, fine-tune on their token ids, push the weights."""
        e = self.cfg.ei
        rollouts = self.rollout(step, e.group_size)
        completions, scores = rollouts.completions, rollouts.scores
        key = "answer_reward" if e.keep == "answer" else "reward"
        kept = select_correct([i // e.group_size for i in range(len(completions))],
                              [c.text for c in completions], [s[key] for s in scores],
                              dedupe=e.dedupe, max_per_question=e.max_per_question)
        metrics = {
            "train/reward": float(np.mean([s["reward"] for s in scores])),
            "train/answer_reward": float(np.mean([s["answer_reward"] for s in scores])),
            "train/format_reward": float(np.mean([s["format_reward"] for s in scores])),
            "train/kept_fraction": len(kept) / len(completions),
            "train/questions_solved": len({i // e.group_size for i in kept})
            / len(rollouts.questions),
            "train/response_length": float(np.mean([len(c.token_ids) for c in completions])),
            "time/rollout_s": sum(rollouts.times.values()),
            **{f"train/{k}": v for k, v in evaluation.component_means(scores).items()},
        }
        t1 = time.perf_counter()
        if kept:
            metrics.update(self.train_on([rollouts.prompt_ids[i] for i in kept],
                                         [completions[i].token_ids for i in kept], step))
            self.engine.update_weights(self.trainer.model())
        metrics["time/train_s"] = time.perf_counter() - t1
        return metrics

    def train_on(self, prompt_ids, response_ids, step: int) -> dict[str, float]:
        """``ei.sft_epochs`` epochs of SFT on the kept rows (the global batch, gathered)."""
        e, accum = self.cfg.ei, self.cfg.optim.grad_accum_steps
        batches = sft_micro_batches(
            prompt_ids, response_ids, micro_batch=e.batch_size // accum, pad_id=self.pad_id,
            width_multiple=self.cfg.train.width_multiple, epochs=e.sft_epochs,
            seed=self.cfg.seed * 7919 + step, packed=self.cfg.train.packing)
        # With accumulation, micro-batches beyond the last multiple of grad_accum_steps are
        # averaged into the next step's first update (optax.MultiSteps keeps them).
        results = jax.device_get([self.trainer.train_step(b, global_batch=True)
                                  for b in batches])
        return {**{f"train/{k}": float(np.mean([r[k] for r in results]))
                   for k in ("loss", "entropy", "grad_norm")},
                "train/sft_micro_steps": len(results)}

    def progress(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"kept": f"{metrics['train/kept_fraction']:.2f}"}

    def panels(self) -> list[tuple[str, list[str]]]:
        return [
            ("reward", ["train/answer_reward", *self.eval_curves(), "train/kept_fraction",
                        *[f"train/{k}" for k in self.reward.components]]),
            ("entropy", ["train/entropy"]),
            ("loss", ["train/loss"]),
        ]


def run(cfg: ml_collections.ConfigDict, run_dir: Path) -> dict[str, Any]:
    """Expert Iteration as configured; returns the summary (also in ``summary.json``)."""
    started = time.time()  # the set-up (model, data, warm start) counts in wall_time_s
    return drive(ExpertIteration(cfg, run_dir), started)

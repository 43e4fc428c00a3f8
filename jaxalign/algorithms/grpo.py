"""GRPO: group-relative policy optimisation with a verifier reward.

    python -m jaxalign.train --config configs/grpo.py        # the CPU demo (no flags)

One step, top to bottom (``GRPO.step``, the driver ``jaxalign.algorithms.driver`` runs the
loop around it)::

    questions -> engine.generate(n=group_size) -> verifier rewards -> group advantages
    -> rollout batch (static shapes) -> old log-probs (one forward, or the engine's)
    -> for each epoch, for each train batch: jitted train step (log-probs, ratio, clip,
       optional KL, aggregation, optax update with accumulation)
    -> push weights to the engine -> log

Departures from and options around the paper (DeepSeekMath; CS336 assignment 5 names):

* ``loss_type``: ``no_baseline``, ``reinforce_with_baseline`` (CS336's default),
  ``grpo_clip``, ``grpo_no_clip``; asymmetric clip (DAPO) with ``cliprange_low/high``.
* ``length_normalization``: ``masked_mean`` (per sequence, as GRPO), ``token_mean`` (DAPO)
  or ``masked_normalize`` by a constant (Dr. GRPO; default constant: ``max_tokens``).
* ``use_std_normalization`` off gives Dr. GRPO's mean-only advantages.
* KL to the frozen starting policy (k3 estimator) only when ``beta > 0`` (default 0).
* ``old_log_probs``: ``"trainer"`` recomputes them with one forward pass per rollout batch
  (exact for the trainer's numerics); ``"engine"`` takes the sampler's. Truncated
  importance sampling (``tis``) corrects for sampler/trainer mismatch; ``"auto"`` turns it on
  exactly when the old log-probs come from the engine. The mismatch itself is logged every
  step (``drift/logprob_diff_mean``, ``_max``): the first micro-batch's policy log-probs,
  before any update, against the engine's for the same tokens.
* Optional, off by default: ``filter_zero_std_groups`` (DAPO's dynamic-sampling filter:
  groups whose rewards are all equal give no advantage; their tokens are masked out so they
  do not dilute a token mean; with ``max_resample_rounds > 0``, DAPO's published form: more
  prompts are sampled, up to that many extra rounds, until the step's batch is full of
  informative groups, and only if it is still short are zero-std groups kept, masked),
  ``mask_truncated`` (completions that hit ``max_tokens`` get
  no gradient), ``overlong_penalty`` (DAPO's soft length penalty, linear over the last
  ``overlong_buffer`` tokens).
* The reward is ``data.reward``, resolved once (``PolicyRun.reward``): a registered
  verifier reward, your own ``module:function``, or a weighted sum of them
  (``"r1_zero + 0.1*my_rewards:length_penalty"``; ``jaxalign.verify.rewards``). Each term
  of a composite or user reward is logged as ``train/reward/<term>`` (unweighted).
* ``train.packing`` (off by default): several rollouts per row (``build_packed_rollout_batch``:
  segment ids keep attention within each, ``losses.sequence_token_weights`` keep every
  loss type and length normalisation equal to the unpacked batch's; rollouts without
  gradient are left out). ``train/fill`` logs the share of positions holding a token.
* Safety: ``frac_reward_zero_std`` is logged; mean token entropy under ``entropy_floor``
  warns (and with ``stop_on_collapse`` stops); so does format reward rising while answer
  reward falls (reward hacking the format).

The demo warm-starts a random tiny model with a short SFT on generated traces
(``warmstart.sft_steps``), then runs GRPO; ``summary.json`` holds the held-out answer
reward before and after GRPO.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxalign import evaluation, losses, optim, sharding
from jaxalign.algorithms.driver import Stopwatch, drive
from jaxalign.algorithms.policy_run import PolicyRun, Rollouts, validate_rollout_config
from jaxalign.config import check, check_micro_batch
from jaxalign.data import packing
from jaxalign.distributed import to_host
from jaxalign.optim import make_optimizer
from jaxalign.trainer import Trainer

logger = logging.getLogger(__name__)

RATIO_LOSSES = ("grpo_clip", "grpo_no_clip")

# --- config checks ----------------------------------------------------------------------


def validate(cfg: ml_collections.ConfigDict) -> None:
    """CS336's constraints and every option's range, before anything is built."""
    g = cfg.grpo
    check(g.n_grpo_steps >= 1, f"config.grpo.n_grpo_steps={g.n_grpo_steps} must be >= 1")
    check(g.group_size >= 1, f"config.grpo.group_size={g.group_size} must be >= 1")
    check(g.rollout_batch_size % g.group_size == 0,
          f"config.grpo.rollout_batch_size={g.rollout_batch_size} must be divisible by "
          f"config.grpo.group_size={g.group_size}")
    check(g.train_batch_size >= g.group_size,
          f"config.grpo.train_batch_size={g.train_batch_size} must be >= "
          f"config.grpo.group_size={g.group_size}")
    check(g.rollout_batch_size % g.train_batch_size == 0,
          f"config.grpo.rollout_batch_size={g.rollout_batch_size} must be a multiple of "
          f"config.grpo.train_batch_size={g.train_batch_size}")
    check_micro_batch(cfg, "grpo.train_batch_size", g.train_batch_size)
    check(g.epochs_per_rollout_batch >= 1,
          f"config.grpo.epochs_per_rollout_batch={g.epochs_per_rollout_batch} must be >= 1")
    check(g.loss_type in losses.LOSS_TYPES,
          f"config.grpo.loss_type={g.loss_type!r}; choose one of {losses.LOSS_TYPES}")
    check(g.length_normalization in losses.LENGTH_NORMALIZATIONS,
          f"config.grpo.length_normalization={g.length_normalization!r}; choose one of "
          f"{losses.LENGTH_NORMALIZATIONS}")
    check(g.old_log_probs in ("trainer", "engine"),
          f"config.grpo.old_log_probs={g.old_log_probs!r}; choose 'trainer' or 'engine'")
    check(g.tis in ("auto", "on", "off"), f"config.grpo.tis={g.tis!r}; choose auto, on or off")
    check(g.use_std_normalization is False or g.group_size >= 2,
          "config.grpo.use_std_normalization needs group_size >= 2 (the std of one sample "
          "is undefined); raise group_size or turn the std normalisation off")
    check(g.beta >= 0, f"config.grpo.beta={g.beta} must be >= 0")
    if g.loss_type == "grpo_clip":
        check(g.cliprange > 0 or (g.cliprange_low > 0 and g.cliprange_high > 0),
              "loss_type='grpo_clip' needs config.grpo.cliprange > 0 (or both "
              "cliprange_low and cliprange_high)")
    validate_rollout_config(cfg)
    check(g.max_resample_rounds >= 0 and (g.max_resample_rounds == 0
                                           or g.filter_zero_std_groups),
          f"config.grpo.max_resample_rounds={g.max_resample_rounds}: must be >= 0, and > 0 "
          "only with grpo.filter_zero_std_groups=True (it refills the groups that filter drops)")
    check(0 <= g.overlong_buffer < cfg.sampling.max_tokens,
          f"config.grpo.overlong_buffer={g.overlong_buffer} must be in "
          "[0, sampling.max_tokens)")


# --- data -----------------------------------------------------------------------------


def build_rollout_batch(
    prompt_ids: Sequence[Sequence[int]],
    completions: Sequence[Any],
    advantages: np.ndarray,
    raw_rewards: np.ndarray,
    *,
    pad_id: int,
    width: int,
    row_mask: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Rollouts -> the arrays a train step takes, with a static width.

    Row ``i`` is ``prompt_ids[i] + completions[i].token_ids`` (the sampled ids as they are,
    never re-tokenized), right-padded; ``labels`` are the inputs shifted by one and the
    mask covers exactly the completion's tokens. The engine's per-token log-probs land at
    the same positions as the labels they score.

    Args:
        prompt_ids: N prompts as token ids.
        completions: N ``Completion`` (``token_ids``, ``logprobs``).
        advantages, raw_rewards: ``[N]``.
        pad_id: padding id.
        width: T; every row must fit (``len(prompt) + len(completion) <= T + 1``).
        row_mask: optional ``[N]`` bool; False rows keep their tokens but get an all-zero
            response mask (no gradient), e.g. filtered groups or truncated completions.

    Returns:
        ``input_ids``, ``labels`` ``[N, T]`` int32; ``response_mask`` ``[N, T]`` bool;
        ``sampler_log_probs`` ``[N, T]`` float32 (0 outside the mask); ``advantages``,
        ``raw_rewards`` ``[N, 1]`` float32.
    """
    n = len(completions)
    full = np.full((n, width + 1), pad_id, np.int32)
    is_response = np.zeros((n, width + 1), bool)
    sampler = np.zeros((n, width + 1), np.float32)
    for r, (p, c) in enumerate(zip(prompt_ids, completions, strict=True)):
        toks = list(c.token_ids)
        if len(p) + len(toks) > width + 1:
            raise ValueError(f"rollout {r}: {len(p)} + {len(toks)} tokens exceed width {width}+1")
        full[r, : len(p) + len(toks)] = list(p) + toks
        is_response[r, len(p) : len(p) + len(toks)] = True
        if c.logprobs is not None:
            sampler[r, len(p) : len(p) + len(toks)] = c.logprobs
    if row_mask is not None:
        is_response &= np.asarray(row_mask, bool)[:, None]
    return {
        "input_ids": np.ascontiguousarray(full[:, :-1]),
        "labels": np.ascontiguousarray(full[:, 1:]),
        "response_mask": np.ascontiguousarray(is_response[:, 1:]),
        "sampler_log_probs": np.ascontiguousarray(sampler[:, 1:]),
        "advantages": np.asarray(advantages, np.float32).reshape(n, 1),
        "raw_rewards": np.asarray(raw_rewards, np.float32).reshape(n, 1),
    }


def build_packed_rollout_batch(
    prompt_ids: Sequence[Sequence[int]],
    completions: Sequence[Any],
    advantages: np.ndarray,
    raw_rewards: np.ndarray,
    *,
    pad_id: int,
    width: int,
    row_mask: np.ndarray,
    optimizer_steps: int,
    micro_batches: int,
    row_multiple: int,
    length_normalization: str,
    normalize_constant: float | None = None,
) -> dict[str, np.ndarray]:
    """Rollouts -> packed rows (several rollouts per row), static shapes, the same loss.

    The N rollouts are cut into ``optimizer_steps`` consecutive chunks (one optimizer step's
    train batch each, as unpacked); each chunk's rollouts with gradient are packed first-fit
    (``packing.plan_rows``) into rows of ``width`` positions and spread over its
    ``micro_batches`` micro-batches of P rows each. P is the same for every micro-batch
    (``row_bucket``: few shapes, a multiple of ``row_multiple``, the data-parallel devices),
    and never more than the unpacked micro-batch's rows. Rollouts without gradient
    (``row_mask`` False: filtered groups, masked truncations) are left out: unpacked they
    cost a full row for nothing; they still count in their step's sequence count.

    Per token, ``advantages``/``raw_rewards`` are their sequence's and ``token_weights``
    (``losses.sequence_token_weights``) make the summed loss equal the unpacked one.

    Returns:
        ``build_rollout_batch``'s arrays with rows ``[optimizer_steps * micro_batches * P]``
        (``advantages``, ``raw_rewards`` per token ``[R, T]``), plus ``segment_ids``
        ``[R, T]`` int32 and ``token_weights`` ``[R, T]`` float32.
    """
    n = len(completions)
    row_mask = np.asarray(row_mask, bool)
    advantages = np.asarray(advantages, np.float32).reshape(n)
    raw_rewards = np.asarray(raw_rewards, np.float32).reshape(n)
    lengths = np.array([len(p) + len(c.token_ids) for p, c in zip(prompt_ids, completions,
                                                                    strict=True)])
    response = np.array([len(c.token_ids) for c in completions]) * row_mask
    chunk = n // optimizer_steps
    plans, weights = [], np.zeros(n, np.float32)
    for start in range(0, n, chunk):
        kept = [i for i in range(start, start + chunk) if row_mask[i]]
        rows = [[kept[j] for j in row] for row in packing.plan_rows(lengths[kept], width)]
        parts = np.array_split(np.arange(len(rows)), micro_batches)  # sizes differ by <= 1
        plans.append([[rows[r] for r in part] for part in parts])
        weights[start:start + chunk] = losses.sequence_token_weights(
            response[start:start + chunk], length_normalization, micro_batches,
            normalize_constant)
    most = max(len(part) for plan in plans for part in plan)
    per_micro = row_bucket(most, row_multiple, cap=max(chunk // micro_batches, row_multiple))
    rows = [row for plan in plans for part in plan
            for row in part + [[]] * (per_micro - len(part))]
    completion_ids = [c.token_ids for c in completions]
    batch = packing.collate_packed(prompt_ids, completion_ids, rows, pad_id, width)
    seq = np.full(batch["segment_ids"].shape, -1, np.int64)  # the rollout at each position
    sampler = np.zeros(seq.shape, np.float32)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            end = at + lengths[i] - 1
            seq[r, at:end] = i
            if completions[i].logprobs is not None:
                sampler[r, end - len(completion_ids[i]):end] = completions[i].logprobs
            at = end
    some = seq >= 0
    batch["response_mask"] &= some  # (padding is never a response; kept explicit)
    batch.update(
        sampler_log_probs=sampler,
        advantages=np.where(some, advantages[seq], 0.0).astype(np.float32),
        raw_rewards=np.where(some, raw_rewards[seq], 0.0).astype(np.float32),
        token_weights=np.where(batch["response_mask"], weights[seq], 0.0).astype(np.float32),
    )
    return batch


def row_bucket(rows: int, multiple: int, cap: int) -> int:
    """The fewest of ``multiple * {1, 2, 3, 4, 6, 8, 12, ...}`` rows (steps of at most 1.5x:
    few compiled shapes, at most a third of the rows empty) that hold ``rows``, at most
    ``cap`` (itself a multiple of ``multiple``)."""
    need = max(-(-rows // multiple), 1)
    size = 1
    while size < need:
        # 1, 2, 3, 4, 6, 8, 12, 16, ...: a power of two grows by 1.5x, its 1.5x by 4/3
        size = 2 if size == 1 else size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return min(size * multiple, cap)


def overlong_penalty(lengths: np.ndarray, max_tokens: int, buffer: int, coef: float) -> np.ndarray:
    """DAPO's soft overlong penalty ``[N]``: 0 up to ``max_tokens - buffer``, then linear to
    ``-coef`` at ``max_tokens``."""
    if buffer <= 0 or coef == 0:
        return np.zeros(len(lengths), np.float32)
    start = max_tokens - buffer
    return (-coef * np.clip((np.asarray(lengths) - start) / buffer, 0, 1)).astype(np.float32)


def zero_std_groups(raw_rewards: np.ndarray, group_size: int) -> np.ndarray:
    """``[N]`` True where the row's group has all-equal rewards (no GRPO signal)."""
    grouped = np.asarray(raw_rewards).reshape(-1, group_size)
    same = grouped.max(axis=1) == grouped.min(axis=1)
    return np.repeat(same, group_size)


def bucket_width(longest: int, multiple: int) -> int:
    """Static width T for rows of up to ``longest`` tokens: the next multiple of ``multiple``.

    Never capped at the step's longest prompt + ``max_tokens``: that cap moves with every
    step's prompts, so under a real tokenizer almost every step got its own width and the
    train step recompiled each time (8 steps, 8 widths on GSM8K; tests/test_real_recipe.py).
    """
    need = max(longest - 1, 1)
    return -(-need // multiple) * multiple


# --- the loss ---------------------------------------------------------------------------


def grpo_loss_fn(g: ml_collections.ConfigDict, *, use_old: bool, use_tis: bool,
                 normalize_constant: float, chunk_size: int = 0):
    """``loss_fn(model, batch) -> (loss, metrics)`` for the GRPO train step.

    ``batch`` holds ``build_rollout_batch``'s arrays (or ``build_packed_rollout_batch``'s,
    with ``segment_ids`` and ``token_weights``), plus ``old_log_probs`` when ``use_old`` and
    ``ref_log_probs`` when ``g.beta > 0``.
    """
    cliprange = g.cliprange if g.cliprange > 0 else None
    low = g.cliprange_low if g.cliprange_low > 0 else None
    high = g.cliprange_high if g.cliprange_high > 0 else None

    def loss_fn(model, batch):
        out = losses.policy_log_probs(model, batch["input_ids"], batch["labels"],
                                      chunk_size=chunk_size, entropy=True,
                                      segment_ids=batch.get("segment_ids"))
        logp, mask = out["log_probs"], batch["response_mask"]
        loss, meta = losses.grpo_microbatch_loss(
            logp, mask, 1, g.loss_type,
            raw_rewards=batch["raw_rewards"], advantages=batch["advantages"],
            old_log_probs=batch["old_log_probs"] if use_old else None,
            cliprange=cliprange, cliprange_low=low, cliprange_high=high,
            length_normalization=g.length_normalization,
            normalize_constant=normalize_constant,
            ref_log_probs=batch.get("ref_log_probs"), beta=g.beta,
            tis_log_probs=batch["sampler_log_probs"] if use_tis else None, tis_cap=g.tis_cap,
            token_weights=batch.get("token_weights"),  # packed rows
        )
        diff = jnp.abs(jax.lax.stop_gradient(logp) - batch["sampler_log_probs"])
        meta["entropy"] = losses.masked_mean(out["token_entropy"], mask)
        meta["logprob_diff_mean"] = losses.masked_mean(diff, mask)
        meta["logprob_diff_max"] = jnp.max(jnp.where(mask, diff, 0.0))
        return loss, meta

    return loss_fn


def make_log_prob_fn(graphdef, chunk_size: int = 0, mesh=None):
    """Jitted ``(states, input_ids, labels, segment_ids=None) -> log_probs [B, T]`` (old and
    reference) of the model ``nnx.merge(graphdef, *states)`` (``Trainer.states()`` or
    ``Trainer.reference()``: under LoRA the adapters and the frozen base), traced on
    ``mesh`` like the train step (activations sharded by batch)."""

    def fn(states, input_ids, labels, segment_ids=None):
        model = nnx.merge(graphdef, *states)
        return losses.policy_log_probs(model, input_ids, labels, chunk_size=chunk_size,
                                       segment_ids=segment_ids)["log_probs"]

    return jax.jit(sharding.traced_on(mesh, fn))


def micro_batches(batch: dict[str, np.ndarray], size: int):
    """Consecutive row slices of ``size`` (groups stay together when size >= group_size)."""
    n = len(next(iter(batch.values())))
    for start in range(0, n, size):
        yield {k: v[start : start + size] for k, v in batch.items()}


# --- the loop -------------------------------------------------------------------------


class GRPO(PolicyRun):
    """A GRPO run: the shared policy/engine/data set-up plus the GRPO trainer and step."""

    name, title, steps_key = "grpo", "GRPO", "grpo_steps"

    def __init__(self, cfg: ml_collections.ConfigDict, run_dir: Path):
        g = cfg.grpo
        super().__init__(cfg, run_dir, prompts_per_step=g.rollout_batch_size // g.group_size)
        self.steps = g.n_grpo_steps
        steps_per_rollout = g.epochs_per_rollout_batch * (g.rollout_batch_size
                                                          // g.train_batch_size)
        tx, self.schedule = make_optimizer(
            optim.optim_config(cfg.optim, g.n_grpo_steps * steps_per_rollout))
        self.use_old = g.loss_type in RATIO_LOSSES
        tis = g.old_log_probs == "engine" if g.tis == "auto" else g.tis == "on"
        # With old log-probs from the engine, a ratio loss already divides by the sampler's
        # probability: TIS would be a second, redundant correction.
        self.use_tis = tis and not (g.old_log_probs == "engine" and self.use_old)
        self.normalize_constant = g.normalize_constant or cfg.sampling.max_tokens
        # packed micro-batches split evenly over the processes and data-parallel devices
        self.data_parallel = math.lcm(jax.process_count(), 1 if self.mesh is None else
                                      self.mesh.shape["data"] * self.mesh.shape["fsdp"])
        self.trainer = Trainer.create(
            self.policy, tx,
            grpo_loss_fn(g, use_old=self.use_old, use_tis=self.use_tis,
                         normalize_constant=self.normalize_constant,
                         chunk_size=cfg.train.loss_chunk_size),
            self.mesh, dropout_seed=cfg.seed,
        )
        self.log_prob_fn = make_log_prob_fn(self.trainer.graphdef, cfg.train.loss_chunk_size,
                                            self.mesh)
        self.ref_params = None
        if g.beta > 0:  # the frozen starting policy: a copy (the trainer donates its
            # buffers); under LoRA of the adapters only, over the shared frozen base
            self.ref_params = self.trainer.reference()
        self.start_engine(self.trainer.model())
        self.history: list[dict[str, float]] = []

    def step(self, step: int) -> dict[str, float]:
        """One GRPO step: rollouts -> rewards -> advantages -> updates -> new weights."""
        clock = Stopwatch()
        rollouts, metrics = self.rollout_informative(step)  # sampled and scored
        clock.lap("rollout_s")
        batch, batch_metrics = self.make_batch(rollouts)  # advantages, static-shape rows
        clock.lap("batch_s")
        self.add_old_log_probs(batch)  # one forward before any update (and the reference)
        clock.lap("old_log_probs_s")
        metrics.update(batch_metrics)
        metrics.update(self.train_on(batch))  # epochs x micro-batches of optimizer steps
        clock.lap("train_s")
        # the sampler gets the new policy (under LoRA, the adapters merged in)
        self.engine.update_weights(self.trainer.model())
        clock.lap("weight_sync_s")
        return {**metrics, **self.timing(rollouts, batch, clock)}

    def rollout_informative(self, step: int) -> tuple[Rollouts, dict[str, float]]:
        """``rollout(step, group_size)``, refilled by DAPO's dynamic sampling when
        ``filter_zero_std_groups`` and ``max_resample_rounds > 0``: groups whose shaped
        rewards are all equal are replaced by groups of further prompts (each round seeded
        apart) until the step holds as many informative groups as it has groups, or the
        rounds run out; then zero-std groups fill the rest (``make_batch`` masks them).
        Static shapes: always ``rollout_batch_size`` rows. Returns the rollouts (their times
        summed over the rounds) and the resampling metrics."""
        g = self.cfg.grpo
        rollouts = self.rollout(step, g.group_size)
        if not (g.filter_zero_std_groups and g.max_resample_rounds):
            return rollouts, {}
        needed = len(rollouts.questions)
        informative: list[Rollouts] = []
        flat: list[Rollouts] = []
        rounds, times = 0, dict(rollouts.times)
        while True:
            same = zero_std_groups(self._shaped_rewards(rollouts), g.group_size)[::g.group_size]
            for group, is_flat in zip(rollouts.groups(), same, strict=True):
                (flat if is_flat else informative).append(group)
            if len(informative) >= needed or rounds == g.max_resample_rounds:
                break
            rounds += 1
            rollouts = self.rollout(step, g.group_size, attempt=rounds)
            times = {k: v + rollouts.times[k] for k, v in times.items()}
        # train/frac_reward_zero_std (make_batch) describes the batch trained on; this, every
        # group sampled for it (how often the policy's groups carry no signal).
        metrics = {"train/resample_rounds": rounds,
                   "train/informative_groups": min(len(informative), needed) / needed,
                   "train/zero_std_groups_sampled": len(flat) / (len(flat) + len(informative))}
        return Rollouts.concat((informative + flat)[:needed], times), metrics

    def _shaped_rewards(self, rollouts: Rollouts) -> np.ndarray:
        """``[N]`` rewards as the advantages see them: the verifier's plus the overlong
        penalty."""
        g, s = self.cfg.grpo, self.cfg.sampling
        lengths = np.array([len(c.token_ids) for c in rollouts.completions])
        penalty = overlong_penalty(lengths, s.max_tokens, g.overlong_buffer, g.overlong_penalty)
        return np.array([sc["reward"] for sc in rollouts.scores], np.float32) + penalty

    def make_batch(self, rollouts: Rollouts) -> tuple[dict, dict]:
        """Advantages and the static-shape rollout batch, with their metrics."""
        g = self.cfg.grpo
        completions, scores = rollouts.completions, rollouts.scores
        lengths = np.array([len(c.token_ids) for c in completions])
        truncated = np.array([c.finish_reason == "length" for c in completions])
        raw = self._shaped_rewards(rollouts)
        advantages, meta = losses.group_advantages(raw, g.group_size, g.advantage_eps,
                                                   g.use_std_normalization)
        keep = np.ones(len(completions), bool)
        if g.filter_zero_std_groups:
            keep &= ~zero_std_groups(raw, g.group_size)
        if g.mask_truncated:
            keep &= ~truncated
        prompt_ids = rollouts.prompt_ids
        longest = max(len(p) + len(c.token_ids) for p, c in zip(prompt_ids, completions,
                                                                  strict=True))
        width = bucket_width(longest, self.cfg.train.width_multiple)
        if self.cfg.train.packing:
            batch = build_packed_rollout_batch(
                prompt_ids, completions, advantages, raw, pad_id=self.pad_id, width=width,
                row_mask=keep, optimizer_steps=g.rollout_batch_size // g.train_batch_size,
                micro_batches=self.cfg.optim.grad_accum_steps,
                row_multiple=self.data_parallel, length_normalization=g.length_normalization,
                normalize_constant=self.normalize_constant)
        else:
            batch = build_rollout_batch(prompt_ids, completions, advantages, raw,
                                        pad_id=self.pad_id, width=width, row_mask=keep)
        answer = np.array([sc["answer_reward"] for sc in scores])
        metrics = {
            "train/reward": meta["reward_mean"],
            "train/answer_reward": float(answer.mean()),
            "train/format_reward": float(np.mean([sc["format_reward"] for sc in scores]))
            if all("format_reward" in sc for sc in scores) else float("nan"),
            "train/frac_reward_zero_std": meta["frac_reward_zero_std"],
            "train/response_length": float(lengths.mean()),
            "train/response_length_correct": float(lengths[answer > 0].mean())
            if (answer > 0).any() else float("nan"),
            "train/response_length_incorrect": float(lengths[answer <= 0].mean())
            if (answer <= 0).any() else float("nan"),
            "train/truncated_fraction": float(truncated.mean()),
            "train/rows_with_gradient": float(keep.mean()),
            "train/width": width,
            "train/rows": len(batch["input_ids"]),
            # positions holding a token of a rollout with gradient (the rest is padding)
            "train/fill": float(sum(len(p) + len(c.token_ids) - 1 for p, c, k in zip(
                prompt_ids, completions, keep, strict=True) if k) / batch["labels"].size),
        }
        # a composite or user reward's terms, unweighted (before the overlong penalty)
        metrics.update({f"train/{k}": v for k, v in evaluation.component_means(scores).items()})
        return batch, metrics

    def micro_rows(self, batch: dict) -> int:
        """Rows per micro-batch: ``train_batch_size / grad_accum_steps`` rollouts, or the
        packed rows that hold them (the batch has one optimizer step's micro-batches per
        ``train_batch_size`` rollouts, whichever the layout)."""
        g = self.cfg.grpo
        micro_batches = g.rollout_batch_size // g.train_batch_size * self.cfg.optim.grad_accum_steps
        return len(batch["input_ids"]) // micro_batches

    def add_old_log_probs(self, batch: dict) -> None:
        """``old_log_probs`` (and ``ref_log_probs``) for the whole rollout batch, once."""
        g = self.cfg.grpo
        micro = self.micro_rows(batch)
        if self.use_old:
            if g.old_log_probs == "engine":
                batch["old_log_probs"] = batch["sampler_log_probs"]
            else:
                batch["old_log_probs"] = self._forward(self.trainer.states(), batch, micro)
        if self.ref_params is not None:
            batch["ref_log_probs"] = self._forward(self.ref_params, batch, micro)

    def _forward(self, params, batch, micro) -> np.ndarray:
        out = []
        for mb in micro_batches(batch, micro):  # the rollout batch is global (policy_run.py)
            keys = [k for k in ("input_ids", "labels", "segment_ids") if k in mb]
            placed = self.trainer.place_batch({k: mb[k] for k in keys}, global_batch=True)
            out.append(self.log_prob_fn(params, **placed))
        return np.concatenate([to_host(x) for x in out])

    def train_on(self, batch: dict) -> dict[str, float]:
        """``epochs_per_rollout_batch`` passes over the batch; returns mean metrics."""
        g = self.cfg.grpo
        micro = self.micro_rows(batch)
        results = []
        for _ in range(g.epochs_per_rollout_batch):
            for mb in micro_batches(batch, micro):
                results.append(self.trainer.train_step(mb, global_batch=True))
        results = jax.device_get(results)
        out = {f"train/{k}": float(np.mean([r[k] for r in results])) for k in results[0]}
        # Drift: the first micro-batch ran before any update, on exactly the sampled tokens.
        out["drift/logprob_diff_mean"] = float(results[0]["logprob_diff_mean"])
        out["drift/logprob_diff_max"] = float(results[0]["logprob_diff_max"])
        del out["train/logprob_diff_mean"], out["train/logprob_diff_max"]
        return out

    def timing(self, rollouts: Rollouts, batch: dict, clock: Stopwatch) -> dict[str, float]:
        """The step's wall time by phase (rollout_s = generate_s + score_s + gather_s,
        summed over DAPO's rounds), throughputs and the learning rate."""
        laps = clock.laps
        n_tokens = sum(len(c.token_ids) for c in rollouts.completions)
        g, accum = self.cfg.grpo, max(self.cfg.optim.grad_accum_steps, 1)
        return {
            **{f"time/{k}": v for k, v in rollouts.times.items()},
            **{f"time/{k}": v for k, v in laps.items()},
            "time/step_s": clock.total(),
            "time/rollout_tokens_per_s": n_tokens / max(laps["rollout_s"], 1e-9),
            "time/train_tokens_per_s": batch["input_ids"].size * g.epochs_per_rollout_batch
            / max(laps["train_s"], 1e-9),
            "train/lr": float(self.schedule(max(self.trainer.step // accum - 1, 0))),
        }

    # --- the driver's hooks (jaxalign.algorithms.driver) -----------------------------------

    def progress(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"reward": f"{metrics['train/reward']:.2f}",
                "entropy": f"{metrics['train/entropy']:.2f}"}

    def panels(self) -> list[tuple[str, list[str]]]:
        return [
            ("reward", ["train/reward", "train/answer_reward", "train/format_reward",
                        *self.eval_curves(), *[f"train/{k}" for k in self.reward.components]]),
            ("entropy", ["train/entropy"]),
            ("response length", ["train/response_length", "train/response_length_correct",
                                 "train/response_length_incorrect"]),
            ("loss", ["train/loss"]),
            ("sampler drift", ["drift/logprob_diff_mean"]),
        ]

    def after_step(self, step: int, metrics: dict[str, float]) -> None:
        """Warns (or stops) on entropy collapse or format rising while answers fall."""
        g = self.cfg.grpo
        self.history.append(metrics)
        problems = []
        if g.entropy_floor > 0 and metrics["train/entropy"] < g.entropy_floor:
            problems.append(f"mean token entropy {metrics['train/entropy']:.3f} fell below "
                            f"grpo.entropy_floor={g.entropy_floor} (entropy collapse)")
        w = g.health_window
        if w and len(self.history) >= 2 * w:
            before, now = self.history[-2 * w : -w], self.history[-w:]

            def mean(rows, k):
                return float(np.mean([r[k] for r in rows]))

            d_format = mean(now, "train/format_reward") - mean(before, "train/format_reward")
            d_answer = mean(now, "train/answer_reward") - mean(before, "train/answer_reward")
            if d_format > 0.05 and d_answer < -0.05:
                problems.append(f"format reward rose by {d_format:.2f} while answer reward "
                                f"fell by {-d_answer:.2f} over the last {w} steps")
        for p in problems:
            warnings.warn(f"GRPO step {step}: {p}", stacklevel=2)
            if g.stop_on_collapse:
                raise RuntimeError(f"stopped at GRPO step {step}: {p} (grpo.stop_on_collapse)")


def run(cfg: ml_collections.ConfigDict, run_dir: Path) -> dict[str, Any]:
    """GRPO as configured; returns the summary (also in ``summary.json``)."""
    started = time.time()  # the set-up (model, data, warm start) counts in wall_time_s
    return drive(GRPO(cfg, run_dir), started)

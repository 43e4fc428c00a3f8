"""DPO: direct preference optimisation on (prompt, chosen, rejected) pairs.

    python -m jaxalign.train --config configs/dpo.py          # the CPU demo (no flags)
    python -m jaxalign.train --config configs/dpo.py \\
        --config.data.source=jsonl --config.data.train_file=prefs.jsonl

One step, top to bottom (``DPO.step``)::

    batch of pairs (both responses padded to one bucketed width)
    -> reference log-probs: one forward of the frozen starting policy, no gradients
    -> jitted train step: policy log-probs of chosen and rejected (one forward over both),
       summed over response tokens -> DPO loss -> grads -> AdamW (``jaxalign.optim``)
    -> log -> held-out preference accuracy every ``eval.every`` steps -> maybe save

The loss is Rafailov et al. (2023) as CS336 assignment 5's supplement states it
(``losses.per_instance_dpo_loss``): ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``
with sequence log-probs summed over the response tokens (EOS included, prompt excluded).
Departures and choices:

* The reference is the policy the run starts from (a copy of its parameters kept on the
  devices, never updated); its log-probs are recomputed for each batch, not stored with the
  data, so a user's file needs no precomputed columns. A resumed run rebuilds it from
  ``model.path`` / ``model.seed`` exactly as the first attempt did.
* Prompts are used as written (JSONL) or formatted with ``data.template`` (synthetic); no
  chat template is applied.
* Held-out metrics (``eval/*``) are computed over the whole held-out set with the same
  sequence log-probs: ``reward_accuracy`` (the implicit reward ``beta * log(pi / ref)`` ranks
  the chosen response first; ties count 1/2, so it is exactly 0.5 before training) and
  ``logp_accuracy`` (the policy itself gives the chosen response the higher probability:
  what a sampler follows), with the loss and the mean chosen/rejected rewards.

Checkpoints, resume and the run directory are every algorithm's
(``jaxalign.algorithms.driver``): a restart with the same workdir continues at the step
after the last checkpoint, with the same parameters, optimizer state and data order.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxalign import losses, optim, rundir, sharding
from jaxalign.algorithms import sft
from jaxalign.algorithms.driver import Algorithm, drive
from jaxalign.config import ConfigError, check, check_micro_batch, mesh_sizes
from jaxalign.data import preferences, synthetic
from jaxalign.data.preferences import PreferencePair
from jaxalign.data.prompts import CHAT_TEMPLATES, format_prompt
from jaxalign.data.tokenize import pick_bucket
from jaxalign.distributed import to_host
from jaxalign.models import build
from jaxalign.optim import make_optimizer
from jaxalign.trainer import Trainer

# --- config checks ----------------------------------------------------------------------


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Every DPO field's range and the data files, before anything is built."""
    check(cfg.dpo.beta > 0, f"config.dpo.beta={cfg.dpo.beta} must be > 0 (DPO's temperature; "
          "0.1 is the paper's default)")
    t = cfg.train
    check(t.steps >= 1, f"config.train.steps={t.steps} must be >= 1")
    check_micro_batch(cfg, "train.batch_size", t.batch_size)
    check(len(t.seq_buckets) >= 1 and list(t.seq_buckets) == sorted(set(t.seq_buckets))
          and min(t.seq_buckets) >= 1,
          f"config.train.seq_buckets={tuple(t.seq_buckets)} must be increasing positive widths")
    check(t.loss_chunk_size >= 0, f"config.train.loss_chunk_size={t.loss_chunk_size} must be >= 0")
    e = cfg.eval
    check(e.every >= 0, f"config.eval.every={e.every} must be >= 0 (0: only at the end)")
    check(e.batch_size >= 1, f"config.eval.batch_size={e.batch_size} must be >= 1")
    sizes = mesh_sizes(cfg.mesh, jax.device_count())
    if sizes is not None and jax.device_count() > 1:
        check(e.batch_size % (sizes[0] * sizes[1]) == 0,
              f"config.eval.batch_size={e.batch_size} is not divisible by the "
              f"{sizes[0] * sizes[1]} data-parallel devices (mesh data x fsdp)")
    d = cfg.data
    check(d.source in ("synthetic", "jsonl"),
          f"config.data.source={d.source!r}; choose 'synthetic' (generated arithmetic pairs) "
          "or 'jsonl' (config.data.train_file)")
    check(d.num_train >= 0 and d.num_eval >= 0,
          f"config.data.num_train={d.num_train} and num_eval={d.num_eval} must be >= 0")
    if d.source == "synthetic":
        check(d.synthetic.num_problems >= 1,
              f"config.data.synthetic.num_problems={d.synthetic.num_problems} must be >= 1")
        check(d.template not in CHAT_TEMPLATES,
              f"config.data.template={d.template!r}: DPO formats the synthetic pairs with a "
              "plain template (r1_zero, question_only or text with {question}); JSONL pairs "
              "are used as written")
        try:
            format_prompt(d.template, "x")
        except ValueError as e:
            raise ConfigError(f"config.data.template={d.template!r}: {e}") from None
    if d.source == "jsonl":
        check(bool(d.train_file) and Path(d.train_file).is_file(),
              f"config.data.source='jsonl' needs config.data.train_file, a JSONL file of "
              f'{{"prompt", "chosen", "rejected"}} rows (got {d.train_file!r})')
    if d.eval_file:
        check(Path(d.eval_file).is_file(),
              f"config.data.eval_file={d.eval_file!r}: no such file ('' holds out "
              "config.data.num_eval pairs of the training data instead)")
    # Every row now, before a model is loaded or the run directory written: a bad row is
    # a DataError naming file:line (or, with skip_invalid, counted), not a failure later.
    for path in ([d.train_file] if d.source == "jsonl" else []) + ([d.eval_file] if d.eval_file
                                                                    else []):
        preferences.load_preference_jsonl(path, skip_invalid=d.skip_invalid)


# --- data -------------------------------------------------------------------------------


def load_pairs(d: ml_collections.ConfigDict) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """``(train pairs, held-out pairs)`` for ``data.source``.

    ``synthetic``: ``data.synthetic.num_problems`` generated arithmetic problems
    (``jaxalign.data.synthetic``; fewer after removing questions that also occur among the
    ``data.num_eval`` held-out ones); chosen = the correct trace, rejected = a wrong answer.
    ``jsonl``: ``data.train_file``; held out: the first ``data.num_eval`` pairs of
    ``data.eval_file``, or when that is empty, ``data.num_eval`` pairs drawn from the training
    file (by ``data.seed``, at most half of it) and removed from it. ``num_eval=0``: none.

    Raises:
        DataError: a bad row (unless ``data.skip_invalid``), ``"path:line: reason"``.
    """
    if d.source == "synthetic":
        generator = d.synthetic.to_dict()
        num_problems = generator.pop("num_problems")
        train, held_out = synthetic.split_problems(num_problems, d.num_eval, d.seed, **generator)
        train = preferences.synthetic_preference_pairs(train, d.template, seed=d.seed)
        held_out = preferences.synthetic_preference_pairs(held_out, d.template, seed=d.seed + 1)
        return train[: d.num_train or None], held_out
    train = preferences.load_preference_jsonl(d.train_file, skip_invalid=d.skip_invalid)
    if d.eval_file:
        held_out = preferences.load_preference_jsonl(d.eval_file, skip_invalid=d.skip_invalid)
        held_out = held_out[: d.num_eval]
    else:
        order = list(range(len(train)))
        random.Random(d.seed).shuffle(order)
        n_eval = min(d.num_eval, len(train) // 2)  # never more than half of a small file
        held = set(order[:n_eval])
        held_out = [p for i, p in enumerate(train) if i in held]
        train = [p for i, p in enumerate(train) if i not in held]
    if d.num_train:
        train = train[: d.num_train]
    return train, held_out


# --- the loss ---------------------------------------------------------------------------


def pair_log_probs(model, batch: dict, chunk_size: int = 0) -> tuple[jax.Array, jax.Array]:
    """Sequence log-probs ``([B], [B])`` of the chosen and rejected responses under ``model``.

    One forward over both sides (``[2B, T]``: the two halves share a width by construction),
    summed over each row's response tokens (``losses.sequence_log_probs``).
    """
    b = batch["chosen_input_ids"].shape[0]

    def both(key: str) -> jax.Array:
        return jnp.concatenate([batch[f"chosen_{key}"], batch[f"rejected_{key}"]])  # [2B, T]

    out = losses.policy_log_probs(model, both("input_ids"), both("labels"),
                                  chunk_size=chunk_size)
    seq = losses.sequence_log_probs(out["log_probs"], both("response_mask"))  # [2B]
    return seq[:b], seq[b:]


def dpo_loss_fn(beta: float, chunk_size: int = 0):
    """``loss_fn(model, batch) -> (loss, metrics)`` for ``jaxalign.trainer.Trainer``.

    ``batch``: ``collate_pairs``' ``chosen_*`` / ``rejected_*`` arrays ``[B, T]`` plus the
    reference's ``ref_chosen_log_probs`` and ``ref_rejected_log_probs`` ``[B]``.
    """

    def loss_fn(model, batch):
        pi_c, pi_r = pair_log_probs(model, batch, chunk_size)
        return losses.dpo_loss(pi_c, pi_r, batch["ref_chosen_log_probs"],
                               batch["ref_rejected_log_probs"], beta)

    return loss_fn


def make_pair_log_prob_fn(graphdef, chunk_size: int = 0, mesh=None):
    """Jitted ``(states, batch) -> (chosen [B], rejected [B])`` of the model
    ``nnx.merge(graphdef, *states)`` (``Trainer.states()`` / ``Trainer.reference()``): the
    reference's forward and the held-out evaluation's, traced on ``mesh`` like the train
    step."""

    def fn(states, batch):
        return pair_log_probs(nnx.merge(graphdef, *states), batch, chunk_size)

    return jax.jit(sharding.traced_on(mesh, fn))


# --- the loop ---------------------------------------------------------------------------


class DPO(Algorithm):
    """The policy, its frozen reference, the data and the run directory of a DPO run."""

    name, title = "dpo", "DPO"
    eval_key = "reward_accuracy"
    table_rows = (("preference accuracy (implicit reward)", "reward_accuracy"),
                  ("preference accuracy (policy log-prob)", "logp_accuracy"),
                  ("DPO loss", "loss"))

    def __init__(self, cfg: ml_collections.ConfigDict, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        t, d = cfg.train, cfg.data
        train_pairs, held_out_pairs = load_pairs(d)  # bad rows stop the run before a model loads
        self.mesh = sharding.mesh_from_config(cfg)
        model, tokenizer = build.build_model_and_tokenizer(cfg.model, self.mesh, cfg.lora)
        # Before anything compiles: every pair within the widest bucket, itself within the
        # model's context (past it RoPE extrapolates and the log-probs are quietly wrong).
        context = model.config.max_position_embeddings
        sft.check_seq_buckets(t.seq_buckets, context, "train.seq_buckets")
        fit = dict(max_tokens=max(t.seq_buckets) + 1, skip=d.skip_invalid,
                   fix=f"raise config.train.seq_buckets (at most the model's context, "
                       f"{context}) or set config.data.skip_invalid=True to skip them (counted "
                       "in the log)")
        self.train_data = preferences.tokenize_pairs(train_pairs, tokenizer,
                                                     what="training pairs", **fit)
        self.held_out = (preferences.tokenize_pairs(held_out_pairs, tokenizer,
                                                    what="held-out pairs", **fit)
                         if held_out_pairs else None)
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = tokenizer.eos_token_id
        accum = cfg.optim.grad_accum_steps
        micro = t.batch_size // accum
        check(len(self.train_data) >= micro,
              f"{len(self.train_data)} training pairs < the {micro} of one micro-batch "
              "(config.train.batch_size / optim.grad_accum_steps)")
        self.tokenizer = tokenizer

        self.steps = t.steps
        tx, self.schedule = make_optimizer(optim.optim_config(cfg.optim, t.steps))
        self.trainer = Trainer.create(model, tx, dpo_loss_fn(cfg.dpo.beta, t.loss_chunk_size),
                                      self.mesh, dropout_seed=cfg.seed)
        # The frozen starting policy: a copy, since the train step donates (overwrites) the
        # trainer's buffers; under LoRA a copy of the (zero-B) adapters over the trainer's
        # frozen base, never copied (Trainer.reference). Taken before any resume restores
        # later parameters.
        self.ref_params = self.trainer.reference()
        self.log_probs = make_pair_log_prob_fn(self.trainer.graphdef, t.loss_chunk_size,
                                               self.mesh)
        self.it = preferences.make_preference_iterator(
            self.train_data, self.pad_id, batch_size=micro // jax.process_count(),
            seq_buckets=t.seq_buckets, seed=cfg.seed)
        self.run = rundir.RunState(cfg, run_dir)
        self._held_out_batches: list[tuple[dict, int]] | None = None
        self._held_out_ref: tuple[np.ndarray, np.ndarray] | None = None

    def reference(self, batch: dict, *, global_batch: bool = False) -> tuple[np.ndarray, ...]:
        """The reference's sequence log-probs ``([B], [B])`` of this process's rows."""
        keys = [f"{s}_{k}" for s in ("chosen", "rejected") for k in preferences.SIDE_KEYS]
        placed = self.trainer.place_batch({k: batch[k] for k in keys}, global_batch=global_batch)
        out = self.log_probs(self.ref_params, placed)
        n = len(batch["chosen_input_ids"])
        lo = 0 if global_batch else jax.process_index() * n  # rows in process order
        return tuple(to_host(x)[lo : lo + n] for x in out)

    def step(self, step: int) -> dict[str, float]:
        """One optimizer step: ``grad_accum_steps`` micro-batches, each with its reference."""
        t0 = time.perf_counter()
        results, ref_time, tokens = [], 0.0, 0
        for _ in range(self.cfg.optim.grad_accum_steps):
            batch = next(self.it)
            tr = time.perf_counter()
            batch["ref_chosen_log_probs"], batch["ref_rejected_log_probs"] = self.reference(batch)
            ref_time += time.perf_counter() - tr
            tokens += 2 * batch["chosen_input_ids"].size * jax.process_count()
            results.append(self.trainer.train_step(batch))
        results = jax.device_get(results)  # waits for the step
        elapsed = time.perf_counter() - t0
        out = {f"train/{k}": float(np.mean([r[k] for r in results])) for k in results[0]}
        opt_step = self.trainer.step // self.cfg.optim.grad_accum_steps
        out.update({"train/lr": float(self.schedule(max(opt_step - 1, 0))),
                    "train/width": int(batch["chosen_input_ids"].shape[1]),
                    "time/step_s": elapsed, "time/ref_s": ref_time,
                    "time/tokens_per_s": tokens / elapsed})
        return out

    def evaluate(self, step: int) -> dict[str, float]:
        """DPO loss and preference accuracies over the whole held-out set (``eval/*``)."""
        if self.held_out is None:
            return {}
        if self._held_out_batches is None:
            self._held_out_batches = list(self._eval_batches())
        if self._held_out_ref is None:  # the reference never changes: computed once
            ref = [self.reference(b, global_batch=True) for b, _ in self._held_out_batches]
            self._held_out_ref = self._concat(ref)
        pol = []
        for b, _ in self._held_out_batches:
            placed = self.trainer.place_batch(b, global_batch=True)
            pol.append(tuple(to_host(x) for x in self.log_probs(self.trainer.states(), placed)))
        pi_c, pi_r = self._concat(pol)
        ref_c, ref_r = self._held_out_ref
        loss, meta = losses.dpo_loss(pi_c, pi_r, ref_c, ref_r, self.cfg.dpo.beta)
        metrics = {"eval/loss": float(loss), **{f"eval/{k}": float(v) for k, v in meta.items()}}
        self.run.log(step, metrics)
        return metrics

    # --- the driver's hooks (jaxalign.algorithms.driver) -----------------------------------

    def iterators(self) -> dict[str, Any]:
        return {"train": self.it}

    def progress(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{metrics['train/loss']:.3f}",
                "acc": f"{metrics['train/reward_accuracy']:.2f}"}

    def panels(self) -> list[tuple[str, list[str]]]:
        return [
            ("loss", ["train/loss", "eval/loss"]),
            ("preference accuracy", ["train/reward_accuracy", "eval/reward_accuracy",
                                     "eval/logp_accuracy"]),
            ("implicit rewards", ["train/chosen_reward", "train/rejected_reward",
                                  "train/reward_margin"]),
        ]

    def held_out_label(self) -> str:
        return f"held-out pairs (n={len(self.held_out) if self.held_out is not None else 0})"

    def summary(self, eval_before: dict, eval_after: dict, last: dict) -> dict[str, Any]:
        return {
            "beta": self.cfg.dpo.beta,
            "num_train_pairs": len(self.train_data),
            "num_eval_pairs": len(self.held_out) if self.held_out is not None else 0,
            "final_train_loss": last.get("train/loss"),
            "final_train_reward_accuracy": last.get("train/reward_accuracy"),
            "eval_before_logp_accuracy": eval_before.get("eval/logp_accuracy"),
            "eval_after_logp_accuracy": eval_after.get("eval/logp_accuracy"),
            "eval_before_loss": eval_before.get("eval/loss"),
            "eval_after_loss": eval_after.get("eval/loss"),
            "eval_after_reward_margin": eval_after.get("eval/reward_margin"),
        }

    def _eval_batches(self):
        """Held-out batches of ``eval.batch_size`` pairs (the last one padded with copies of
        its first pair, dropped again by ``_concat``), each with its real row count."""
        data, size = self.held_out, self.cfg.eval.batch_size
        buckets = tuple(self.cfg.train.seq_buckets)
        lengths = data.lengths()
        for lo in range(0, len(data), size):
            index = list(range(lo, min(lo + size, len(data))))
            real = len(index)
            index += [index[0]] * (size - real)
            width = pick_bucket(int(lengths[index].max()), buckets)
            yield preferences.collate_pairs(data.subset(index), self.pad_id, width), real

    def _concat(self, parts) -> tuple[np.ndarray, np.ndarray]:
        counts = [real for _, real in self._held_out_batches]
        return tuple(np.concatenate([p[i][:n] for p, n in zip(parts, counts, strict=True)])
                     for i in range(2))


def run(cfg: ml_collections.ConfigDict, run_dir: Path) -> dict[str, Any]:
    """DPO as configured; returns the summary (also written to ``summary.json``)."""
    started = time.time()  # the set-up (model, data, warm start) counts in wall_time_s
    return drive(DPO(cfg, run_dir), started)

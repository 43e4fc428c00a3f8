"""Supervised fine-tuning: next-token loss on the response tokens of (prompt, response) pairs.

    python -m jaxalign.train --config configs/sft.py

The loop: grain batches (shuffled by seed, bucketed widths) -> jitted, sharded, donated
train step (``jaxalign.trainer``) -> metrics to JSONL/wandb -> validation with the rollout
engine and the verifier every ``eval.every`` steps -> orbax checkpoint every
``checkpoint.save_every`` steps. A run directory that already holds a checkpoint resumes
from it: same parameters, optimizer state and data order.

The loss is the mean negative log-likelihood per response token of the batch
(``train.normalize_constant = 0``), or CS336's ``sft_microbatch_loss``: each row's summed
log-likelihood divided by ``normalize_constant``, averaged over rows.

``train_sft`` is also what Expert Iteration and the GRPO demo's warm start call.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxalign import losses
from jaxalign.algorithms import common
from jaxalign.algorithms.common import check


def sft_loss_fn(chunk_size: int = 0, normalize_constant: float = 0.0):
    """``loss_fn(model, batch) -> (loss, metrics)`` for ``jaxalign.trainer.Trainer``.

    ``batch``: ``input_ids``, ``labels`` ``[B, T]`` int32 and ``response_mask`` ``[B, T]``.
    Gradient accumulation is the optimizer's (``optax.MultiSteps`` averages micro-batch
    gradients), so the loss is not divided by the accumulation steps here.
    """

    def loss_fn(model, batch):
        out = common.policy_log_probs(
            model, batch["input_ids"], batch["labels"], chunk_size=chunk_size, entropy=True
        )
        mask = batch["response_mask"]
        if normalize_constant:
            loss, meta = losses.sft_microbatch_loss(out["log_probs"], mask, 1, normalize_constant)
        else:
            loss = -losses.masked_mean(out["log_probs"], mask)
            meta = {"num_response_tokens": jnp.sum(mask.astype(jnp.float32))}
        meta["entropy"] = losses.masked_mean(out["token_entropy"], mask)
        return loss, meta

    return loss_fn


# --- data -----------------------------------------------------------------------------


def load_pairs(data: ml_collections.ConfigDict) -> tuple[list[tuple[str, str]], list[Any]]:
    """``(train pairs, held-out MathExamples)`` for ``data.source``.

    ``gsm8k``: GSM8K train solutions as r1_zero traces, held out from GSM8K test.
    ``synthetic``: generated arithmetic problems (``jaxalign.data.synthetic``).
    A ``.jsonl`` path: rows with ``prompt`` and ``response`` (no held-out set).
    """
    from jaxalign.data import datasets, synthetic

    if data.source == "synthetic":
        train, held_out = synthetic.split_problems(data.num_train, data.num_eval, data.seed,
                                          **data.synthetic.to_dict())
        pairs = synthetic.sft_traces(train, data.template, slip_rate=data.slip_rate,
                                     seed=data.seed)
        return pairs, held_out
    if data.source == "gsm8k":
        train = datasets.load_benchmark("gsm8k", data.data_dir, "train",
                                        skip_invalid=data.skip_invalid)
        if data.num_train:
            train = train[: data.num_train]
        held_out = datasets.load_benchmark("gsm8k", data.data_dir, "test")[: data.num_eval]
        return [datasets.gsm8k_sft_trace(e, data.template) for e in train], held_out
    pairs = []
    with open(data.source) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pairs.append((str(row["prompt"]), str(row["response"])))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                if not data.skip_invalid:
                    raise datasets.DataError(f"{data.source}:{i}", f"bad SFT row ({e})") from e
    if data.num_train:
        pairs = pairs[: data.num_train]
    return pairs, []


# --- the loop -------------------------------------------------------------------------


def train_sft(
    trainer,
    pairs: Sequence[tuple[str, str]],
    tokenizer,
    *,
    steps: int,
    batch_size: int,
    grad_accum_steps: int,
    seq_buckets: Sequence[int],
    seed: int,
    truncate: str = "drop",
    schedule=None,
    run: common.RunState | None = None,
    log_prefix: str = "",
    step_offset: int = 0,
    progress: bool = False,
    on_step=None,
) -> dict[str, float]:
    """``steps`` optimizer steps of SFT on ``pairs`` with ``trainer`` (repeating the data).

    Args:
        trainer: a ``Trainer`` built with ``sft_loss_fn`` and an optimizer whose
            accumulation equals ``grad_accum_steps``.
        pairs: ``(prompt, response)`` strings.
        steps: optimizer steps.
        batch_size: rows per optimizer step (all processes), split into
            ``grad_accum_steps`` micro-batches.
        seq_buckets, seed, truncate: see ``jaxalign.data.pipeline.make_sft_iterator``.
        schedule: the learning-rate schedule, for logging.
        run: where to log (and checkpoint, through ``on_step``); None logs nothing.
        log_prefix, step_offset: metric-name prefix and step numbering for the log.
        on_step: ``callback(step, iterator)`` after each optimizer step (checkpointing).

    Returns:
        The last step's metrics.
    """
    it = sft_iterator(pairs, tokenizer, batch_size=batch_size, grad_accum_steps=grad_accum_steps,
                      seq_buckets=seq_buckets, seed=seed, truncate=truncate)
    return run_sft_steps(trainer, it, steps=steps, grad_accum_steps=grad_accum_steps,
                         schedule=schedule, run=run, log_prefix=log_prefix,
                         step_offset=step_offset, progress=progress, on_step=on_step)


def sft_iterator(pairs, tokenizer, *, batch_size, grad_accum_steps, seq_buckets, seed,
                 truncate="drop"):
    """Endless micro-batches of ``batch_size / grad_accum_steps`` rows (this process's share)."""
    from jaxalign.data.pipeline import make_sft_iterator

    micro = batch_size // grad_accum_steps
    return make_sft_iterator(
        pairs, tokenizer, batch_size=micro // jax.process_count(),
        seq_buckets=tuple(seq_buckets), seed=seed, num_epochs=None, truncate=truncate,
    )


def run_sft_steps(trainer, it, *, steps, grad_accum_steps, schedule=None, run=None,
                  log_prefix="", step_offset=0, start=0, progress=False, on_step=None):
    """Optimizer steps ``start+1 .. steps`` from the batch iterator ``it``."""
    from tqdm import tqdm

    last: dict[str, float] = {}
    bar = tqdm(range(start + 1, steps + 1), desc=log_prefix.rstrip("/") or "sft",
               disable=not (progress and jax.process_index() == 0), initial=start, total=steps)
    for step in bar:
        t0 = time.perf_counter()
        data_time, tokens, micro_metrics = 0.0, 0, []
        for _ in range(grad_accum_steps):
            td = time.perf_counter()
            batch = next(it)
            data_time += time.perf_counter() - td
            tokens += int(np.prod(batch["input_ids"].shape)) * jax.process_count()
            micro_metrics.append(trainer.train_step(batch))
        micro_metrics = jax.device_get(micro_metrics)  # waits for the step
        elapsed = time.perf_counter() - t0
        last = {k: float(np.mean([m[k] for m in micro_metrics])) for k in micro_metrics[0]}
        last.update(step_time=elapsed, data_time=data_time, tokens_per_s=tokens / elapsed)
        if schedule is not None:
            last["lr"] = float(schedule(step - 1))
        if run is not None:
            run.log(step_offset + step, {log_prefix + k: v for k, v in last.items()})
        bar.set_postfix(loss=f"{last['loss']:.3f}")
        if on_step is not None:
            on_step(step, it)
    return last


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    t = cfg.train
    check(t.steps >= 1, f"config.train.steps={t.steps} must be >= 1")
    common.check_micro_batch(cfg, "train.batch_size", t.batch_size)
    check(list(t.seq_buckets) == sorted(t.seq_buckets) and len(t.seq_buckets) >= 1,
          f"config.train.seq_buckets={tuple(t.seq_buckets)} must be increasing")
    check(t.truncate in ("error", "right", "drop"),
          f"config.train.truncate={t.truncate!r}; choose error, right or drop")
    d = cfg.data
    if d.source in ("gsm8k",):
        path = Path(d.data_dir) / "gsm8k" / "train.jsonl"
        check(path.exists(), f"config.data.data_dir={d.data_dir!r}: {path} not found (point it at "
              "the folder holding gsm8k/train.jsonl, e.g. ../shared/data)")
    elif d.source != "synthetic":
        check(Path(d.source).is_file(),
              f"config.data.source={d.source!r}: not 'gsm8k', 'synthetic' or a JSONL file")


validate = validate_config


def run(cfg: ml_collections.ConfigDict, run_dir: Path) -> dict[str, Any]:
    """SFT as configured; returns the summary (also written to ``summary.json``)."""
    from jaxalign.optim import make_optimizer
    from jaxalign.rollout import JaxEngine, SamplingParams
    from jaxalign.trainer import Trainer

    t0 = time.time()
    mesh = common.mesh_from_config(cfg)
    model, tokenizer = common.build_model_and_tokenizer(cfg.model, mesh)
    pairs, held_out = load_pairs(cfg.data)
    tx, schedule = make_optimizer(common.optim_config(cfg.optim, cfg.train.steps))
    trainer = Trainer.create(model, tx, sft_loss_fn(cfg.train.loss_chunk_size,
                                                    cfg.train.normalize_constant), mesh)
    accum = cfg.optim.grad_accum_steps
    it = sft_iterator(pairs, tokenizer, batch_size=cfg.train.batch_size, grad_accum_steps=accum,
                      seq_buckets=cfg.train.seq_buckets, seed=cfg.seed,
                      truncate=cfg.train.truncate)
    run_state = common.RunState(cfg, run_dir)
    extra = run_state.resume(trainer, {"train": it})
    start = int(extra["step"]) if extra else 0

    engine = None
    held_out = held_out[: cfg.eval.num_examples]
    sampling = SamplingParams(temperature=cfg.eval.temperature, max_tokens=cfg.eval.max_tokens,
                              stop=("</answer>",), include_stop_str_in_output=True,
                              seed=cfg.seed)

    def evaluate(step: int) -> dict[str, float]:
        nonlocal engine
        if not held_out:
            return {}
        if engine is None:
            engine = JaxEngine(trainer.model(), tokenizer, mesh,
                               max_batch_size=cfg.eval.batch_size)
        engine.update_weights(trainer.model())
        metrics, records = common.validate(engine, held_out, template=cfg.data.template,
                                           reward=cfg.data.reward, sampling=sampling,
                                           num_workers=cfg.eval.num_workers)
        common.write_generations(run_dir, step, records, cfg.log.num_generations)
        metrics = {"eval/" + k: v for k, v in metrics.items()}
        run_state.log(step, metrics)
        return metrics

    eval_before = evaluate(0) if start == 0 and cfg.eval.at_start else {}

    def on_step(step: int, iterator) -> None:
        if cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.train.steps:
            evaluate(step)
        run_state.save(step, trainer, {"train": iterator})

    last = run_sft_steps(trainer, it, steps=cfg.train.steps, grad_accum_steps=accum,
                         schedule=schedule, run=run_state, log_prefix="train/", start=start,
                         progress=cfg.log.progress, on_step=on_step)
    eval_after = evaluate(cfg.train.steps)
    run_state.save(cfg.train.steps, trainer, {"train": it}, force=True)
    if cfg.checkpoint.export_hf:
        common.export_hf(trainer.model(), tokenizer, Path(run_dir) / "hf")
    common.plot_metrics(run_dir, [("loss", ["train/loss"]), ("entropy", ["train/entropy"]),
                                  ("held-out reward", ["eval/answer_reward",
                                                       "eval/format_reward"])])
    run_state.close()
    summary = {
        "algorithm": "sft",
        "steps": cfg.train.steps,
        "resumed_from": start,
        "final_train_loss": last.get("loss"),
        "eval_before": eval_before.get("eval/answer_reward"),
        "eval_after": eval_after.get("eval/answer_reward"),
        "eval_after_format": eval_after.get("eval/format_reward"),
        "wall_time_s": round(time.time() - t0, 1),
        "run_dir": str(run_dir),
    }
    common.write_summary(run_dir, summary)
    return summary

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

``sft_iterator`` and ``run_sft_steps`` are also what the demo's warm start (GRPO and EI)
calls.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxalign import evaluation, losses, optim, rundir, sharding
from jaxalign.config import ConfigError, check, check_micro_batch
from jaxalign.models import build


def sft_loss_fn(chunk_size: int = 0, normalize_constant: float = 0.0):
    """``loss_fn(model, batch) -> (loss, metrics)`` for ``jaxalign.trainer.Trainer``.

    ``batch``: ``input_ids``, ``labels`` ``[B, T]`` int32 and ``response_mask`` ``[B, T]``.
    Gradient accumulation is the optimizer's (``optax.MultiSteps`` averages micro-batch
    gradients), so the loss is not divided by the accumulation steps here.
    """

    def loss_fn(model, batch):
        out = losses.policy_log_probs(
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
    A ``.jsonl`` path: rows with ``prompt`` and ``response``, both non-empty text
    (``datasets.load_sft_jsonl``; no held-out set).

    Raises:
        DataError: a bad row, ``"path:line: reason"`` (unless ``data.skip_invalid``), or a
            file with no (valid) rows.
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
    # Each row checked as the math rows are: bad ones raise DataError("path:line: ...") or,
    # with data.skip_invalid, are skipped and counted in a warning.
    pairs = datasets.load_sft_jsonl(data.source, skip_invalid=data.skip_invalid)
    if data.num_train:
        pairs = pairs[: data.num_train]
    return pairs, []


# --- the loop -------------------------------------------------------------------------


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


def fit_questions_to_context(questions, tokenizer, *, template: str, new_tokens: int,
                             context: int, skip: bool, what: str, fix: str) -> list:
    """The ``MathExample`` questions whose prompt leaves room for ``new_tokens`` generated
    tokens within the model's ``context`` (``max_position_embeddings``).

    Checked when the data is loaded, with the tokenizer and model config at hand, so an
    over-long prompt stops the run before anything compiles rather than sampling quietly
    wrong tokens past the context. With ``skip`` (``data.skip_invalid``) they are dropped and
    counted in a warning instead (``jaxalign.data.tokenize.fit_to_context``).

    Raises:
        ConfigError: some prompts do not fit and not ``skip``: how many, the longest, the
            limit and ``fix`` (what to change).
    """
    from jaxalign.data.prompts import format_prompt
    from jaxalign.data.tokenize import fit_to_context

    if not questions:
        return []
    prompts = [format_prompt(template, q.question) for q in questions]
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    names = [q.source or f"row {i}" for i, q in enumerate(questions)]
    try:
        kept = fit_to_context(lengths, new_tokens, context, skip=skip, names=names, what=what,
                              fix=fix)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return [questions[i] for i in kept]


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    t = cfg.train
    check(t.steps >= 1, f"config.train.steps={t.steps} must be >= 1")
    check_micro_batch(cfg, "train.batch_size", t.batch_size)
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


def check_seq_buckets(seq_buckets: Sequence[int], context: int, field: str) -> None:
    """The widest SFT batch must fit the model's ``max_position_embeddings``.

    Rows longer than the largest width are dropped, cut or refused by the pipeline's
    ``truncate`` policy (and counted in the log), so this one check holds every row to the
    context. Past it nothing fails: RoPE extrapolates and the loss is quietly wrong.
    """
    check(max(seq_buckets) <= context,
          f"config.{field}={tuple(seq_buckets)}: the widest batch, {max(seq_buckets)} tokens, "
          f"is longer than the model's max_position_embeddings={context}; lower the widths to "
          f"at most {context} (longer rows then follow config.train.truncate: error, right or "
          "drop, counted in the log) or use a model with a longer context")


def run(cfg: ml_collections.ConfigDict, run_dir: Path) -> dict[str, Any]:
    """SFT as configured; returns the summary (also written to ``summary.json``)."""
    from jaxalign.optim import make_optimizer
    from jaxalign.rollout import JaxEngine, SamplingParams
    from jaxalign.trainer import Trainer

    t0 = time.time()
    mesh = sharding.mesh_from_config(cfg)
    model, tokenizer = build.build_model_and_tokenizer(cfg.model, mesh)
    pairs, held_out = load_pairs(cfg.data)
    # Before anything compiles: every row and every validation prompt within the context.
    context = model.config.max_position_embeddings
    check_seq_buckets(cfg.train.seq_buckets, context, "train.seq_buckets")
    held_out = fit_questions_to_context(
        held_out[: cfg.eval.num_examples], tokenizer, template=cfg.data.template,
        new_tokens=cfg.eval.max_tokens, context=context, skip=cfg.data.skip_invalid,
        what="held-out questions",
        fix="lower config.eval.max_tokens, use a model with a longer context, or set "
            "config.data.skip_invalid=True to skip these prompts (counted in the log)")
    tx, schedule = make_optimizer(optim.optim_config(cfg.optim, cfg.train.steps))
    trainer = Trainer.create(model, tx, sft_loss_fn(cfg.train.loss_chunk_size,
                                                    cfg.train.normalize_constant), mesh)
    accum = cfg.optim.grad_accum_steps
    it = sft_iterator(pairs, tokenizer, batch_size=cfg.train.batch_size, grad_accum_steps=accum,
                      seq_buckets=cfg.train.seq_buckets, seed=cfg.seed,
                      truncate=cfg.train.truncate)
    run_state = rundir.RunState(cfg, run_dir)
    extra = run_state.resume(trainer, {"train": it})
    start = int(extra["step"]) if extra else 0

    engine = None
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
        metrics, records = evaluation.validate(engine, held_out, template=cfg.data.template,
                                           reward=cfg.data.reward, sampling=sampling,
                                           num_workers=cfg.eval.num_workers)
        rundir.write_generations(run_dir, step, records, cfg.log.num_generations)
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
        rundir.export_hf(trainer.model(), tokenizer, Path(run_dir) / "hf")
    rundir.plot_metrics(run_dir, [("loss", ["train/loss"]), ("entropy", ["train/entropy"]),
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
    rundir.write_summary(run_dir, summary)
    return summary

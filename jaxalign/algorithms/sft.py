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

Chat templates: ``data.template="chat"`` puts each question (GSM8K) or prompt field (JSONL,
``hf:``) in the tokenizer's chat template with ``data.system_prompt``
(``jaxalign.data.prompts.build_prompt``) and ends each response with the template's
end-of-turn token, so the model learns to stop where chat validation stops (``<|im_end|>``).
The prompt is masked out of the loss (``response_mask``): only the assistant turn trains.
Length: ``train.steps``, or ``train.epochs`` (with ``train.steps=0``): ceil(epochs * rows /
batch_size) steps, counted from the rows the pipeline kept, logged, and spanned by the LR
schedule. ``configs/sft.py:s1`` is the s1 recipe.

Packing (``train.packing=True``): rows of ``max(train.seq_buckets)`` positions hold whole
sequences (``jaxalign.data.packing``; attention within each, positions restarting), so a
batch of ``train.batch_size`` rows carries as many sequences as fit and an epoch is its
packed rows.

``sft_iterator`` and ``run_sft_steps`` are also what the demo's warm start (GRPO and EI)
calls.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from jaxalign import evaluation, losses, optim, rundir, sharding
from jaxalign.algorithms.driver import Algorithm, drive
from jaxalign.config import ConfigError, check, check_micro_batch
from jaxalign.data import datasets, prompts, synthetic
from jaxalign.data.pipeline import describe_cuts, make_packed_sft_iterator, make_sft_iterator
from jaxalign.data.prompts import ChatTemplateError
from jaxalign.data.tokenize import fit_to_context
from jaxalign.models import build
from jaxalign.optim import make_optimizer
from jaxalign.rollout import JaxEngine, SamplingParams
from jaxalign.trainer import Trainer
from jaxalign.verify import RewardSpecError, resolve_reward

logger = logging.getLogger(__name__)


def sft_loss_fn(chunk_size: int = 0, normalize_constant: float = 0.0):
    """``loss_fn(model, batch) -> (loss, metrics)`` for ``jaxalign.trainer.Trainer``.

    ``batch``: ``input_ids``, ``labels`` ``[B, T]`` int32 and ``response_mask`` ``[B, T]``;
    packed rows add ``segment_ids`` ``[B, T]`` (``jaxalign.data.packing``), and then the
    ``normalize_constant`` form averages over the sequences, not the rows.
    Gradient accumulation is the optimizer's (``optax.MultiSteps`` averages micro-batch
    gradients), so the loss is not divided by the accumulation steps here.
    """

    def loss_fn(model, batch):
        segments = batch.get("segment_ids")  # packed rows (jaxalign.data.packing)
        out = losses.policy_log_probs(
            model, batch["input_ids"], batch["labels"], chunk_size=chunk_size, entropy=True,
            segment_ids=segments,
        )
        mask = batch["response_mask"]
        if normalize_constant and segments is not None:
            # CS336's mean over sequences of each one's sum / constant; a packed row holds
            # max(segment_ids) of them.
            sequences = jnp.sum(jnp.max(segments, axis=-1)).astype(jnp.float32)
            loss = -losses.masked_normalize(out["log_probs"], mask, normalize_constant) / sequences
            meta = {"num_response_tokens": jnp.sum(mask.astype(jnp.float32))}
        elif normalize_constant:
            loss, meta = losses.sft_microbatch_loss(out["log_probs"], mask, 1, normalize_constant)
        else:
            loss = -losses.masked_mean(out["log_probs"], mask)
            meta = {"num_response_tokens": jnp.sum(mask.astype(jnp.float32))}
        meta["entropy"] = losses.masked_mean(out["token_entropy"], mask)
        return loss, meta

    return loss_fn


# --- data -----------------------------------------------------------------------------


def load_pairs(data: ml_collections.ConfigDict, tokenizer=None
               ) -> tuple[list[tuple[str, str]], list[Any]]:
    """``(train pairs, held-out MathExamples)`` for ``data.source``.

    ``gsm8k``: GSM8K train solutions as traces in ``data.template``'s format (r1_zero, or
    under ``chat`` boxed answers closed by the end-of-turn token), held out from GSM8K test.
    ``synthetic``: generated arithmetic problems (``jaxalign.data.synthetic``).
    A ``.jsonl`` path or ``hf:NAME[:CONFIG]`` (split ``data.split``): rows with ``prompt``
    and ``response`` (other names mapped by ``data.fields``; with ``thinking=F`` the rows
    are s1-shaped and the response is s1's assistant turn), both non-empty text
    (``datasets.load_sft_source``; no held-out set). Under ``data.template="chat"`` the
    prompt field is the user's turn, put in the tokenizer's chat template (system prompt
    ``data.system_prompt``), and the response ends with the template's end-of-turn text;
    under any other template the prompt field is the whole prompt, used as written.

    Args:
        data: the config's ``data`` block.
        tokenizer: the model's tokenizer (``data.template="chat"`` needs it).

    Raises:
        DataError: a bad row, ``"path:line: reason"`` (unless ``data.skip_invalid``), or a
            file with no (valid) rows.
        ConfigError: ``chat`` without a tokenizer that has a chat template.
    """
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
        try:
            return [datasets.gsm8k_sft_trace(e, data.template, tokenizer,
                                             system_prompt=data.system_prompt)
                    for e in train], held_out
        except ChatTemplateError as e:
            raise ConfigError(f"config.data.template={data.template!r}: {e}") from None
    # Each row checked as the math rows are: bad ones raise DataError("path:line: ...") or,
    # with data.skip_invalid, are skipped and counted in a warning.
    pairs = datasets.load_sft_source(data.source, fields=data.fields, split=data.split,
                                     skip_invalid=data.skip_invalid)
    if data.num_train:
        pairs = pairs[: data.num_train]
    if data.template == prompts.CHAT:
        try:
            end = prompts.end_of_turn(tokenizer)
            pairs = [(prompts.build_prompt(prompts.CHAT, p, tokenizer,
                                           system_prompt=data.system_prompt), r + end)
                     for p, r in pairs]
        except ChatTemplateError as e:
            raise ConfigError(f"config.data.template={data.template!r}: {e}") from None
    return pairs, []


# --- the loop -------------------------------------------------------------------------


def sft_iterator(pairs, tokenizer, *, batch_size, grad_accum_steps, seq_buckets, seed,
                 truncate="drop", packing=False):
    """Endless micro-batches of ``batch_size / grad_accum_steps`` rows (this process's share):
    bucketed, or with ``packing`` packed rows of ``max(seq_buckets)`` positions."""
    micro = batch_size // grad_accum_steps
    if packing:
        return make_packed_sft_iterator(
            pairs, tokenizer, batch_size=micro // jax.process_count(), width=max(seq_buckets),
            seed=seed, num_epochs=None, truncate=truncate)
    return make_sft_iterator(
        pairs, tokenizer, batch_size=micro // jax.process_count(),
        seq_buckets=tuple(seq_buckets), seed=seed, num_epochs=None, truncate=truncate,
    )


def sft_step(trainer, it, grad_accum_steps: int) -> dict[str, float]:
    """One optimizer step: ``grad_accum_steps`` micro-batches from ``it``; returns the mean
    of their metrics plus ``step_time``, ``data_time`` and ``tokens_per_s``."""
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
    out = {k: float(np.mean([m[k] for m in micro_metrics])) for k in micro_metrics[0]}
    out.update(step_time=elapsed, data_time=data_time, tokens_per_s=tokens / elapsed)
    return out


def run_sft_steps(trainer, it, *, steps, grad_accum_steps, schedule=None, run=None,
                  log_prefix="", start=0, progress=False, on_step=None):
    """Optimizer steps ``start+1 .. steps`` from the batch iterator ``it`` (the warm start's
    loop; an SFT run goes through ``jaxalign.algorithms.driver``)."""
    last: dict[str, float] = {}
    bar = tqdm(range(start + 1, steps + 1), desc=log_prefix.rstrip("/") or "sft",
               disable=not (progress and jax.process_index() == 0), initial=start, total=steps)
    for step in bar:
        last = sft_step(trainer, it, grad_accum_steps)
        if schedule is not None:
            last["lr"] = float(schedule(step - 1))
        if run is not None:
            run.log(step, {log_prefix + k: v for k, v in last.items()})
        bar.set_postfix(loss=f"{last['loss']:.3f}")
        if on_step is not None:
            on_step(step, it)
    return last


def fit_questions_to_context(questions, tokenizer, *, template: str, new_tokens: int,
                             context: int, skip: bool, what: str, fix: str,
                             system_prompt: str | None = None) -> list:
    """The ``MathExample`` questions whose prompt leaves room for ``new_tokens`` generated
    tokens within the model's ``context`` (``max_position_embeddings``).

    Checked when the data is loaded, with the tokenizer and model config at hand, so an
    over-long prompt stops the run before anything compiles rather than sampling quietly
    wrong tokens past the context. With ``skip`` (``data.skip_invalid``) they are dropped and
    counted in a warning instead (``jaxalign.data.tokenize.fit_to_context``). Prompts are
    built as validation builds them (``prompts.build_prompt``: ``chat`` with
    ``system_prompt``, None for its default).

    Raises:
        ConfigError: some prompts do not fit and not ``skip``: how many, the longest, the
            limit and ``fix`` (what to change); ``chat`` without a chat template.
    """
    if not questions:
        return []
    try:
        texts = [prompts.build_prompt(template, q.question, tokenizer,
                                      system_prompt=system_prompt) for q in questions]
    except ChatTemplateError as e:
        raise ConfigError(f"config.data.template={template!r}: {e}") from None
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    names = [q.source or f"row {i}" for i, q in enumerate(questions)]
    try:
        kept = fit_to_context(lengths, new_tokens, context, skip=skip, names=names, what=what,
                              fix=fix)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return [questions[i] for i in kept]


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    t = cfg.train
    try:  # the validation reward (a spec, jaxalign.verify.rewards); imports a user module now
        resolve_reward(cfg.data.reward)
    except RewardSpecError as e:
        raise ConfigError(f"config.data.reward={cfg.data.reward!r}: {e}") from None
    check(t.epochs >= 0, f"config.train.epochs={t.epochs} must be >= 0 (0: train for "
          "config.train.steps)")
    if t.epochs > 0:
        check(t.steps == 0,
              f"config.train.epochs={t.epochs} and config.train.steps={t.steps} both set the "
              "run's length: set config.train.steps=0 to train for epochs (steps = ceil(epochs "
              "* rows / batch_size), counted when the data is loaded), or config.train.epochs=0 "
              "to train for steps")
    else:
        check(t.steps >= 1, f"config.train.steps={t.steps} must be >= 1 (or set "
              "config.train.epochs > 0 with config.train.steps=0)")
    check_micro_batch(cfg, "train.batch_size", t.batch_size)
    check(list(t.seq_buckets) == sorted(t.seq_buckets) and len(t.seq_buckets) >= 1,
          f"config.train.seq_buckets={tuple(t.seq_buckets)} must be increasing")
    check(t.truncate in ("error", "right", "drop"),
          f"config.train.truncate={t.truncate!r}; choose error, right or drop")
    d = cfg.data
    check_chat_template_config(cfg)
    check_eval_sets(cfg)
    if d.source in ("gsm8k",):
        path = Path(d.data_dir) / "gsm8k" / "train.jsonl"
        check(path.exists(), f"config.data.data_dir={d.data_dir!r}: {path} not found (point it at "
              "the folder holding gsm8k/train.jsonl, e.g. ../shared/data)")
    elif d.source != "synthetic":
        check(Path(d.source).is_file() or d.source.startswith(datasets.HF_PREFIX),
              f"config.data.source={d.source!r}: not 'gsm8k', 'synthetic', a JSONL file or "
              "hf:NAME[:CONFIG] (a Hugging Face dataset: Hub id or local folder)")
        # The first row now, not after the model has loaded.
        try:
            datasets.check_sft_source(d.source, fields=d.fields, split=d.split,
                                      skip_invalid=d.skip_invalid)
        except datasets.DataError as e:
            hint = "" if isinstance(e, datasets.SourceUnavailable) else (
                " (other field names: map them with config.data.fields=prompt=F,response=F"
                "[,thinking=F])")
            raise ConfigError(f"config.data.source={d.source!r}: {e}{hint}") from None
        except ValueError as e:
            raise ConfigError(f"config.data.{e}") from None
    if d.fields and d.source in ("gsm8k", "synthetic"):
        raise ConfigError(f"config.data.fields={d.fields!r} maps the fields of a JSONL or hf: "
                          f"source; data.source={d.source!r} has its own")


validate = validate_config


def check_chat_template_config(cfg: ml_collections.ConfigDict) -> None:
    """``data.template="chat"``: a source it can format, a model with a chat template, a
    reward that reads its answers; ``data.system_prompt`` only with it. SFT, GRPO and EI
    (their prompts, and the held-out prompts of ``evaluation.validate``, use the same
    system prompt)."""
    d = cfg.data
    check(d.template != prompts.S1,
          "config.data.template='s1' is eval/evaluate.py's --prompt (the assistant turn opened "
          "with <|im_start|>think); SFT on s1-shaped rows trains the whole turn: set "
          "config.data.template=chat and config.data.fields=prompt=question,"
          "thinking=thinking_trajectories,response=attempt (configs/sft.py:s1)")
    if d.template != prompts.CHAT:
        check(d.system_prompt == prompts.CHAT_SYSTEM,
              f"config.data.system_prompt={d.system_prompt!r} applies to "
              f"config.data.template='chat' only, and the template is {d.template!r}: set "
              "config.data.template=chat or leave the system prompt at its default")
        return
    check(d.source != "synthetic",
          "config.data.template='chat' formats GSM8K, JSONL and hf: sources; the synthetic "
          "traces have their own format: use data.template=" + repr("r1_zero"))
    check(bool(cfg.model.path),
          "config.data.template='chat' needs the model tokenizer's chat template, and the "
          f"random preset model.preset={cfg.model.preset!r} uses the byte tokenizer, which has "
          "none: set config.model.path to a HF model whose tokenizer has one (e.g. "
          "Qwen/Qwen2.5-32B-Instruct) or use a plain template (r1_zero, question_only)")
    check(evaluation.answer_format(d.reward) != "r1_zero",
          f"config.data.reward={d.reward!r} grades <answer> tags, and chat responses end with "
          "a \\boxed{} answer (the chat system prompt asks for it): set "
          "config.data.reward=question_only")


def check_eval_sets(cfg: ml_collections.ConfigDict) -> list:
    """``config.eval.sets`` (every loop's extra validation sets) parsed, each benchmark file
    present and each JSONL / ``hf:`` set's first row usable; returns the
    ``datasets.EvalSet``s."""
    try:
        eval_sets = datasets.parse_eval_sets(cfg.eval.sets)
    except ValueError as e:
        raise ConfigError(f"config.eval.sets={cfg.eval.sets!r}: {e}") from None
    for s in eval_sets:
        try:
            if s.source in datasets.BENCHMARKS:
                path = Path(cfg.data.data_dir) / s.source / f"{cfg.eval.split}.jsonl"
                check(path.is_file(), f"config.eval.sets: {s.source} needs {path} (set "
                      "config.data.data_dir to the folder holding the benchmarks, or "
                      "config.eval.split)")
            else:
                datasets.problem_source_fields(s.source, split=cfg.eval.split)
        except (datasets.DataError, FileNotFoundError) as e:
            raise ConfigError(f"config.eval.sets: {s.source}: {e}") from None
    return eval_sets


def load_eval_sets(cfg: ml_collections.ConfigDict) -> dict[str, list]:
    """``{name: MathExample list}`` of ``config.eval.sets``."""
    return {s.name: datasets.load_eval_set(s, data_dir=cfg.data.data_dir, split=cfg.eval.split)
            for s in datasets.parse_eval_sets(cfg.eval.sets)}


def train_steps(train: ml_collections.ConfigDict, num_rows: int) -> int:
    """Optimizer steps of the run: ``train.steps``, or with ``train.epochs > 0``
    ``ceil(epochs * num_rows / batch_size)`` (logged), so ``optim``'s warm-up ratio and
    cosine span the epochs.

    Args:
        train: the config's ``train`` block.
        num_rows: the training rows the pipeline kept (after ``train.truncate``).
    """
    if train.epochs <= 0:
        return train.steps
    steps = max(1, math.ceil(train.epochs * num_rows / train.batch_size))
    _say(f"train.epochs={train.epochs:g} over {num_rows} rows at batch {train.batch_size}: "
         f"{steps} optimizer steps")
    return steps


def _say(line: str) -> None:
    """To the log and, on process 0, the console (absl keeps INFO logs off it)."""
    logger.info(line)
    if jax.process_index() == 0:
        print(line)


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


class SFT(Algorithm):
    """An SFT run: the model, the batches, the trainer and validation with the engine."""

    name, title = "sft", "SFT"

    def __init__(self, cfg: ml_collections.ConfigDict, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.reward = resolve_reward(cfg.data.reward)  # once: validation scores with it
        self.mesh = sharding.mesh_from_config(cfg)
        model, self.tokenizer = build.build_model_and_tokenizer(cfg.model, self.mesh, cfg.lora)
        pairs, held_out = load_pairs(cfg.data, self.tokenizer)
        # Before anything compiles: every row and every validation prompt within the context.
        context = model.config.max_position_embeddings
        check_seq_buckets(cfg.train.seq_buckets, context, "train.seq_buckets")
        fit = dict(template=cfg.data.template, new_tokens=cfg.eval.max_tokens,
                   context=context, skip=cfg.data.skip_invalid,
                   system_prompt=cfg.data.system_prompt)
        self.held_out = fit_questions_to_context(
            held_out[: cfg.eval.num_examples], self.tokenizer, what="held-out questions",
            fix="lower config.eval.max_tokens, use a model with a longer context, or set "
                "config.data.skip_invalid=True to skip these prompts (counted in the log)",
            **fit)
        self.eval_sets = {
            name: fit_questions_to_context(
                examples[: cfg.eval.num_examples], self.tokenizer,
                what=f"eval set {name} (config.eval.sets)",
                fix="lower config.eval.max_tokens or set config.data.skip_invalid=True", **fit)
            for name, examples in load_eval_sets(cfg).items()}
        self.it = self._iterator(pairs, context)
        _say(f"SFT data: {describe_cuts(self.it.stats)}")
        # The rows the pipeline kept (truncate="drop" may have dropped some) set an epoch;
        # packed, the rows they fill.
        if cfg.train.packing:
            self.num_rows = self.it.rows_per_epoch
            _say(f"SFT packing: {self.it.fingerprint['num_examples']} sequences in "
                 f"{self.num_rows} rows of {max(cfg.train.seq_buckets)} positions per epoch "
                 f"({self.it.stats['packed_fill']:.0%} filled)")
        else:
            self.num_rows = self.it.fingerprint["num_examples"]
        self.steps = train_steps(cfg.train, self.num_rows)
        tx, self.schedule = make_optimizer(optim.optim_config(cfg.optim, self.steps))
        self.trainer = Trainer.create(model, tx, sft_loss_fn(cfg.train.loss_chunk_size,
                                                             cfg.train.normalize_constant),
                                      self.mesh, dropout_seed=cfg.seed)
        self.run = rundir.RunState(cfg, run_dir)
        self.engine = None  # built at the first validation
        # A chat turn ends at the template's end-of-turn token (<|im_end|>); r1_zero at
        # </answer>.
        stop = evaluation.default_stop(cfg.data.template, cfg.data.reward)
        self.sampling = SamplingParams(temperature=cfg.eval.temperature,
                                       max_tokens=cfg.eval.max_tokens, stop=stop,
                                       include_stop_str_in_output=bool(stop), seed=cfg.seed)

    def _iterator(self, pairs, context: int):
        t = self.cfg.train
        try:
            return sft_iterator(pairs, self.tokenizer, batch_size=t.batch_size,
                                grad_accum_steps=self.cfg.optim.grad_accum_steps,
                                seq_buckets=t.seq_buckets, seed=self.cfg.seed,
                                truncate=t.truncate, packing=t.packing)
        except ValueError as e:
            if t.truncate != "error":
                raise
            raise ConfigError(
                f"config.train.truncate='error' cuts no row, and {e}: widen config.train."
                f"seq_buckets (the largest at most max_position_embeddings={context}) or set "
                "config.train.truncate=drop or right (counted in the log)") from None

    def iterators(self) -> dict[str, Any]:
        return {"train": self.it}

    def step(self, step: int) -> dict[str, float]:
        metrics = sft_step(self.trainer, self.it, self.cfg.optim.grad_accum_steps)
        metrics["lr"] = float(self.schedule(step - 1))
        return {f"train/{k}": v for k, v in metrics.items()}

    def evaluate(self, step: int) -> dict[str, float]:
        if not self.held_out and not self.eval_sets:
            return {}
        if self.engine is None:
            self.engine = JaxEngine(self.trainer.sampling_model(), self.tokenizer, self.mesh,
                                    max_batch_size=self.cfg.eval.batch_size)
        self.engine.update_weights(self.trainer.sampling_model())  # LoRA: adapters merged
        cfg = self.cfg
        metrics, records = evaluation.validate_all(
            self.engine, self.held_out, self.eval_sets, template=cfg.data.template,
            reward=self.reward, sampling=self.sampling, num_workers=cfg.eval.num_workers,
            system_prompt=cfg.data.system_prompt)
        rundir.write_all_generations(self.run_dir, step, records, cfg.log.num_generations,
                                     self.run.logger)
        self.run.log(step, metrics)
        return metrics

    def eval_at_start(self) -> bool:
        return self.cfg.eval.at_start

    def progress(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{metrics['train/loss']:.3f}"}

    def panels(self) -> list[tuple[str, list[str]]]:
        return [("loss", ["train/loss"]), ("entropy", ["train/entropy"]),
                ("held-out reward", ["eval/answer_reward", "eval/format_reward",
                                     *[f"eval/{n}/answer_reward" for n in self.eval_sets]])]

    def held_out_label(self) -> str:
        return f"held-out (n={len(self.held_out)})"

    def summary(self, eval_before: dict, eval_after: dict, last: dict) -> dict[str, Any]:
        return {
            "epochs": self.steps * self.cfg.train.batch_size / self.num_rows,
            "final_train_loss": last.get("train/loss"),
            "eval_before_format": eval_before.get("eval/format_reward"),
            "eval_after_format": eval_after.get("eval/format_reward"),
            "eval_after_sets": {n: eval_after.get(f"eval/{n}/answer_reward")
                                for n in self.eval_sets},
        }


def run(cfg: ml_collections.ConfigDict, run_dir: Path) -> dict[str, Any]:
    """SFT as configured; returns the summary (also written to ``summary.json``)."""
    started = time.time()  # the set-up (model, data, warm start) counts in wall_time_s
    return drive(SFT(cfg, run_dir), started)

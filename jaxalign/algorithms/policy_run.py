"""What GRPO and Expert Iteration share: the policy, questions, rollouts, rewards, validation.

``PolicyRun`` builds, from a config:

* the mesh, the policy and its tokenizer (``jaxalign.models.build``), and for
  the demo a short SFT warm start on generated traces (``warmstart.sft_steps``);
* the training questions as a resumable grain iterator, and the held-out set;
* the rollout engine (the in-process ``JaxEngine`` or HTTP sidecars) once the subclass has
  its trainer (``start_engine``);
* the reward: ``data.reward`` (a spec: ``"r1_zero"``, ``"my_rewards:fn"``,
  ``"r1_zero + 0.1*my_rewards:length_penalty"``; ``jaxalign.verify.rewards``) resolved once
  into ``self.reward``, the callable that scores rollouts and held-out samples;
* ``rollout(step, n)``: a batch of questions -> ``n`` samples each -> verifier rewards, as
  a ``Rollouts`` record (questions, completions, scores, timings), with sampling seeded by
  the step so a resumed run samples what it would have;
* ``evaluate(step)``: held-out rewards, logged and written to ``generations.jsonl``.

Multi-process: each process draws its own share of the step's questions, samples it with
its own engine (the ``JaxEngine`` on its local devices, or its requests to the sidecars)
and scores it; then the shares are all-gathered (host data: token ids, log-probs,
rewards), so every process holds the whole step's rollouts in the one-process order.
Advantages, batch widths and metrics are then computed identically everywhere, and the
train step feeds each device its rows of that global batch. With the ``JaxEngine`` each
row's random stream is fixed by its place in the global batch, so P processes sample
exactly what one process would. Validation runs on every process (the same prompts and
seeds, so the same result); only process 0 writes it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
import urllib.parse
from pathlib import Path
from typing import Any

import jax
import ml_collections

from jaxalign import distributed, evaluation, optim, rundir, sharding
from jaxalign.algorithms import sft
from jaxalign.algorithms.driver import Algorithm
from jaxalign.checkpoint import Checkpointer
from jaxalign.config import ConfigError, check, check_micro_batch
from jaxalign.data import datasets, synthetic
from jaxalign.data.pipeline import make_example_iterator
from jaxalign.data.prompts import build_prompt
from jaxalign.logging import MetricsLogger
from jaxalign.models import build
from jaxalign.optim import make_optimizer
from jaxalign.rollout import Completion, JaxEngine, SamplingParams
from jaxalign.rollout.client import SidecarEngine, gpus_shared_with_sidecars
from jaxalign.trainer import Trainer
from jaxalign.verify import RewardSpecError, resolve_reward

logger = logging.getLogger(__name__)


def load_questions(data: ml_collections.ConfigDict):
    """``(train, held_out)`` lists of ``MathExample`` for ``data.source``.

    ``synthetic``: generated arithmetic problems; ``gsm8k``: GSM8K train / test;
    ``math``: questions from ``data.train_file``, MATH500 held out; a JSONL path: its rows,
    no held-out set. A training file may be MATH- or GSM8K-shaped: only a question
    (``problem`` or ``question``) and an answer (``answer``, GSM8K's ``#### N``, or the last
    ``\\boxed{}`` of ``solution``) are required (``datasets.load_problems``); which fields
    were used is printed.
    """
    if data.source == "synthetic":
        return synthetic.split_problems(data.num_train, data.num_eval, data.seed,
                                          **data.synthetic.to_dict())
    if data.source == "gsm8k":
        train = datasets.load_benchmark("gsm8k", data.data_dir, "train",
                                        skip_invalid=data.skip_invalid)
        held_out = datasets.load_benchmark("gsm8k", data.data_dir, "test")
    else:
        # data.source='math': MATH500 is held out; MATH train is not in ../shared/data, so the
        # user supplies it. A JSONL source: its rows, nothing held out.
        field, path = _problem_file(data)
        check(bool(path), "data.source='math' needs data.train_file (a JSONL of problems)")
        train, fields = datasets.load_problem_source(
            path, fields=datasets.parse_field_map(data.fields), split=data.split,
            skip_invalid=data.skip_invalid)
        line = f"{field} {path}: {len(train)} problems, {datasets.describe_fields(fields)}"
        logger.info(line)
        if jax.process_index() == 0:
            print(line)
        held_out = (datasets.load_benchmark("math500", data.data_dir, "test")
                    if data.source == "math" else [])
    if data.num_train:
        train = train[: data.num_train]
    return train, held_out[: data.num_eval]


def _problem_file(data: ml_collections.ConfigDict) -> tuple[str, str]:
    """``(config field, path)`` of the JSONL of training problems a data block names."""
    if data.source == "math":
        return "train_file", data.train_file
    return "source", data.source


def check_gpus_apart(engine) -> None:
    """Refuses sidecars on this host that compute on a GPU this trainer uses too
    (``client.gpus_shared_with_sidecars``; only a GPU trainer can clash). ``ConfigError``
    with what to change, on every process when any host clashes; the engine is closed
    first."""
    if jax.default_backend() != "gpu":
        return
    clashes = gpus_shared_with_sidecars(
        engine.health(), trainer_visible=os.environ.get("CUDA_VISIBLE_DEVICES"),
        trainer_gpus=jax.local_device_count(), is_local=_is_this_host)
    if jax.process_count() > 1:  # every process stops, not just the one whose host clashes
        clashes = [c for host in distributed.allgather_objects(clashes) for c in host]
    if clashes:
        engine.close()
        raise ConfigError(
            f"config.engine.urls: {'; '.join(clashes)}. Give each its own GPUs: start the "
            "trainer with CUDA_VISIBLE_DEVICES set to the others (e.g. CUDA_VISIBLE_DEVICES=0 "
            "python -m jaxalign.train ..., the sidecar with launch/sidecar.sh --gpus 1)")


def sidecar_urls(urls: str) -> list[str]:
    """``config.engine.urls`` (comma-separated) as a list."""
    return [u.strip() for u in urls.split(",") if u.strip()]


def _is_this_host(url: str) -> bool:
    """Whether a sidecar URL names this machine (loopback, its host name or one of its IPs)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    names = {"localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()}
    try:
        names.update(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    return host in names or host.startswith("127.")

# config.engine.group_by_length -> JaxEngine(group_by_length=...)
GROUP_BY_LENGTH = {"auto": None, "on": True, "off": False}


def validate_rollout_config(cfg: ml_collections.ConfigDict) -> None:
    """Checks of the blocks GRPO and EI share: data, sampling, engine, warm start."""
    s = cfg.sampling
    check(s.max_tokens >= 1 and 0 <= s.min_tokens <= s.max_tokens,
          f"config.sampling: need 1 <= max_tokens and 0 <= min_tokens <= max_tokens "
          f"(got {s.min_tokens}, {s.max_tokens})")
    check(s.temperature >= 0, f"config.sampling.temperature={s.temperature} must be >= 0")
    check(cfg.engine.backend in ("jax", "sidecar"),
          f"config.engine.backend={cfg.engine.backend!r}; choose 'jax' or 'sidecar'")
    check(cfg.engine.group_by_length in GROUP_BY_LENGTH,
          f"config.engine.group_by_length={cfg.engine.group_by_length!r}; choose one of "
          f"{', '.join(GROUP_BY_LENGTH)}")
    if cfg.engine.backend == "sidecar":
        check(bool(cfg.engine.urls), "config.engine.backend='sidecar' needs config.engine.urls "
              "(comma-separated http://host:port of running sidecars; see launch/sidecar.sh)")
        remote = [u for u in sidecar_urls(cfg.engine.urls) if not _is_this_host(u)]
        check(bool(cfg.engine.export_dir) or not remote,
              f"config.engine.urls has sidecars on other hosts ({', '.join(remote)}); they "
              "cannot read this machine's /dev/shm, where the weights go by default: set "
              "config.engine.export_dir to a directory every sidecar host reads (a shared "
              "filesystem; the same path on every host), and start those sidecars with "
              "--weights-root on it (they load weights only from under that root)")
    try:  # imports a user reward's module now, before the model loads
        resolve_reward(cfg.data.reward)
    except RewardSpecError as e:
        raise ConfigError(f"config.data.reward={cfg.data.reward!r}: {e}") from None
    check(cfg.data.source in ("synthetic", "gsm8k", "math") or Path(cfg.data.source).is_file()
          or cfg.data.source.startswith(datasets.HF_PREFIX),
          f"config.data.source={cfg.data.source!r}: 'synthetic', 'gsm8k', 'math', a JSONL file "
          f"or hf:NAME[:CONFIG] (a Hugging Face dataset: Hub id or local folder)")
    if cfg.data.source in ("gsm8k", "math"):
        check(Path(cfg.data.data_dir).is_dir(),
              f"config.data.data_dir={cfg.data.data_dir!r} not found (the folder holding "
              "gsm8k/ and math500/, e.g. ../shared/data)")
    if cfg.data.source == "math":
        check(bool(cfg.data.train_file) and (Path(cfg.data.train_file).is_file()
                                             or cfg.data.train_file.startswith(
                                                 datasets.HF_PREFIX)),
              f"config.data.source='math' needs config.data.train_file, a JSONL of training "
              f"problems: a question ('problem' or 'question') and an answer ('answer', or "
              f"'solution' with \\boxed{{}}) per row (got {cfg.data.train_file!r})")
    if cfg.data.source not in ("synthetic", "gsm8k"):
        # Read the file's first row now, not after the model has loaded: a file without a
        # question or an answer field is known here.
        field, path = _problem_file(cfg.data)
        try:
            fields = datasets.parse_field_map(cfg.data.fields)
        except ValueError as e:
            raise ConfigError(f"config.data.{e}") from None
        try:
            datasets.problem_source_fields(path, fields=fields, split=cfg.data.split,
                                           skip_invalid=cfg.data.skip_invalid)
        except datasets.DataError as e:
            hint = "" if fields or isinstance(e, datasets.SourceUnavailable) else (
                " (other field names: map them with config.data.fields=question=F,answer=F)")
            raise ConfigError(f"config.data.{field}={path!r}: {e}{hint}") from None
    elif cfg.data.fields:
        raise ConfigError(f"config.data.fields={cfg.data.fields!r} maps the fields of a JSONL "
                          f"or hf: source; data.source={cfg.data.source!r} has its own")
    sft.check_chat_template_config(cfg)
    if cfg.data.template == "chat":
        check("<|im_end|>" in cfg.sampling.stop,
              f"config.data.template='chat': responses end with the chat template's "
              f"end-of-turn; add it to config.sampling.stop (e.g. --config.sampling.stop="
              f"\"('<|im_end|>',)\"; got {tuple(cfg.sampling.stop)})")
    sft.check_eval_sets(cfg)
    if cfg.warmstart.sft_steps:
        check(cfg.data.source == "synthetic",
              "config.warmstart.sft_steps > 0 needs data.source='synthetic' (it trains on "
              "generated traces); real runs start from a checkpoint: set warmstart.sft_steps=0")
        check_micro_batch(cfg, "warmstart.batch_size", cfg.warmstart.batch_size)


@dataclasses.dataclass
class Rollouts:
    """One step's rollouts, group-major: the ``n`` samples of a question are consecutive.

    Attributes:
        questions: ``[G]`` the questions (``MathExample``).
        completions: ``[G * n]`` the engine's ``Completion`` (token ids, log-probs, text).
        scores: ``[G * n]`` the reward's dicts (``reward``, ``answer_reward``, ...).
        times: seconds spent: ``generate_s``, ``score_s``, ``gather_s`` (multi-process).
    """

    questions: list
    completions: list[Completion]
    scores: list[dict[str, float]]
    times: dict[str, float]

    @property
    def prompt_ids(self) -> list[list[int]]:
        """``[G * n]`` each rollout's prompt token ids."""
        return [c.prompt_token_ids for c in self.completions]

    def groups(self) -> list[Rollouts]:
        """One ``Rollouts`` per question (times are the whole step's, on each)."""
        n = len(self.completions) // len(self.questions)
        return [Rollouts([q], self.completions[k * n:(k + 1) * n],
                         self.scores[k * n:(k + 1) * n], self.times)
                for k, q in enumerate(self.questions)]

    @staticmethod
    def concat(parts: list[Rollouts], times: dict[str, float]) -> Rollouts:
        return Rollouts([q for p in parts for q in p.questions],
                        [c for p in parts for c in p.completions],
                        [sc for p in parts for sc in p.scores], times)


class PolicyRun(Algorithm):
    """The set-up of a rollout-based run; subclasses add a trainer and a step.

    Attributes:
        reward: the resolved ``data.reward`` (``jaxalign.verify.Reward``), resolved once here.
        policy: the starting model (after the warm start, if any).
        engine: the rollout engine (after ``start_engine``).
        questions: resumable iterator of ``prompts_per_step`` training questions.
        held_out: held-out ``MathExample`` rows.
        run: the run directory's ``jaxalign.rundir.RunState``.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, run_dir: Path, *, prompts_per_step: int):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.reward = resolve_reward(cfg.data.reward)
        self.mesh = sharding.mesh_from_config(cfg)
        self.policy, self.tokenizer = build.build_model_and_tokenizer(cfg.model, self.mesh,
                                                                      cfg.lora)
        self.train_questions, self.held_out = load_questions(cfg.data)
        self.eval_sets = sft.load_eval_sets(cfg)
        self._fit_to_context(cfg)
        check(len(self.train_questions) >= prompts_per_step,
              f"{len(self.train_questions)} training questions < the {prompts_per_step} "
              "prompts of one step")
        check(prompts_per_step % jax.process_count() == 0,
              f"the {prompts_per_step} questions of a step do not split evenly over the "
              f"{jax.process_count()} processes")
        self.run = rundir.RunState(cfg, run_dir)
        self.resuming = self.run.checkpointer.latest_step() is not None
        self.warmstart_result: dict[str, Any] = {}
        if cfg.warmstart.sft_steps and not self.resuming:
            self.policy = self._warm_start(self.policy)
        self.questions = make_example_iterator(
            self.train_questions, batch_size=prompts_per_step // jax.process_count(),
            seed=cfg.seed, num_epochs=None)
        self.engine = None

    def _fit_to_context(self, cfg: ml_collections.ConfigDict) -> None:
        """Holds the data to the policy's ``max_position_embeddings`` before anything compiles:
        prompt + ``sampling.max_tokens`` (the engine's samples and the trainer's forward over
        them), and the warm start's widths."""
        context = self.policy.config.max_position_embeddings
        fix = ("lower config.sampling.max_tokens, use a model with a longer context, or set "
               "config.data.skip_invalid=True to skip these prompts (counted in the log)")
        fit = dict(template=cfg.data.template, new_tokens=cfg.sampling.max_tokens,
                   context=context, skip=cfg.data.skip_invalid, fix=fix,
                   system_prompt=cfg.data.system_prompt)
        self.train_questions = sft.fit_questions_to_context(
            self.train_questions, self.tokenizer, what="training questions", **fit)
        self.held_out = sft.fit_questions_to_context(
            self.held_out, self.tokenizer, what="held-out questions", **fit)
        for name, examples in self.eval_sets.items():
            self.eval_sets[name] = sft.fit_questions_to_context(
                examples, self.tokenizer, what=f"eval set {name} (config.eval.sets)", **fit)
        if cfg.warmstart.sft_steps:
            sft.check_seq_buckets(cfg.warmstart.seq_buckets, context, "warmstart.seq_buckets")

    def _warm_start(self, model):
        """Short SFT on generated traces (the demo's starting policy); logs warmstart.jsonl.

        Checkpointed every ``warmstart.save_every`` steps and at its end (under
        ``warmstart_checkpoints/``): a run killed during the warm start, or after it but
        before the first checkpoint of the main loop, continues from there instead of
        starting again, and ``warmstart.jsonl`` keeps each step once.
        """
        w, accum = self.cfg.warmstart, self.cfg.optim.grad_accum_steps
        pairs = synthetic.sft_traces(self.train_questions, self.cfg.data.template,
                                     slip_rate=w.slip_rate, seed=self.cfg.seed)
        warm_optim = ml_collections.ConfigDict(dict(self.cfg.optim.to_dict(), lr=w.lr,
                                                    warmup_steps=w.warmup_steps, schedule="cosine"))
        tx, schedule = make_optimizer(optim.optim_config(warm_optim, w.sft_steps))
        # (under LoRA the warm start trains the adapters too: the base stays as built, so
        # every checkpoint of the run holds adapters only)
        trainer = Trainer.create(model, tx, sft.sft_loss_fn(), self.mesh,
                                 dropout_seed=self.cfg.seed)
        it = sft.sft_iterator(pairs, self.tokenizer, batch_size=w.batch_size,
                              grad_accum_steps=accum, seq_buckets=w.seq_buckets,
                              seed=self.cfg.seed)
        ckpt = Checkpointer(self.run.checkpoint_dir("warmstart_checkpoints"), max_to_keep=1,
                            save_every=w.save_every, async_save=self.cfg.checkpoint.async_save)
        start, done, elapsed = 0, {}, 0.0
        if ckpt.latest_step() is not None:
            trainer.params, trainer.opt_state, extra = ckpt.restore(trainer.params,
                                                                    trainer.opt_state)
            trainer.step = int(extra["trainer_step"])
            it.set_state(extra["data"]["train"])
            start, done = int(extra["step"]), extra.get("result", {})
            elapsed = float(extra.get("time_s", 0.0))
            if jax.process_index() == 0:
                print(f"warm start resumed from its checkpoint at step {start}")
        if jax.process_index() == 0:
            rundir.truncate_log(self.run_dir / "warmstart.jsonl", start)
        log = MetricsLogger(self.run_dir, wandb_mode="disabled", filename="warmstart.jsonl")
        t0 = time.time() - elapsed  # the warm start's wall time, over all attempts

        def save(step, iterator, result=None):
            ckpt.save(step, trainer.params, trainer.opt_state,
                      {"step": step, "trainer_step": trainer.step,
                       "data": {"train": iterator.get_state()}, "result": result or {},
                       "time_s": time.time() - t0})

        def on_step(step, iterator):
            if w.save_every and step % w.save_every == 0 and step != w.sft_steps:
                save(step, iterator)

        last = sft.run_sft_steps(trainer, it, steps=w.sft_steps, grad_accum_steps=accum,
                                 schedule=schedule, run=log, log_prefix="warmstart/",
                                 start=start, progress=self.cfg.log.progress, on_step=on_step)
        log.close()
        if not done:  # (a restart after the end finds the result in the last checkpoint)
            done = {"warmstart_loss": last["loss"],
                    "warmstart_time_s": round(time.time() - t0, 1)}
            save(w.sft_steps, it, done)
        ckpt.close()
        self.warmstart_result = done
        return trainer.model()

    def start_engine(self, model) -> None:
        """The rollout engine, holding ``model``'s weights: the trainer's model, under LoRA
        with its adapters (a JaxEngine merges them; a sidecar gets the adapter alone and
        applies it to the base it serves, its ``--model``)."""
        c = self.cfg.engine
        if c.backend == "sidecar":
            self.engine = SidecarEngine(sidecar_urls(c.urls), export_dir=c.export_dir or None)
            check_gpus_apart(self.engine)
            self.engine.update_weights(model)
            self.pad_id = self.tokenizer.pad_token_id
            if self.pad_id is None:
                self.pad_id = self.tokenizer.eos_token_id
            return
        self.engine = JaxEngine(model, self.tokenizer, self.mesh,
                                max_batch_size=c.max_batch_size, decode_chunk=c.decode_chunk,
                                group_by_length=GROUP_BY_LENGTH[c.group_by_length])
        self.pad_id = self.engine.pad_token_id

    def sampling_params(self, step: int, n: int, eval_: bool = False, attempt: int = 0):
        """Rollout sampling (seeded by the step; ``attempt`` > 0: a further round of the
        same step, seeded apart) or held-out sampling (``eval_``)."""
        s, e = self.cfg.sampling, self.cfg.eval
        if eval_:
            return SamplingParams(n=1, temperature=e.temperature, top_p=s.top_p,
                                  max_tokens=s.max_tokens, stop=tuple(s.stop),
                                  include_stop_str_in_output=True, seed=self.cfg.seed + 10**6)
        return SamplingParams(n=n, temperature=s.temperature, top_p=s.top_p,
                              max_tokens=s.max_tokens, min_tokens=s.min_tokens,
                              stop=tuple(s.stop), include_stop_str_in_output=True,
                              # < 2**31, what every engine and the sidecar take (the
                              # same seeds as before for config.seed < 21474)
                              seed=(self.cfg.seed * 100_003 + step
                                    + 1_000_000_007 * attempt) % 2**31)

    def rollout(self, step: int, n: int, attempt: int = 0) -> Rollouts:
        """The step's questions, ``n`` samples each, scored (``attempt`` > 0: a further
        round of questions for the same step, e.g. DAPO's dynamic sampling)."""
        questions = next(self.questions)  # this process's share
        prompts = [build_prompt(self.cfg.data.template, q.question, self.tokenizer,
                                system_prompt=self.cfg.data.system_prompt) for q in questions]
        params = self.sampling_params(step, n, attempt=attempt)
        t0 = time.perf_counter()
        if isinstance(self.engine, JaxEngine):  # rows seeded by their place in the step
            groups = self.engine.generate(prompts, params,
                                          prompt_offset=jax.process_index() * len(prompts))
        else:  # sidecars seed per request: keep the processes' requests apart
            params = dataclasses.replace(params, seed=(params.seed + 1_000_003
                                                       * jax.process_index()) % 2**31)
            groups = self.engine.generate(prompts, params)
        completions = [c for group in groups for c in group]
        t1 = time.perf_counter()
        answers = [q.answer for q in questions for _ in range(n)]
        scores = evaluation.score([c.text for c in completions], answers, self.reward,
                                  self.cfg.eval.num_workers)
        t2 = time.perf_counter()
        if jax.process_count() > 1:  # every process gets the whole step (module docstring)
            shares = distributed.allgather_objects((questions, completions, scores))
            questions = [q for share in shares for q in share[0]]
            completions = [c for share in shares for c in share[1]]
            scores = [sc for share in shares for sc in share[2]]
        return Rollouts(questions, completions, scores,
                        {"generate_s": t1 - t0, "score_s": t2 - t1,
                         "gather_s": time.perf_counter() - t2})

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out rewards of the engine's current weights: the data source's held-out set
        as ``eval/*``, each of ``eval.sets`` as ``eval/<name>/*`` (the same code as
        ``eval/evaluate.py``); sample generations of each to ``generations.jsonl``."""
        metrics, records = evaluation.validate_all(
            self.engine, self.held_out, self.eval_sets, template=self.cfg.data.template,
            reward=self.reward, sampling=self.sampling_params(step, 1, eval_=True),
            num_workers=self.cfg.eval.num_workers, system_prompt=self.cfg.data.system_prompt)
        rundir.write_all_generations(self.run_dir, step, records, self.cfg.log.num_generations,
                                     self.run.logger)
        if metrics:
            self.run.log(step, metrics)
        return metrics

    def eval_curves(self) -> list[str]:
        """The held-out answer-reward keys, for the reward plot."""
        return ["eval/answer_reward", *[f"eval/{name}/answer_reward" for name in self.eval_sets]]

    def eval_summary(self, metrics: dict[str, float]) -> dict[str, float | None]:
        """``{set name: answer reward}`` of ``eval.sets`` in ``metrics`` (for summary.json)."""
        return {name: metrics.get(f"eval/{name}/answer_reward") for name in self.eval_sets}

    # --- what the driver (jaxalign.algorithms.driver) asks of both loops -----------------

    save_at_start = True  # step 0 holds the warm-started policy: a resume never redoes it

    def iterators(self) -> dict[str, Any]:
        return {"questions": self.questions}

    def saved_state(self) -> dict[str, Any]:
        return {"warmstart": self.warmstart_result}

    def restore(self, extra: dict[str, Any]) -> None:
        self.engine.update_weights(self.trainer.model())
        self.warmstart_result = extra.get("warmstart", {})

    def held_out_label(self) -> str:
        return f"held-out (n={len(self.held_out)})"

    def summary(self, eval_before: dict, eval_after: dict, last: dict) -> dict[str, Any]:
        return {
            "eval_after_sets": self.eval_summary(eval_after),
            "eval_before_format": eval_before.get("eval/format_reward"),
            "eval_after_format": eval_after.get("eval/format_reward"),
            "num_eval_examples": len(self.held_out),
            **self.warmstart_result,
        }

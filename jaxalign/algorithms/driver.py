"""One driver for every algorithm: resume, periodic validation, checkpoints, HF export,
plots, ``summary.json`` and the before/after table.

An algorithm file holds only what is its own: a class with the attributes and methods of
``Algorithm`` (its set-up, one ``step``, its validation). ``drive`` runs any of them::

    resume from the latest checkpoint, or validate before training (and checkpoint step 0
        when the starting policy is itself the product of work: the demo's warm start)
    for step in start + 1 .. steps:
        metrics = algo.step(step) -> metrics.jsonl / wandb, progress bar, algo.after_step
        validate every eval.every steps and at the last step
        checkpoint every checkpoint.save_every steps and at the last (the validation before
            training and algo.saved_state() ride along, so a resumed run's summary has them)
    export hf/ (and, under LoRA, adapter/), plot the curves, write summary.json, print the
        table

A run restarted after its last step trains nothing, validates the final weights again and
rewrites its summary.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
from tqdm import tqdm

from jaxalign import rundir


class Algorithm:
    """What ``drive`` needs of an algorithm; subclasses set the attributes in ``__init__``.

    Attributes:
        name: ``summary.json``'s ``algorithm`` ("grpo").
        title: the progress bar's and the table's name ("GRPO").
        steps_key: ``summary.json``'s name for the number of steps.
        save_at_start: checkpoint step 0 before the first step (the warm-started policy).
        eval_key: the ``eval/<key>`` metric summarised as ``eval_before`` / ``eval_after``.
        table_rows: ``(label, eval metric key)`` rows of the before/after table.
        cfg, run_dir, run (``rundir.RunState``), trainer, tokenizer, steps.
    """

    name = "algorithm"
    title = "Algorithm"
    steps_key = "steps"
    save_at_start = False
    eval_key = "answer_reward"
    table_rows: tuple[tuple[str, str], ...] = (("answer reward", "answer_reward"),
                                               ("format reward", "format_reward"))

    cfg: ml_collections.ConfigDict
    run_dir: Path
    run: rundir.RunState
    trainer: Any
    tokenizer: Any
    steps: int

    def iterators(self) -> dict[str, Any]:
        """The resumable data iterators a checkpoint stores (``get_state`` / ``set_state``)."""
        raise NotImplementedError

    def step(self, step: int) -> dict[str, float]:
        """One step (``step`` counts from 1); returns its metrics (logged by the driver)."""
        raise NotImplementedError

    def evaluate(self, step: int) -> dict[str, float]:
        """Validation of the current weights, logged by the algorithm; ``{}`` if none."""
        raise NotImplementedError

    def eval_at_start(self) -> bool:
        return True

    def saved_state(self) -> dict[str, Any]:
        """Saved with every checkpoint, handed back to ``restore``."""
        return {}

    def restore(self, extra: dict[str, Any]) -> None:
        """After a resume: ``extra`` is what the checkpoint saved."""

    def progress(self, metrics: dict[str, float]) -> dict[str, str]:
        """The progress bar's postfix."""
        return {}

    def after_step(self, step: int, metrics: dict[str, float]) -> None:
        """Checks after each step (e.g. GRPO's health warnings)."""

    def panels(self) -> list[tuple[str, list[str]]]:
        """``(title, metric keys)`` of ``metrics.png``."""
        return []

    def summary(self, eval_before: dict, eval_after: dict, last: dict) -> dict[str, Any]:
        """The algorithm's own fields of ``summary.json``."""
        return {}

    def held_out_label(self) -> str:
        """The table's first column header, e.g. ``held-out (n=64)``."""
        return "held-out"


def drive(algo: Algorithm, started: float | None = None) -> dict[str, Any]:
    """Runs ``algo`` from its latest checkpoint (or the start) to ``algo.steps``; returns the
    summary (also written to ``summary.json``). ``started``: the ``time.time()`` the run
    began (before ``algo`` was built: its set-up, e.g. the demo's warm start, counts in
    ``wall_time_s``)."""
    t0 = time.time() if started is None else started
    cfg, run, steps = algo.cfg, algo.run, algo.steps
    main = jax.process_index() == 0
    extra = run.resume(algo.trainer, algo.iterators())
    start = int(extra["step"]) if extra else 0
    if extra:
        eval_before = extra.get("eval_before", {})
        algo.restore(extra)
    else:
        eval_before = algo.evaluate(0) if algo.eval_at_start() else {}
        if algo.save_at_start:
            run.save(0, algo.trainer, algo.iterators(), force=True, eval_before=eval_before,
                     **algo.saved_state())
    if main and eval_before and algo.table_rows:
        label, key = algo.table_rows[0]
        if f"eval/{key}" in eval_before:
            print(f"held-out {label} before {algo.title}: {eval_before[f'eval/{key}']:.3f}")

    bar = tqdm(range(start + 1, steps + 1), desc=algo.title.lower(), initial=start,
               total=steps, disable=not (cfg.log.progress and main))
    last: dict[str, float] = {}
    eval_after: dict[str, float] = {}
    for step in bar:
        last = algo.step(step)
        run.log(step, last)
        bar.set_postfix(algo.progress(last))
        algo.after_step(step, last)
        if step == steps or (cfg.eval.every and step % cfg.eval.every == 0):
            eval_after = algo.evaluate(step)
        run.save(step, algo.trainer, algo.iterators(), force=step == steps,
                 eval_before=eval_before, **algo.saved_state())
    if not eval_after and start >= steps:  # restarted after the end: report it again
        eval_after = algo.evaluate(steps)
    if cfg.checkpoint.export_hf:
        # (a LoRA model is written merged: save_pretrained folds the adapters in)
        rundir.export_hf(algo.trainer.model(), algo.tokenizer, Path(algo.run_dir) / "hf")
        if algo.trainer.is_lora:  # and the adapter alone, in PEFT's format
            rundir.export_adapter(algo.trainer.model(), Path(algo.run_dir) / "adapter",
                                  base=cfg.model.path or None)
    panels = algo.panels()
    if panels:
        rundir.plot_metrics(algo.run_dir, panels)
    run.close()
    key = f"eval/{algo.eval_key}"
    summary = {
        "algorithm": algo.name,
        algo.steps_key: steps,
        "resumed_from": start,
        "eval_before": eval_before.get(key),
        "eval_after": eval_after.get(key),
        **algo.summary(eval_before, eval_after, last),
        "wall_time_s": round(time.time() - t0, 1),
        "run_dir": str(algo.run_dir),
    }
    rundir.write_summary(algo.run_dir, summary)
    if main:
        print_table(algo, eval_before, eval_after, summary)
    return summary


def print_table(algo: Algorithm, eval_before: dict, eval_after: dict,
                summary: dict[str, Any]) -> None:
    """The before/after table a person reads at the end of a run."""

    def fmt(metrics: dict, key: str) -> str:
        value = metrics.get(f"eval/{key}")
        return "-" if value is None else f"{value:.3f}"

    print()
    print(f"| {algo.held_out_label()} | before {algo.title} | after {algo.title} |")
    print("|---|---|---|")
    for label, key in algo.table_rows:
        print(f"| {label} | {fmt(eval_before, key)} | {fmt(eval_after, key)} |")
    print(f"{algo.title} steps: {algo.steps}, wall time {summary['wall_time_s']} s, "
          f"run dir {summary['run_dir']}")


class Stopwatch:
    """Wall time by phase: ``lap(name)`` records the seconds since the previous lap."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self.last
        self.last = now

    def total(self) -> float:
        return time.perf_counter() - self.start

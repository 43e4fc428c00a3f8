"""What every training loop shares: model + tokenizer, optimizer, log-probs, run state, validation.

The loops in this package (``sft``, ``expert_iteration``, ``grpo``) read top to bottom;
the plumbing they have in common lives here, once:

* ``build_model_and_tokenizer``: a HF checkpoint (path or hub id) or a random preset with
  the locally built byte tokenizer (no download).
* ``optim_config``: the ``optim`` block of a config -> ``jaxalign.optim.OptimConfig``.
* ``policy_log_probs``: per-token log-probs (and entropies) of a batch, chunked over the
  vocabulary projection when configured, so ``[B, T, V]`` float32 logits never exist whole.
* ``RunState``: the run directory's metrics logger, checkpointer and step clock; resumes
  from the latest checkpoint. A remote (``gs://``) workdir is staged locally
  (``staging_dir``) and copied up after every checkpoint (``sync_up``).
* ``validate``: held-out answer reward with a rollout engine and the shared verifier.
* ``write_generations`` and ``plot_metrics``: what a person reads after a run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxalign import losses
from jaxalign.optim import OptimConfig

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config value that cannot work; the message says what to change."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# --- the config blocks every algorithm shares ------------------------------------------


def base_config(name: str, algorithm: str) -> ml_collections.ConfigDict:
    """The blocks every ``configs/*.py`` starts from; each field's one default is here.

    Blocks: ``model`` (checkpoint path or random preset, dtypes, attention, remat),
    ``mesh`` (data x fsdp x tensor; one may be -1), ``optim`` (AdamW + schedule),
    ``checkpoint`` and ``log``. Algorithms add ``data``, ``train`` and their own blocks.
    """
    c = ml_collections.ConfigDict()
    c.name = name
    c.algorithm = algorithm
    c.workdir = ""  # default: runs/<name>-<timestamp>
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    # A checkpoint (HF directory or hub id). When set it wins: ``preset`` and ``arch``, which
    # only shape a random model, are ignored, so ``--config.model.path=...`` alone switches
    # any config from its random model to a real one.
    c.model.path = ""
    c.model.preset = "tiny"  # random model with the byte tokenizer: tiny | small
    c.model.arch = ml_collections.ConfigDict()  # preset overrides, e.g. num_hidden_layers
    c.model.seed = 0
    c.model.dtype = "float32"  # compute dtype
    c.model.param_dtype = "float32"  # master weights
    c.model.attention_impl = "xla"  # xla | dot_product | cudnn
    c.model.remat = "none"  # none | full | save_dots

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1  # -1: all devices the other axes leave
    c.mesh.tensor = 1

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-5
    c.optim.lr_min = 0.0
    c.optim.warmup_steps = -1  # -1: use warmup_ratio
    c.optim.warmup_ratio = 0.0
    c.optim.schedule = "cosine"  # cosine | constant
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 1.0  # 0 disables
    c.optim.grad_accum_steps = 1

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.save_every = 100  # optimizer steps; the last step is always saved; 0: only it
    c.checkpoint.max_to_keep = 2
    c.checkpoint.async_save = True
    c.checkpoint.export_hf = True  # write the final policy as a HF directory (run_dir/hf)

    c.log = ml_collections.ConfigDict()
    c.log.wandb_mode = "offline"  # offline | online | disabled
    c.log.wandb_project = "jaxalign"
    c.log.num_generations = 8  # validation samples written to generations.jsonl per eval
    c.log.progress = True  # tqdm bar (process 0)
    return c


def demo_task(c: ml_collections.ConfigDict) -> None:
    """The CPU demo's policy, task and warm start, shared by ``configs/grpo.py`` and
    ``configs/ei.py`` so both start from the same SFT policy.

    Two-operation problems; the warm start imitates traces whose ``<answer>`` slips in half
    of the rows (``jaxalign/data/synthetic.py``): the SFT policy computes well but copies
    its result into ``<answer>`` unreliably, which only the verifier's reward can fix.
    """
    c.data.synthetic.max_steps = 2
    c.data.num_eval = 512
    c.model.preset = "small"
    c.model.arch = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                        max_position_embeddings=256)
    c.warmstart.sft_steps = 1000
    c.warmstart.batch_size = 32
    c.warmstart.slip_rate = 0.5


def qwen2p5_math_1p5b_model(c: ml_collections.ConfigDict) -> None:
    """Qwen2.5-Math-1.5B for one GPU: bf16 compute, cuDNN attention, per-layer remat,
    chunked vocabulary projection (the real presets of every config share this)."""
    c.model.preset = ""
    c.model.path = "Qwen/Qwen2.5-Math-1.5B"
    c.model.dtype = "bfloat16"
    c.model.attention_impl = "cudnn"
    c.model.remat = "full"
    c.train.loss_chunk_size = 512


def validate_common(cfg: ml_collections.ConfigDict, known_algorithms) -> None:
    """Checks every algorithm shares, before anything is compiled."""
    check(cfg.algorithm in known_algorithms,
          f"config.algorithm={cfg.algorithm!r}; choose one of {sorted(known_algorithms)}")
    m = cfg.model
    check(bool(m.path) or bool(m.preset),
          "set config.model.path (HF directory or hub id) or config.model.preset (a random "
          "model: 'tiny' or 'small')")
    if m.path and not Path(m.path).exists() and (m.path.startswith((".", "/", "~"))
                                                 or m.path.count("/") != 1):
        raise ConfigError(f"config.model.path={m.path!r}: no such directory (and not a hub id)")
    check(m.preset in ("", "tiny", "small"),
          f"config.model.preset={m.preset!r}; choose 'tiny' or 'small' (or set model.path)")
    for field in ("dtype", "param_dtype"):
        check(getattr(m, field) in ("float32", "bfloat16", "float16"),
              f"config.model.{field}={getattr(m, field)!r}; choose float32, bfloat16 or float16")
    check(m.attention_impl in ("xla", "dot_product", "cudnn"),
          f"config.model.attention_impl={m.attention_impl!r}; choose xla, dot_product or cudnn")
    check(m.remat in ("none", "full", "save_dots"),
          f"config.model.remat={m.remat!r}; choose none, full or save_dots")
    n = jax.device_count()
    sizes = (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    check(sizes.count(-1) <= 1 and all(s == -1 or s >= 1 for s in sizes),
          f"config.mesh sizes {sizes}: each must be >= 1, and at most one may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        check(n % known == 0,
              f"config.mesh (data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]}): the fixed "
              f"axes ({known} devices) do not divide the {n} available devices")
    else:
        check(known == n,
              f"config.mesh (data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]}) needs {known} "
              f"devices but {n} are available: change the mesh sizes (one may be -1)")
    check(cfg.optim.lr > 0, f"config.optim.lr={cfg.optim.lr} must be > 0")
    check(cfg.optim.grad_accum_steps >= 1,
          f"config.optim.grad_accum_steps={cfg.optim.grad_accum_steps} must be >= 1")
    check(cfg.log.wandb_mode in ("offline", "online", "disabled"),
          f"config.log.wandb_mode={cfg.log.wandb_mode!r}; choose offline, online or disabled")


def check_micro_batch(cfg: ml_collections.ConfigDict, field: str, batch_size: int) -> None:
    """``config.<field>`` rows per optimizer step, cut into ``optim.grad_accum_steps``
    micro-batches, must split evenly over the processes and over the mesh's data-parallel
    devices (data x fsdp): each device takes whole rows of every micro-batch."""
    accum = cfg.optim.grad_accum_steps
    check(batch_size % accum == 0,
          f"config.{field}={batch_size} is not divisible by config.optim.grad_accum_steps="
          f"{accum}: change one so the micro-batch is whole")
    micro = batch_size // accum
    procs = jax.process_count()
    check(micro % procs == 0,
          f"micro-batch {micro} (config.{field} / optim.grad_accum_steps) is not divisible "
          f"by the {procs} processes")
    n = jax.device_count()
    sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    if n == 1 or sizes.count(-1) > 1:
        return  # one device: no split; a malformed mesh is reported by validate_common
    if -1 in sizes:
        sizes[sizes.index(-1)] = n // max(1, int(np.prod([s for s in sizes if s != -1])))
    data_parallel = sizes[0] * sizes[1]
    check(micro % data_parallel == 0,
          f"micro-batch {micro} (config.{field} / optim.grad_accum_steps) is not divisible by "
          f"the {data_parallel} data-parallel devices (mesh data x fsdp): change config."
          f"{field}, optim.grad_accum_steps or config.mesh")


def mesh_from_config(cfg: ml_collections.ConfigDict):
    """The (data, fsdp, tensor) mesh; None on a single device (plain jit, no shardings)."""
    from jaxalign import sharding

    if jax.device_count() == 1:
        return None
    return sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)


# --- model ----------------------------------------------------------------------------


def build_model_and_tokenizer(model_cfg: ml_collections.ConfigDict, mesh=None):
    """The policy and its tokenizer, from a checkpoint or a random preset.

    A preset builds a random Qwen2 with the locally built byte-level tokenizer (no download);
    ``model_cfg.arch`` overrides preset fields (e.g. ``num_hidden_layers``).
    """
    from jaxalign.models import from_pretrained, init_model, load_tokenizer, qwen2

    runtime: dict[str, Any] = dict(
        dtype=jnp.dtype(model_cfg.dtype),
        param_dtype=jnp.dtype(model_cfg.param_dtype),
        attention_impl=model_cfg.attention_impl,
        remat=model_cfg.remat,
    )
    if model_cfg.path:
        model = from_pretrained(model_cfg.path, mesh=mesh, **runtime)
        return model, load_tokenizer(model_cfg.path)
    from jaxalign.data.tokenizer import byte_tokenizer

    tokenizer = byte_tokenizer()
    presets = {"tiny": qwen2.tiny, "small": qwen2.small}
    check(model_cfg.preset in presets,
          f"config.model.preset={model_cfg.preset!r}; choose one of {sorted(presets)}")
    arch = dict(model_cfg.arch)
    cfg = presets[model_cfg.preset](vocab_size=len(tokenizer), **arch, **runtime)
    return init_model(cfg, seed=model_cfg.seed), tokenizer


def optim_config(c: ml_collections.ConfigDict, total_steps: int) -> OptimConfig:
    """``OptimConfig`` from a config's ``optim`` block; ``total_steps`` counts optimizer steps."""
    return OptimConfig(
        lr=c.lr,
        lr_min=c.lr_min,
        warmup_steps=None if c.warmup_steps < 0 else min(c.warmup_steps, total_steps),
        warmup_ratio=c.warmup_ratio,
        total_steps=max(total_steps, 1),
        schedule=c.schedule,
        b1=c.b1,
        b2=c.b2,
        eps=c.eps,
        weight_decay=c.weight_decay,
        grad_clip=c.grad_clip or None,
        grad_accum_steps=c.grad_accum_steps,
    )


def policy_log_probs(
    model, input_ids: jax.Array, labels: jax.Array, *, chunk_size: int = 0, entropy: bool = False
) -> dict[str, jax.Array]:
    """``{"log_probs": [B, T], "token_entropy"?: [B, T]}`` of ``labels`` under ``model``.

    Rows are right-padded (prompt + response + pad), so the causal mask alone keeps padding
    out of every real position: no attention mask is needed. With ``chunk_size > 0`` the
    vocabulary projection runs over chunks of that many positions
    (``losses.chunked_log_probs``; same values and gradients, bounded memory).
    """
    if chunk_size:
        hidden = model.hidden_states(input_ids)  # [B, T, D]
        return losses.chunked_log_probs(
            hidden, model.logits, labels, chunk_size=chunk_size, return_token_entropy=entropy
        )
    return losses.get_response_log_probs(model, input_ids, labels, return_token_entropy=entropy)


# --- run state: logging, checkpoints, resume -------------------------------------------


# --- run directory ----------------------------------------------------------------


# Where the files of a run with a remote (gs://) workdir live until they are copied up.
STAGING_ENV = "JAXALIGN_STAGING_DIR"


def is_remote(path: str) -> bool:
    """A URL such as ``gs://bucket/run`` (orbax writes there; plain ``open`` cannot)."""
    return "://" in path


def staging_dir(workdir: str) -> Path:
    """The local directory that holds a remote workdir's files during the run."""
    root = Path(os.environ.get(STAGING_ENV) or "/tmp/jaxalign-staging")
    tag = hashlib.sha1(workdir.encode()).hexdigest()[:8]
    return root / f"{workdir.rstrip('/').rsplit('/', 1)[-1]}-{tag}"


# Top-level entries of a run directory that copies leave out: orbax writes the checkpoints
# to the remote workdir itself; the HF export (GBs) goes up once, at the end.
SYNC_SKIP = ("checkpoints", "warmstart_checkpoints", "hf")


def copy_tree(src, dst, skip: tuple[str, ...] = ("checkpoints",), *,
              keep_larger: bool = False) -> int:
    """Copies the files under ``src`` to ``dst`` (local paths or URLs), except ``skip``.

    Args:
        keep_larger: leave a file alone where ``dst`` already holds one at least as large.
            A run's logs only grow, so when both sides have one the larger is the newer
            (a resumed run on the machine that staged it keeps its own, newer files).

    Returns:
        The number of files copied.
    """
    from etils import epath

    src, dst = epath.Path(src), epath.Path(dst)
    if not src.exists():
        return 0
    copied = 0
    for path in src.iterdir():  # (no rglob: epath refuses "**" for GCS)
        if path.name in skip:
            continue
        if path.is_dir():
            copied += copy_tree(path, dst / path.name, skip=(), keep_larger=keep_larger)
            continue
        target = dst / path.name
        if keep_larger and target.exists() and target.stat().length >= path.stat().length:
            continue
        dst.mkdir(parents=True, exist_ok=True)
        path.copy(target, overwrite=True)
        copied += 1
    return copied


def sync_up(run_dir, workdir: str) -> int:
    """Process 0 copies a remote workdir's staged files (logs, plots) up; the checkpoints
    and the HF export stay out. Called after every checkpoint save, so a preempted or
    killed run loses no logs that its checkpoint already covers."""
    if not (is_remote(workdir) and jax.process_index() == 0):
        return 0
    return copy_tree(run_dir, workdir, skip=SYNC_SKIP)


class RunState:
    """The run directory's logger and checkpointer, and the clock of a training loop.

    ``resume(trainer, data_iterators)`` restores the latest checkpoint (if any) into the
    trainer and iterators and returns the ``extra`` dict saved with it (step, RNG, ...). It
    also opens the metrics log, after dropping what a killed attempt logged past that
    checkpoint (``jaxalign.rundir.truncate_log``), so ``log`` works only after ``resume``.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, run_dir: Path):
        from jaxalign.checkpoint import Checkpointer

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.is_main = jax.process_index() == 0
        self.logger = None  # opened by resume()
        self.checkpointer = Checkpointer(
            self.checkpoint_dir("checkpoints"),
            max_to_keep=cfg.checkpoint.max_to_keep,
            save_every=cfg.checkpoint.save_every,
            async_save=cfg.checkpoint.async_save,
        )
        self.start_time = time.time()

    def checkpoint_dir(self, name: str):
        """Where checkpoints called ``name`` go: under a remote (gs://) workdir itself (orbax
        writes there, collectively; the other files are staged in run_dir and copied up by
        ``sync_up``), else under the run directory."""
        if is_remote(self.cfg.workdir):
            return self.cfg.workdir.rstrip("/") + "/" + name
        return self.run_dir / name

    def resume(self, trainer, iterators: dict[str, Any]) -> dict[str, Any] | None:
        """Loads the latest checkpoint into ``trainer`` and ``iterators``; None if there is none.

        Raises:
            ConfigError: the checkpoint does not fit this run's model or optimizer (nothing
                in the run directory has been changed).
        """
        from jaxalign import rundir

        step = self.checkpointer.latest_step()
        if step is None:
            self._open_log(last_step=-1)  # a fresh start: nothing logged before counts
            return None
        try:
            params, opt_state, extra = self.checkpointer.restore(trainer.params,
                                                                 trainer.opt_state)
        except Exception as e:  # orbax: a shape, dtype or tree-structure mismatch
            lines = str(e).strip().splitlines() or [type(e).__name__]
            raise ConfigError(
                f"checkpoint step {step} in {self.checkpointer.directory} does not fit this "
                f"config ({lines[0][:300]}). Nothing in the run directory was changed: resume "
                "with the config the run was started with (its config.json), or set "
                "config.workdir to a new directory") from None
        trainer.params, trainer.opt_state = params, opt_state
        trainer.step = int(extra["trainer_step"])
        for name, it in iterators.items():
            it.set_state(extra["data"][name])
        logger.info("resumed from %s step %d", self.checkpointer.directory, step)
        self._open_log(last_step=step)
        if self.is_main:
            rundir.record_resume(self.run_dir, self.cfg.to_dict(), step)
            print(f"resumed from checkpoint step {step} in {self.checkpointer.directory}")
        return extra

    def _open_log(self, last_step: int) -> None:
        """Drops the records past ``last_step`` (a killed attempt's), then opens the log."""
        from jaxalign import rundir
        from jaxalign.logging import MetricsLogger

        if self.is_main:
            for name in ("metrics.jsonl", "generations.jsonl"):
                dropped = rundir.truncate_log(self.run_dir / name, last_step)
                if dropped:
                    logger.warning("%s: dropped %d records logged after step %d by the "
                                   "attempt that was stopped; they are logged again", name,
                                   dropped, last_step)
        cfg = self.cfg
        self.logger = MetricsLogger(
            self.run_dir,
            wandb_mode=cfg.log.wandb_mode,
            wandb_project=cfg.log.wandb_project,
            run_name=self.run_dir.name,
            config=cfg.to_dict(),
        )

    def save(self, step: int, trainer, iterators: dict[str, Any], *, force: bool = False,
             **extra: Any) -> None:
        """Saves at ``step`` every ``checkpoint.save_every`` steps (or when ``force``).

        Raises:
            CheckpointError: this save or the one before it failed (the loop stops; the
                last good checkpoint is left as it is).
        """
        every = self.cfg.checkpoint.save_every
        if not force and (every <= 0 or step % every):
            return
        if step in self.checkpointer.all_steps():
            return
        state = {
            "step": step,
            "trainer_step": trainer.step,
            "data": {name: it.get_state() for name, it in iterators.items()},
            **extra,
        }
        self.checkpointer.save(step, trainer.params, trainer.opt_state, state)
        try:  # a remote workdir: the logs go up too
            sync_up(self.run_dir, self.cfg.workdir)
        except Exception as e:  # a storage hiccup must not end the run: retried next save
            logger.warning("copying the logs to %s failed (%s: %s); retried at the next "
                           "checkpoint", self.cfg.workdir, type(e).__name__, e)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self.logger is None:
            raise RuntimeError("RunState.log before RunState.resume: resume() decides which "
                               "logged steps stand and opens the log")
        self.logger.log(step, {k: _scalar(v) for k, v in metrics.items()})

    def close(self) -> None:
        self.checkpointer.close()
        if self.logger is not None:
            self.logger.close()


def _scalar(v: Any) -> Any:
    if isinstance(v, jax.Array | np.ndarray | np.generic):
        return float(np.asarray(v))
    return v


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """``summary.json`` of a run (process 0)."""
    if jax.process_index() == 0:
        (Path(run_dir) / "summary.json").write_text(json.dumps(summary, indent=2))


def export_hf(model, tokenizer, out_dir: str | os.PathLike, dtype=None) -> Path | None:
    """Writes the model as a HF directory; returns it (on process 0, else None).

    Every process calls this: ``save_pretrained`` gathers sharded parameters from all of
    them (a collective) and only process 0 writes files.
    """
    from jaxalign.models import save_pretrained

    save_pretrained(model, out_dir, tokenizer=tokenizer, dtype=dtype)
    return Path(out_dir) if jax.process_index() == 0 else None


# --- validation -----------------------------------------------------------------------


def reward_function(name: str) -> Callable[..., dict]:
    """The verifier reward that goes with a prompt template (``evaluation.REWARDS``)."""
    from jaxalign.evaluation import REWARDS

    return REWARDS[name]


def score(responses: Sequence[str], answers: Sequence[Any], reward: str, num_workers: int):
    """Verifier rewards (dicts with ``reward``, ``format_reward``, ``answer_reward``)."""
    from jaxalign.verify import score_batch

    return score_batch(list(responses), list(answers), reward_function(reward),
                       num_workers=num_workers)


def validate(
    engine,
    examples: Sequence,
    *,
    template: str,
    reward: str,
    sampling,
    num_workers: int,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Held-out rewards of ``engine`` on ``examples`` (``MathExample``), ``sampling.n`` each.

    The same code as ``eval/evaluate.py`` (``jaxalign.evaluation.rollout_and_score`` and
    ``reward_metrics``), so a checkpoint scores the same here and in an eval report.

    Returns:
        ``(metrics, records)``: mean ``answer_reward`` / ``format_reward`` / ``reward``,
        response lengths in tokens (all, correct, incorrect) and ``truncated_fraction``; one
        record per sample with prompt, response, gold answer, extracted answer, rewards,
        length and finish reason (for ``write_generations``).
    """
    from jaxalign import evaluation

    records = evaluation.rollout_and_score(engine, examples, template=template, reward=reward,
                                           sampling=sampling, num_workers=num_workers)
    return summarize_rewards(records), records


def summarize_rewards(records: Sequence[dict[str, Any]], prefix: str = "") -> dict[str, float]:
    """Mean rewards, lengths (all / correct / incorrect) and truncation of scored responses.

    ``jaxalign.evaluation.reward_metrics`` with ``prefix`` on every key.
    """
    from jaxalign import evaluation

    return {prefix + k: v for k, v in evaluation.reward_metrics(records).items()}


def write_generations(run_dir: Path, step: int, records: Sequence[dict[str, Any]],
                      limit: int) -> None:
    """Appends up to ``limit`` records, tagged with ``step``, to ``generations.jsonl``."""
    if jax.process_index() != 0 or limit <= 0:
        return
    with open(Path(run_dir) / "generations.jsonl", "a") as f:
        for r in list(records)[:limit]:
            f.write(json.dumps({"step": step, **r}) + "\n")


def plot_metrics(run_dir: Path, panels: Sequence[tuple[str, Sequence[str]]],
                 filename: str = "curves.png") -> Path | None:
    """One PNG of metric curves from ``metrics.jsonl``: a panel per (title, keys)."""
    if jax.process_index() != 0:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxalign.logging import read_metrics

    # (Each step is logged once, a resumed run drops what a killed attempt logged after its
    # checkpoint: jaxalign.rundir.truncate_log. The last record of a step wins regardless.)
    records = list({r["step"]: r for r in read_metrics(Path(run_dir) / "metrics.jsonl")}.values())
    records.sort(key=lambda r: r["step"])
    panels = [(t, [k for k in keys if any(k in r for r in records)]) for t, keys in panels]
    panels = [(t, keys) for t, keys in panels if keys]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels, strict=True):
        for k in keys:
            pts = [(r["step"], r[k]) for r in records if isinstance(r.get(k), int | float)]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="." if len(pts) < 30 else None, label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(run_dir) / filename
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

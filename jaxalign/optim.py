"""The optimizer: optax AdamW, linear warmup + cosine decay, global-norm clipping, accumulation.

Everything comes from optax; this module only assembles it from a config and decides
which parameters get weight decay (matrices and embeddings, not norms or biases).

Gradient accumulation uses ``optax.MultiSteps``: k micro-batch gradients are averaged and
applied once, which equals one step on the concatenated batch when each micro-batch loss
is a mean over equally sized micro-batches (tested).
"""

from __future__ import annotations

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer settings (the ``optim`` block of a training config).

    Attributes:
        lr: peak learning rate.
        lr_min: final learning rate of the cosine decay.
        warmup_steps: linear warmup from 0; if None, ``warmup_ratio * total_steps``.
        warmup_ratio: used when ``warmup_steps`` is None.
        total_steps: optimizer steps (after accumulation) in the schedule.
        schedule: "cosine" (warmup then cosine to lr_min) or "constant" (warmup then flat).
        b1, b2, eps: AdamW moments.
        weight_decay: decoupled weight decay, applied to weights, not to norms or biases.
        grad_clip: global-norm clipping threshold (0 or None disables).
        grad_accum_steps: micro-batches per optimizer step.
    """

    lr: float = 1e-5
    lr_min: float = 0.0
    warmup_steps: int | None = None
    warmup_ratio: float = 0.0
    total_steps: int = 1000
    schedule: str = "cosine"
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    grad_accum_steps: int = 1

    def __post_init__(self):
        problems = []
        if self.lr <= 0:
            problems.append(f"lr={self.lr} must be > 0")
        if not 0 <= self.lr_min <= self.lr:
            problems.append(f"lr_min={self.lr_min} must be in [0, lr]")
        if self.total_steps < 1:
            problems.append(f"total_steps={self.total_steps} must be >= 1")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.total_steps:
            problems.append(f"warmup_steps={self.warmup_steps} must be in [0, total_steps]")
        if self.schedule not in ("cosine", "constant"):
            problems.append(f"schedule={self.schedule!r} must be 'cosine' or 'constant'")
        if self.grad_accum_steps < 1:
            problems.append(f"grad_accum_steps={self.grad_accum_steps} must be >= 1")
        if problems:
            raise ValueError("invalid optimizer config: " + "; ".join(problems))

    @property
    def num_warmup_steps(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return int(round(self.warmup_ratio * self.total_steps))


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Learning rate as a function of the optimizer step."""
    warmup = cfg.num_warmup_steps
    if cfg.schedule == "constant":
        return (
            optax.join_schedules(
                [
                    optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)),
                    optax.constant_schedule(cfg.lr),
                ],
                [warmup],
            )
            if warmup
            else optax.constant_schedule(cfg.lr)
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(cfg.total_steps, warmup + 1),  # optax needs a non-empty decay
        end_value=cfg.lr_min,
    )


def decay_mask(params) -> object:
    """True for parameters that get weight decay: every ``weight`` except norm scales.

    Works on any pytree whose paths spell parameter names (an ``nnx.State`` or a dict).
    """

    def keep(path, _):
        names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        names = [n for n in names if n != "value"]  # nnx.Variable's own field
        return names[-1] == "weight" and not any("norm" in n for n in names)

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with warmup-cosine, clipping and accumulation, as configured.

    Returns:
        ``(optimizer, schedule)``; with ``grad_accum_steps > 1`` the optimizer is wrapped in
        ``optax.MultiSteps`` and only every k-th ``update`` changes the parameters.
    """
    schedule = make_schedule(cfg)
    chain = []
    if cfg.grad_clip:
        chain.append(optax.clip_by_global_norm(cfg.grad_clip))
    chain.append(
        optax.adamw(
            learning_rate=schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    tx = optax.chain(*chain)
    if cfg.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps)
    return tx, schedule


def optim_config(c, total_steps: int) -> OptimConfig:
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

"""GRPO with a verifier reward; with no flags, the embedded CPU demo.

    # the demo: a tiny random Qwen2, the byte tokenizer, generated arithmetic problems;
    # a short SFT warm start, then GRPO; held-out answer reward before/after in summary.json
    python -m jaxalign.train --config configs/grpo.py
    # the real recipe (CS336 starter settings) on Qwen2.5-Math-1.5B, r1_zero prompt, MATH:
    python -m jaxalign.train --config configs/grpo.py:qwen2p5_math_1p5b \
        --config.model.path=/models/Qwen2.5-Math-1.5B \
        --config.data.train_file=/data/math_train.jsonl
    # on a TPU slice (dot_product attention, FSDP over every chip): ...:qwen2p5_math_1p5b_tpu
    # the same with the bare-question prompt and its reward:
    python -m jaxalign.train --config configs/grpo.py:qwen2p5_math_1p5b_question_only ...
    # published loss settings on either base (see dr_grpo() and dapo() below):
    python -m jaxalign.train --config configs/grpo.py:dr_grpo          # the demo, Dr. GRPO
    python -m jaxalign.train --config configs/grpo.py:qwen2p5_math_1p5b_dapo ...

Expected result (demo, measured 2026-12-02 on this project's 2-core CPU): held-out answer
reward 0.311 after the SFT warm start, 0.451 after 80 GRPO steps (n=512, temperature 1);
6 min 52 s wall on a quiet machine (2026-12-01), 15 min with other jobs on the cores.
README "The demo" has the curve and how the task is built.
"""

from jaxalign.config import (
    base_config,
    demo_task,
    on_tpu,
    qwen2p5_math_1p5b_model,
    rollout_blocks,
)


def dr_grpo(c) -> None:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): the unbiased
    objective. Group advantages are not divided by the group's std, and each sequence's
    token sum is divided by a constant (``sampling.max_tokens``), not by its own length, so
    neither question difficulty nor response length re-weights the gradient. PPO-clip
    surrogate at 0.2; no KL term."""
    c.grpo.use_std_normalization = False
    c.grpo.length_normalization = "masked_normalize"
    c.grpo.normalize_constant = 0  # 0: sampling.max_tokens
    c.grpo.loss_type = "grpo_clip"
    c.grpo.cliprange = 0.2
    c.grpo.beta = 0.0


def dapo(c) -> None:
    """DAPO (Yu et al. 2025): clip-higher (epsilon_low 0.2, epsilon_high 0.28), a token-level
    loss (every token of the batch weighs the same), no KL term, dynamic sampling and soft
    overlong punishment (the paper's 4096-token buffer of 20480 is 20%: here 20% of
    ``sampling.max_tokens``, penalty up to 1).

    Dynamic sampling as published: groups whose rewards are all equal are replaced by
    groups of further prompts until the step's batch is full of informative groups, up to
    10 extra rounds (verl's DAPO recipe: ``max_num_gen_batches=10``); if still short, the
    rest are zero-std groups, masked. ``--config.grpo.max_resample_rounds=0`` gives the
    cheaper masked form (a step trains on fewer groups, no extra sampling).
    """
    c.grpo.loss_type = "grpo_clip"
    c.grpo.cliprange = 0.0
    c.grpo.cliprange_low = 0.2
    c.grpo.cliprange_high = 0.28
    c.grpo.length_normalization = "token_mean"
    c.grpo.use_std_normalization = True
    c.grpo.beta = 0.0
    c.grpo.filter_zero_std_groups = True
    c.grpo.max_resample_rounds = 10
    c.grpo.overlong_penalty = 1.0
    c.grpo.overlong_buffer = c.sampling.max_tokens // 5


# Loss settings a preset name may end with: "dr_grpo" (the demo), "qwen2p5_math_1p5b_dapo".
VARIANTS = {"dr_grpo": dr_grpo, "dapo": dapo}
BASES = ("demo", "qwen2p5_math_1p5b", "qwen2p5_math_1p5b_question_only",
         "qwen2p5_math_1p5b_tpu")


def get_config(preset: str = "demo"):
    variant = next((v for v in VARIANTS if preset == v or preset.endswith("_" + v)), None)
    if variant is not None:
        base = preset[: -len(variant)].rstrip("_") or "demo"
        if base not in BASES:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(BASES)}, "
                             f"optionally followed by _{' or _'.join(VARIANTS)}")
        c = get_config(base)
        VARIANTS[variant](c)
        c.name = f"grpo-{variant}"
        return c
    c = base_config("grpo", "grpo")
    rollout_blocks(c)

    c.grpo = dict(
        n_grpo_steps=40,
        rollout_batch_size=128,
        group_size=8,
        train_batch_size=128,
        epochs_per_rollout_batch=1,
        loss_type="reinforce_with_baseline",  # no_baseline | reinforce_with_baseline |
        #                                       grpo_clip | grpo_no_clip
        use_std_normalization=True,
        advantage_eps=1e-6,
        cliprange=0.2,
        cliprange_low=0.0,  # >0 with cliprange_high: asymmetric clip (DAPO)
        cliprange_high=0.0,
        length_normalization="masked_mean",  # masked_mean | token_mean | masked_normalize
        normalize_constant=0,  # masked_normalize divisor; 0: sampling.max_tokens
        old_log_probs="trainer",  # trainer (one forward per rollout batch) | engine
        tis="auto",  # truncated importance sampling: auto (on iff old_log_probs=engine) | on | off
        tis_cap=2.0,
        beta=0.0,  # KL(policy || starting policy), k3 estimator
        filter_zero_std_groups=False,
        # with filter_zero_std_groups: >0 samples up to this many more prompt batches per
        # step to replace zero-std groups (DAPO's published dynamic sampling); 0 masks them
        max_resample_rounds=0,
        mask_truncated=False,
        overlong_penalty=0.0,  # DAPO soft penalty at max_tokens (0: off)
        overlong_buffer=0,
        entropy_floor=0.0,  # warn when mean token entropy falls below (0: off)
        health_window=5,  # steps compared for "format up, answer down"
        stop_on_collapse=False,
    )
    c.engine.max_batch_size = 128
    c.eval.every = 10  # GRPO steps; the last step is always evaluated
    c.checkpoint.save_every = 10
    c.optim.grad_accum_steps = 1
    c.optim.weight_decay = 0.0

    if preset == "demo":
        demo_task(c)
        c.grpo.n_grpo_steps = 80
        c.optim.lr = 1e-4  # 2e-4 and above make the tiny policy noisier, 5e-5 learns slower
        c.optim.schedule = "constant"
        c.optim.warmup_steps = 0
    elif preset in ("qwen2p5_math_1p5b", "qwen2p5_math_1p5b_question_only",
                    "qwen2p5_math_1p5b_tpu"):
        # CS336 assignment 5 starter settings.
        qwen2p5_math_1p5b_model(c)
        c.data.source = "math"
        c.data.template = "r1_zero"
        c.data.num_train = 0
        c.data.num_eval = 1024
        c.grpo.n_grpo_steps = 200
        c.grpo.rollout_batch_size = 256
        c.grpo.group_size = 8
        c.grpo.train_batch_size = 256
        c.optim.grad_accum_steps = 128
        c.optim.lr = 1e-5
        c.optim.b1, c.optim.b2 = 0.9, 0.95
        c.optim.weight_decay = 0.0
        c.optim.schedule = "constant"
        c.optim.warmup_steps = 0
        c.optim.grad_clip = 1.0
        c.sampling.temperature = 1.0
        c.sampling.min_tokens = 4
        c.sampling.max_tokens = 1024
        c.train.width_multiple = 256
        c.engine.max_batch_size = 256
        c.eval.every = 5
        c.eval.num_workers = 8
        c.checkpoint.save_every = 20
        if preset.endswith("_tpu"):  # the same recipe on a TPU slice (launch/tpu_pod.sh)
            on_tpu(c)
            # micro-batches of 32 rows: whole rows for each chip of slices up to 32 chips
            c.optim.grad_accum_steps = 8
        if preset.endswith("question_only"):
            c.data.template = "question_only"
            c.data.reward = "question_only"
            c.sampling.stop = ()
    else:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(BASES)}, "
                         f"optionally followed by _{' or _'.join(VARIANTS)}")
    return c

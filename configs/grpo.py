"""GRPO with a verifier reward; with no flags, the embedded CPU demo.

    # the demo: a tiny random Qwen2, the byte tokenizer, generated arithmetic problems;
    # a short SFT warm start, then GRPO; held-out answer reward before/after in summary.json
    python -m jaxalign.train --config configs/grpo.py
    # the real recipe (CS336 starter settings) on Qwen2.5-Math-1.5B, r1_zero prompt, MATH:
    python -m jaxalign.train --config configs/grpo.py:qwen2p5_math_1p5b \
        --config.model.path=/models/Qwen2.5-Math-1.5B \
        --config.data.train_file=/data/math_train.jsonl
    # the same with the bare-question prompt and its reward:
    python -m jaxalign.train --config configs/grpo.py:qwen2p5_math_1p5b_question_only ...

Expected result (demo, measured 2026-12-02 on this project's 2-core CPU): held-out answer
reward 0.311 after the SFT warm start, 0.451 after 80 GRPO steps (n=512, temperature 1);
6 min 52 s wall on a quiet machine (2026-12-01), 15 min with other jobs on the cores.
README "The demo" has the curve and how the task is built.
"""

from jaxalign.config import base_config, demo_task, qwen2p5_math_1p5b_model, rollout_blocks


def get_config(preset: str = "demo"):
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
    elif preset in ("qwen2p5_math_1p5b", "qwen2p5_math_1p5b_question_only"):
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
        if preset.endswith("question_only"):
            c.data.template = "question_only"
            c.data.reward = "question_only"
            c.sampling.stop = ()
    else:
        raise ValueError(f"unknown preset {preset!r}; choose demo, qwen2p5_math_1p5b or "
                         "qwen2p5_math_1p5b_question_only")
    return c

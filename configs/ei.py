"""Expert Iteration: sample G answers per question, keep the verified ones, SFT on them.

    # CPU demo-sized run on the generated arithmetic task (warm start, then EI):
    python -m jaxalign.train --config configs/ei.py
    # Qwen2.5-Math-1.5B on GSM8K train questions, r1_zero prompt:
    python -m jaxalign.train --config configs/ei.py:qwen2p5_math_1p5b \
        --config.model.path=/models/Qwen2.5-Math-1.5B

Expected result (demo, measured 2026-12-01 on this project's 2-core CPU): held-out answer
reward 0.309 after the warm start, 0.326 after 10 EI steps (n=512, temperature 1); kept
fraction 0.137 -> 0.178; 6 min 53 s wall (benchmarks/RESULTS.md).
"""

from jaxalign.config import base_config, demo_task, qwen2p5_math_1p5b_model, rollout_blocks


def get_config(preset: str = "demo"):
    c = base_config("ei", "expert_iteration")
    rollout_blocks(c)
    c.ei = dict(
        n_ei_steps=5,
        questions_per_step=64,
        group_size=8,  # G rollouts per question
        keep="answer",  # answer (answer reward 1) | reward (format and answer)
        dedupe=True,
        max_per_question=4,  # 0: no cap
        sft_epochs=1,
        batch_size=64,  # rows per optimizer step
    )
    c.engine.max_batch_size = 256
    c.eval.every = 1
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0
    c.checkpoint.save_every = 1

    if preset == "demo":
        demo_task(c)  # the GRPO demo's task and warm start; EI keeps verified samples
        # A fresh AdamW's first steps move every weight by ~lr: 1e-3 undoes the warm start.
        c.optim.lr = 1e-4
        c.ei.n_ei_steps = 10
        c.ei.sft_epochs = 2
        c.eval.every = 2
    elif preset == "qwen2p5_math_1p5b":
        qwen2p5_math_1p5b_model(c)
        c.data.source = "gsm8k"
        c.data.template = "r1_zero"
        c.data.num_train = 0
        c.data.num_eval = 1024
        c.ei.questions_per_step = 512
        c.ei.group_size = 8
        c.ei.sft_epochs = 2
        c.ei.batch_size = 64
        c.optim.lr = 1e-5
        c.optim.grad_accum_steps = 8
        c.sampling.max_tokens = 1024
        c.train.width_multiple = 256
        c.eval.num_workers = 8
    else:
        raise ValueError(f"unknown preset {preset!r}; choose demo or qwen2p5_math_1p5b")
    return c

"""The training loops: ``sft``, ``expert_iteration``, ``grpo`` (each a ``validate`` and a ``run``).

``jaxalign.train`` picks one by the config's ``algorithm`` field. What they share lives with
its concept: config defaults and checks in ``jaxalign.config``, the model and tokenizer in
``jaxalign.models.build``, log-probs in ``jaxalign.losses``, the run directory (logging,
checkpoints, resume, summaries, plots) in ``jaxalign.rundir``, validation in
``jaxalign.evaluation``; ``rollouts`` holds what GRPO and Expert Iteration share.
"""

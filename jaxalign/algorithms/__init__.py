"""The training loops: ``sft``, ``expert_iteration``, ``grpo``, ``dpo`` (each a ``validate``,
a class with one ``step`` and a ``run``).

``jaxalign.train`` picks one by the config's ``algorithm`` field; ``driver.drive`` runs any of
them (resume, periodic validation, checkpoints, export, plots, summary, the before/after
table). What they share lives with its concept: config defaults and checks in
``jaxalign.config``, the model and tokenizer in ``jaxalign.models.build``, log-probs and
advantages in ``jaxalign.losses``, the run directory (logging, checkpoints, resume,
summaries, plots) in ``jaxalign.rundir``, validation in ``jaxalign.evaluation``;
``policy_run`` holds what GRPO and Expert Iteration share (the policy, its rollouts as a
``Rollouts`` record, the engine, the reward, the demo's warm start).
"""

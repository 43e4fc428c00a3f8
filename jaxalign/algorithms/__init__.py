"""The training loops: ``sft``, ``expert_iteration``, ``grpo`` (each a ``validate`` and a ``run``).

``jaxalign.train`` picks one by the config's ``algorithm`` field; ``common`` holds what they
share (model and tokenizer, optimizer config, log-probs, run state, validation, plots).
"""

"""Fixtures of the training-loop tests."""

import pytest
from cfg_helpers import load_config, shrink


@pytest.fixture
def grpo_config(tmp_path):
    cfg = shrink(load_config("grpo"), tmp_path)
    g = cfg.grpo
    g.n_grpo_steps, g.rollout_batch_size, g.group_size, g.train_batch_size = 2, 16, 4, 8
    cfg.eval.every = 0
    return cfg

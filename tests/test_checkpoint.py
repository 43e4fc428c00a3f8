"""Orbax checkpoints: exact round trip, keep-last-K, resume, resharding on restore."""

import jax
import numpy as np
import pytest
from test_trainer import make_batch, nll_loss  # tests/ is on sys.path (rootdir conftest)

from jaxalign import sharding
from jaxalign.checkpoint import Checkpointer
from jaxalign.models import init_model, tiny
from jaxalign.optim import OptimConfig, make_optimizer
from jaxalign.trainer import Trainer

CFG = tiny(tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=4)


def new_trainer(mesh=None, seed=0):
    tx, _ = make_optimizer(OptimConfig(lr=1e-3, total_steps=20, warmup_steps=2))
    return Trainer.create(init_model(CFG, seed=seed), tx, nll_loss, mesh)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_round_trip_and_resume_gives_identical_losses(tmp_path):
    a = new_trainer()
    ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=2, save_every=2)
    for step in range(1, 5):
        a.train_step(make_batch(step))
        ckpt.maybe_save(step, a.params, a.opt_state, {"data": {"epoch": 0, "index": step}})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 4]
    ref = [float(a.train_step(make_batch(s))["loss"]) for s in range(5, 8)]

    b = new_trainer(seed=123)  # different init: everything must come from the checkpoint
    params, opt_state, extra = Checkpointer(tmp_path / "ckpt").restore(b.params, b.opt_state)
    assert extra == {"data": {"epoch": 0, "index": 4}, "step": 4}
    b.params, b.opt_state = params, opt_state
    got = [float(b.train_step(make_batch(s))["loss"]) for s in range(5, 8)]
    assert got == ref  # bitwise: same arrays, same step function
    for x, y in zip(leaves(a.params), leaves(b.params), strict=True):
        np.testing.assert_array_equal(x, y)


def test_restore_reshards_onto_another_mesh(tmp_path):
    a = new_trainer(sharding.make_mesh(fsdp=8, tensor=1))
    a.train_step(make_batch(1))
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(1, a.params, a.opt_state)
    ckpt.wait()
    b = new_trainer(sharding.make_mesh(fsdp=2, tensor=4), seed=5)
    params, opt_state, _ = ckpt.restore(b.params, b.opt_state)
    q = params["model"]["layers"][0]["self_attn"]["q_proj"]["weight"][...]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    for x, y in zip(leaves(a.params), leaves(params), strict=True):
        np.testing.assert_array_equal(x, y)


def test_restore_without_checkpoint_is_a_clear_error(tmp_path):
    t = new_trainer()
    with pytest.raises(FileNotFoundError, match="no checkpoint to restore"):
        Checkpointer(tmp_path / "empty").restore(t.params, t.opt_state)


def test_the_echoes_of_a_failed_save_are_dropped_and_other_errors_kept(tmp_path):
    """A failed background save is reported once, as a ``CheckpointError``; orbax's own
    error logs of it and asyncio's "Task exception was never retrieved" for its orphaned
    writes (seen in a CI run on a full disk) are dropped. Other errors stay."""
    import logging

    Checkpointer(tmp_path / "ckpt").close()  # installs the filters
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    logging.getLogger().addHandler(handler)
    try:
        orphan = ("Task exception was never retrieved\nfuture: <Task finished coro=<"
                  "async_serialize_from_host() done, defined at /x/site-packages/orbax/"
                  "checkpoint/_src/serialization/serialization.py:126> exception=ValueError("
                  "'RESOURCE_EXHAUSTED: No space left on device')>")
        logging.getLogger("asyncio").error(orphan)
        logging.getLogger("asyncio").error("Task exception was never retrieved\nfuture: "
                                           "<Task finished coro=<my_code()>>")
        logging.getLogger("asyncio").warning(orphan)  # below ERROR: never filtered
    finally:
        logging.getLogger().removeHandler(handler)
    assert seen == ["Task exception was never retrieved\nfuture: <Task finished coro=<"
                    "my_code()>>", orphan]

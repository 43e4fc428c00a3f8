"""A trainer and a sidecar on one machine must not share a GPU: the trainer refuses a
sidecar on this host that computes on one of its GPUs, when ``CUDA_VISIBLE_DEVICES`` of
both tells it (``client.gpus_shared_with_sidecars``)."""

from jaxalign.rollout.client import gpus_shared_with_sidecars

HERE, THERE = "http://127.0.0.1:8000", "http://gpu-host-2:8000"


def _clashes(health, visible, count=2):
    return gpus_shared_with_sidecars(health, trainer_visible=visible, trainer_gpus=count,
                                     is_local=lambda url: url == HERE)


def _gpu(visible):
    return {"platform": "gpu", "cuda_visible_devices": visible}


def test_the_one_machine_recipe_passes_and_its_mistakes_are_named():
    # README's recipe: trainer on GPU 0, sidecar on GPU 1.
    assert _clashes({HERE: _gpu("1")}, "0") == []
    # The trainer without CUDA_VISIBLE_DEVICES takes both GPUs, the sidecar's among them.
    [message] = _clashes({HERE: _gpu("1")}, None)
    assert "the sidecar at http://127.0.0.1:8000 computes on GPU 1 (its CUDA_VISIBLE_DEVICES=1)" \
        in message and "(CUDA_VISIBLE_DEVICES=unset: all 2 GPUs)" in message
    # A sidecar without it computes on GPU 0, where the trainer is.
    [message] = _clashes({HERE: _gpu(None)}, "0")
    assert "GPU 0 (its CUDA_VISIBLE_DEVICES=unset)" in message
    # Tensor-parallel sidecar on 1,2 against a trainer on 0,1: GPU 1 only.
    [message] = _clashes({HERE: _gpu("1,2")}, "0,1")
    assert "computes on GPU 1 " in message
    assert len(_clashes({HERE: _gpu("0"), "http://127.0.0.1:8001": _gpu("0")}, "0")) == 1


def test_what_cannot_be_told_apart_passes():
    assert _clashes({THERE: _gpu("0")}, "0") == []  # another host
    assert _clashes({HERE: {"platform": "cpu", "cuda_visible_devices": None}}, None) == []
    assert _clashes({HERE: {"platform": "gpu"}}, "0") == []  # an older sidecar
    assert _clashes({HERE: _gpu("GPU-5f1c")}, "0") == []  # UUID against index
    assert len(_clashes({HERE: _gpu("GPU-5f1c")}, "GPU-5f1c,GPU-77aa")) == 1


def test_a_gpu_trainer_refuses_to_start_beside_a_sidecar_on_its_gpu(monkeypatch):
    """What ``PolicyRun.start_engine`` calls before the first weight export."""
    import jax
    import pytest

    from jaxalign.algorithms.policy_run import check_gpus_apart
    from jaxalign.config import ConfigError

    class FakeEngine:
        closed = False

        def health(self):
            return {HERE: _gpu("1")}

        def close(self):
            self.closed = True

    engine = FakeEngine()
    check_gpus_apart(engine)  # a CPU trainer (this test process) cannot clash
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "local_device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    check_gpus_apart(engine)  # README's one-machine recipe
    assert not engine.closed
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(ConfigError, match=r"config.engine.urls: the sidecar at "
                                          r"http://127.0.0.1:8000 computes on GPU 1 .*"
                                          r"CUDA_VISIBLE_DEVICES=0 python -m jaxalign.train"):
        check_gpus_apart(engine)
    assert engine.closed

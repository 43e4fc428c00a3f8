"""Multi-process training on one CPU host: 2 processes x 2 devices == 1 process x 4 devices.

The real thing, shrunk: ``python -m jaxalign.train`` started twice with
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` (as
``launch/gpu_nodes.sh`` exports them), each process seeing 2 simulated CPU devices, gloo
for the cross-process collectives, one global (fsdp=2 x tensor=2) mesh. Checked against
one process with 4 devices, run the same way:

* SFT, 3 steps: the same losses and gradient norms; only process 0 wrote the logs, plots,
  summary and HF export; the 2-process checkpoint resumes in a 1-process run on another
  mesh (2 devices) and steps 4-5 equal the 1-process run's.
* LoRA SFT (rank 4), 3 steps: the same losses, gradient norms and exported adapter
  (``adapter/``, written by process 0 alone).
* GRPO, 2 steps (per-process rollouts with the JAX engine, gathered; old log-probs from
  one forward; 2 epochs so the clipped ratio moves): the same rewards, lengths, losses and
  gradient norms, the same final weights; its checkpoint restores here, in the test's own
  process, on an 8-device mesh.

GRPO's reward is a deterministic stand-in (``tests/multiprocess_worker.py``): the real
verifier gives a random tiny model 0 everywhere, so every advantage and loss would be 0
for any process count and the comparison would prove nothing.

Also unit tests of ``jaxalign.distributed`` and of ``jaxalign.train``'s remote-workdir
staging that need no second process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxalign import distributed, optim, storage
from jaxalign.logging import read_metrics
from jaxalign.models import build

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = REPO_ROOT / "tests" / "multiprocess_worker.py"
RUN_TIMEOUT_S = 300

# Both algorithms: tiny model, no wandb or progress bars, synchronous checkpoints, the
# global mesh fsdp=2 x tensor=2 (the 1-process reference has the same 4 devices).
COMMON = {
    "model.preset": "tiny",
    "model.arch": {},
    "model.attention_impl": "xla",
    "mesh.data": 1,
    "mesh.fsdp": 2,
    "mesh.tensor": 2,
    "checkpoint.save_every": 0,  # only the last step
    "checkpoint.async_save": False,
    "checkpoint.export_hf": True,
    "log.wandb_mode": "disabled",
    "log.progress": False,
    "optim.schedule": "constant",  # a run's steps can grow on resume without a new schedule
    "optim.warmup_steps": 0,
}
SFT = {
    **COMMON,
    "data.source": "synthetic",
    "data.template": "User: What is {question}?\nAssistant: <think>",
    "data.num_train": 200,
    "train.batch_size": 8,
    "train.seq_buckets": (96,),
    "eval.num_examples": 0,  # GRPO exercises the engine; keep SFT to the trainer
    "eval.every": 0,
    "optim.lr": 3e-3,
}
GRPO = {
    **COMMON,
    "data.num_train": 200,
    "data.num_eval": 2,
    "warmstart.sft_steps": 0,
    "grpo.n_grpo_steps": 2,
    "grpo.rollout_batch_size": 16,
    "grpo.group_size": 4,
    "grpo.train_batch_size": 8,  # 2 optimizer steps per rollout batch per epoch
    "grpo.epochs_per_rollout_batch": 2,
    "grpo.loss_type": "grpo_clip",
    "sampling.max_tokens": 16,
    "engine.max_batch_size": 64,
    "eval.every": 0,
    "eval.num_workers": 0,
}
# Files of a run directory that process 0 alone may write.
MAIN_ONLY = ("config.json", "metrics.jsonl", "summary.json", "curves.png", "hf")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_args(config: str, overrides: dict) -> list[str]:
    args = ["--config", str(REPO_ROOT / "configs" / f"{config}.py")]
    for key, value in overrides.items():
        text = value if isinstance(value, str) else repr(value)
        args.append(f"--config.{key}={text}")
    return args


def _launch(config: str, overrides: dict, workdir: Path, *, processes: int, devices: int,
            fake_reward: bool = False) -> list[Path]:
    """Runs the CLI as ``processes`` processes of ``devices`` CPU devices each; waits for all.

    Returns:
        Per process, the JSON file listing the paths it opened for writing.

    Raises:
        AssertionError: a process failed or the run passed ``RUN_TIMEOUT_S`` (all of them
            are killed), with the tail of each process's log.
    """
    port = _free_port()
    if fake_reward:  # a user's reward module: tests/verify/my_rewards.py on PYTHONPATH
        overrides = {**overrides, "data.reward": "my_rewards:even_e"}
    args = _cli_args(config, {**overrides, "workdir": str(workdir)})
    logs = [workdir.parent / f"{workdir.name}.p{i}.log" for i in range(processes)]
    writes = [workdir.parent / f"{workdir.name}.p{i}.writes.json" for i in range(processes)]
    procs = []
    for i in range(processes):
        env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
        env.update(
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
            JAX_PLATFORMS="cpu",
            JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        )
        if fake_reward:
            env["PYTHONPATH"] = os.pathsep.join(
                [str(REPO_ROOT / "tests" / "verify"), env.get("PYTHONPATH", "")])
        if processes > 1:
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                       JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i))
        with open(logs[i], "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, str(WORKER), str(writes[i]), "--", *args], cwd=REPO_ROOT,
                env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    if codes != [0] * processes:
        tails = "\n".join(f"--- process {i} (exit {c}):\n" + logs[i].read_text()[-3000:]
                          for i, c in enumerate(codes))
        raise AssertionError(f"{config} run with {processes} process(es) failed:\n{tails}")
    return writes


def _train_records(workdir: Path, key: str = "train/loss") -> dict[int, dict]:
    records = [r for r in read_metrics(workdir / "metrics.jsonl") if key in r]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"a step was logged twice (two writers?): {steps}"
    return {r["step"]: r for r in records}


def _check_only_process_0_wrote(workdir: Path, writes: list[Path],
                                also: tuple[str, ...] = ()) -> None:
    """Process 0 wrote the run's files (and ``also``, e.g. a LoRA run's ``adapter``); the
    others wrote nothing outside checkpoints/."""
    mine = [json.loads(w.read_text()) for w in writes]
    root = str(workdir.resolve())
    for i, paths in enumerate(mine):
        in_run = [Path(p).relative_to(root) for p in paths if p.startswith(root + os.sep)]
        tops = {p.parts[0] for p in in_run}
        if i == 0:
            for name in ("config.json", "metrics.jsonl", "summary.json", "hf", *also):
                assert name in tops, f"process 0 did not write {name}: {sorted(tops)}"
        else:
            assert tops <= {"checkpoints"}, f"process {i} wrote {sorted(map(str, in_run))}"
            # orbax: each process writes its own shards' metadata, collectively
            assert any("checkpoints" in str(p) for p in in_run)


def _hf_params(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path / "model.safetensors"))


# --- the runs -------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_process_sft_equals_one_process_and_resumes_on_one(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    writes = _launch("sft", {**SFT, "train.steps": 3}, two, processes=2, devices=2)
    _launch("sft", {**SFT, "train.steps": 5}, one, processes=1, devices=4)
    got, want = _train_records(two), _train_records(one)
    assert sorted(got) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("train/loss", "train/grad_norm", "train/entropy"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-5, abs=1e-5), (
                step, key)
    assert got[1]["train/loss"] - got[3]["train/loss"] > 0.1  # it trained: not a constant
    _check_only_process_0_wrote(two, writes)
    assert json.loads((two / "summary.json").read_text())["steps"] == 3

    # The 2-process checkpoint (step 3) resumes in one process with 2 devices (a new mesh:
    # fsdp=2, tensor=1): the parameters, optimizer state and data position carry over.
    _launch("sft", {**SFT, "train.steps": 5, "mesh.fsdp": -1, "mesh.tensor": 1}, two,
            processes=1, devices=2)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["resumed_from"] == 3
    resumed = _train_records(two)
    for step in (4, 5):
        assert resumed[step]["train/loss"] == pytest.approx(want[step]["train/loss"],
                                                            rel=1e-5, abs=1e-5), step


@pytest.mark.slow
def test_two_process_lora_sft_equals_one_process(tmp_path):
    """LoRA (rank 4 on every projection): the adapters are sharded over the global mesh,
    the base frozen on it; 3 steps give the same losses, gradient norms and exported
    adapter as one process with 4 devices, and only process 0 writes adapter/."""
    lora_sft = {**SFT, "train.steps": 3, "lora.rank": 4, "lora.alpha": 8.0,
                "optim.lr": 1e-2}  # adapters start at B = 0: a larger step than full FT's
    two, one = tmp_path / "two", tmp_path / "one"
    writes = _launch("sft", lora_sft, two, processes=2, devices=2)
    _launch("sft", lora_sft, one, processes=1, devices=4)
    got, want = _train_records(two), _train_records(one)
    assert sorted(got) == sorted(want) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("train/loss", "train/grad_norm"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-5, abs=1e-5), (
                step, key)
    # it trained: not a constant (5.68 -> 5.21 when written)
    assert got[1]["train/loss"] - got[3]["train/loss"] > 0.2
    _check_only_process_0_wrote(two, writes, also=("adapter",))
    from safetensors.numpy import load_file

    adapter_two = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    adapter_one = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    assert adapter_two.keys() == adapter_one.keys() and adapter_two
    assert any(np.abs(v).max() > 0 for k, v in adapter_two.items() if "lora_B" in k)
    for k in adapter_two:
        np.testing.assert_allclose(adapter_two[k], adapter_one[k], rtol=1e-5, atol=1e-6,
                                   err_msg=k)


@pytest.mark.slow
def test_two_process_grpo_equals_one_process_and_its_checkpoint_restores_here(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    writes = _launch("grpo", GRPO, two, processes=2, devices=2, fake_reward=True)
    _launch("grpo", GRPO, one, processes=1, devices=4, fake_reward=True)
    got, want = _train_records(two), _train_records(one)
    assert sorted(got) == [1, 2]
    for step in (1, 2):
        # the same samples: rows are seeded by their place in the global batch
        for key in ("train/reward", "train/response_length", "train/frac_reward_zero_std"):
            assert got[step][key] == want[step][key], (step, key)
        for key in ("train/loss", "train/grad_norm", "train/clip_fraction",
                    "drift/logprob_diff_mean"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-5, abs=1e-5), (
                step, key)
    # a meaningful comparison: rewards vary within groups, so there is a gradient
    assert got[1]["train/frac_reward_zero_std"] < 1 and got[1]["train/grad_norm"] > 1e-3
    _check_only_process_0_wrote(two, writes)
    hf_two, hf_one = _hf_params(two / "hf"), _hf_params(one / "hf")
    assert hf_two.keys() == hf_one.keys()
    for k in hf_two:
        np.testing.assert_allclose(hf_two[k], hf_one[k], rtol=1e-5, atol=1e-6, err_msg=k)

    # Restore the 2-process checkpoint in this process (8 devices, fsdp=4 x tensor=2).
    from jaxalign import sharding
    from jaxalign.algorithms import grpo
    from jaxalign.checkpoint import Checkpointer
    from jaxalign.optim import make_optimizer
    from jaxalign.trainer import Trainer

    cfg = _load_config("grpo", GRPO)
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    model, _ = build.build_model_and_tokenizer(cfg.model, mesh)
    tx, _ = make_optimizer(optim.optim_config(cfg.optim, 8))
    loss_fn = grpo.grpo_loss_fn(cfg.grpo, use_old=True, use_tis=False, normalize_constant=16)
    trainer = Trainer.create(model, tx, loss_fn, mesh)
    ckpt = Checkpointer(two / "checkpoints", async_save=False)
    assert ckpt.latest_step() == 2
    params, opt_state, extra = ckpt.restore(trainer.params, trainer.opt_state)
    ckpt.close()
    assert extra["step"] == 2 and extra["trainer_step"] == 8  # 2 steps x 2 epochs x 2
    from flax import nnx

    from jaxalign.models import from_pretrained

    exported = nnx.state(from_pretrained(two / "hf", dtype="float32"), nnx.Param)
    for (path, value), (_, ref) in zip(jax.tree.leaves_with_path(params),
                                       jax.tree.leaves_with_path(exported), strict=True):
        assert value.sharding.mesh.devices.size == 8, path
        np.testing.assert_array_equal(np.asarray(value), np.asarray(ref), err_msg=str(path))
    leaf = jax.tree.leaves(opt_state)[-1]
    assert leaf.sharding.mesh.devices.size == 8


def _load_config(name: str, overrides: dict):
    path = REPO_ROOT / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


# --- without a second process -----------------------------------------------------------------


def test_initialize_from_env_passes_count_and_id_explicitly(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    assert distributed.initialize_from_env({}) is False
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
           "JAX_PROCESS_ID": "3"}
    assert distributed.initialize_from_env(env) is True
    assert calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)]
    assert distributed.initialize_from_env({"JAXALIGN_DISTRIBUTED": "auto"}) is True
    assert calls[-1] == {}


@pytest.mark.parametrize("env, message", [
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "not both set"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "x"},
     "must be integers"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     r"not in \[0, JAX_NUM_PROCESSES=2\)"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS is not"),
])
def test_initialize_from_env_refuses_incomplete_settings(monkeypatch, env, message):
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: pytest.fail("called"))
    with pytest.raises(ValueError, match=message):
        distributed.initialize_from_env(env)


def test_host_helpers_are_identities_on_one_process():
    assert distributed.allgather_objects({"a": [1, 2]}) == [{"a": [1, 2]}]
    assert distributed.broadcast_object("x") == "x"
    x = jax.numpy.arange(6.0)
    np.testing.assert_array_equal(distributed.to_host(x), np.arange(6.0))
    tree = {"w": x}
    assert distributed.local_replica(tree) is tree


def test_remote_workdir_is_staged_and_copied_without_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / "staging"))
    assert storage.is_remote("gs://bucket/runs/a") and not storage.is_remote("/runs/a")
    staged = storage.staging_dir("gs://bucket/runs/a")
    assert staged.parent == tmp_path / "staging" and staged.name.startswith("a-")
    assert staged != storage.staging_dir("gs://other/runs/a")  # same basename, other run
    src = tmp_path / "src"
    (src / "hf").mkdir(parents=True)
    (src / "checkpoints" / "3").mkdir(parents=True)
    (src / "metrics.jsonl").write_text("{}\n")
    (src / "hf" / "config.json").write_text("{}")
    (src / "checkpoints" / "3" / "x").write_text("big")
    assert storage.copy_tree(src, tmp_path / "dst") == 2
    assert (tmp_path / "dst" / "hf" / "config.json").exists()
    assert not (tmp_path / "dst" / "checkpoints").exists()  # orbax wrote those remotely
    assert storage.copy_tree(tmp_path / "missing", tmp_path / "dst") == 0


def test_a_workdir_another_host_cannot_see_is_refused(tmp_path, monkeypatch):
    """Process 0 of 2 (simulated) whose peer does not find the marker: a clear error on
    every process, and the marker is removed. The real 2-process runs above pass it."""
    monkeypatch.setattr(distributed.jax, "process_count", lambda: 2)
    monkeypatch.setattr(distributed, "broadcast_object", lambda obj: obj)
    monkeypatch.setattr(distributed, "allgather_objects", lambda obj: [obj, None if obj is None
                                                                      else False])
    with pytest.raises(ValueError, match=r"process\(es\) \[1\] do not see process 0's run "
                                         r"directory.*filesystem they share.*gs://"):
        distributed.check_shared_directory(tmp_path)
    assert not list(tmp_path.iterdir())
    monkeypatch.setattr(distributed, "allgather_objects", lambda obj: [obj, obj])
    distributed.check_shared_directory(tmp_path)  # a peer that sees it
    assert not list(tmp_path.iterdir())

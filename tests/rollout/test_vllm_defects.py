"""The vLLM defects of issue #15, each reproduced with a fake ``vllm`` (``fake_vllm/``).

vLLM cannot run here, so ``tests/rollout/fake_vllm/vllm`` reproduces what a source review
of vLLM 0.10.0, 0.11.0 and 0.33.0 found: ``reset_prefix_cache()`` returning None, an
executor that ignores ``collective_rpc(timeout=)``, validation errors that are not
``ValueError``, greedy ``n > 1`` refused, noise that depends on the seed and position only.
Each test drives the real ``VllmEngine`` / ``VllmBackend`` / ``Sidecar`` / server process /
``SidecarEngine`` over it. (The contract test checks the same calls against real wheels.)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from jaxalign.rollout.server import (
    FATAL_EXIT_CODE,
    LISTENING,
    RequestError,
    Sidecar,
    VllmBackend,
    checkpoint_checksum,
)
from jaxalign.rollout.types import SamplingParams

FAKE_ROOT = Path(__file__).parent / "fake_vllm"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake_vllm(monkeypatch):
    """The fake ``vllm`` module, installed as ``vllm`` for this test."""
    monkeypatch.delenv("FAKE_VLLM_RPC", raising=False)
    monkeypatch.delenv("FAKE_VLLM_RESET", raising=False)
    spec = importlib.util.spec_from_file_location("vllm", FAKE_ROOT / "vllm" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "vllm", module)  # before exec: its dataclasses look it up
    spec.loader.exec_module(module)
    return module


def _engine(fake, **options):
    from jaxalign.rollout.vllm_engine import VllmEngine, VllmOptions

    engine = VllmEngine("/models/m", VllmOptions(**options))
    return engine, fake.LLM.last


def _checkpoint(root: Path, name: str = "v1") -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights " + name.encode())
    (path / "config.json").write_text("{}")
    return path


def _sidecar(fake, tmp_path, **options) -> Sidecar:
    backend = VllmBackend("/models/m", **options)
    dead = []
    sidecar = Sidecar(
        backend,
        model="/models/m",
        max_batch=64,
        max_request_bytes=2**20,
        max_seq_len=4096,
        vocab_size=50,
        weights_roots=[tmp_path],
    )
    sidecar.on_fatal = lambda: dead.append(True)
    sidecar.dead_calls = dead
    return sidecar


def _update(path: Path, version: int = 1, deadline_s: float = 5.0) -> dict:
    return {
        "path": str(path),
        "version": version,
        "checksum": checkpoint_checksum(path),
        "deadline_s": deadline_s,
    }


# --- reset_prefix_cache() -> None on 0.10/0.11 -------------------------------------------


def test_reset_prefix_cache_returning_none_is_a_successful_reload(fake_vllm, tmp_path):
    # Before: `if not reset_prefix_cache(): raise`, so every reload on 0.10/0.11 raised
    # after loading: a 500, then 503 for every /generate.
    sidecar = _sidecar(fake_vllm, tmp_path)
    answer = sidecar.update_weights(_update(_checkpoint(tmp_path)))
    assert answer["weights_version"] == 1 and fake_vllm.LLM.last.reloads == 1
    out = sidecar.generate({"prompts": [[1, 2, 3]], "sampling": {"max_tokens": 4}})
    assert out["weights_version"] == 1 and sidecar.health()["status"] == "ok"


def test_reset_prefix_cache_refused_is_fatal(fake_vllm, tmp_path, monkeypatch):
    from jaxalign.rollout.vllm_engine import VllmEngineDead

    monkeypatch.setenv("FAKE_VLLM_RESET", "false")  # 0.33: False when it could not reset
    engine, _ = _engine(fake_vllm)
    with pytest.raises(VllmEngineDead, match="prefix cache"):
        engine.update_weights(_checkpoint(tmp_path), timeout=5)
    with pytest.raises(VllmEngineDead):
        engine.generate([[1]], SamplingParams(max_tokens=2))


# --- deadlines: an executor that ignores collective_rpc(timeout=) -------------------------


def test_stuck_reload_meets_its_deadline_and_kills_the_sidecar(fake_vllm, tmp_path, monkeypatch):
    # Before: the sidecar waited on collective_rpc for ever, holding the engine lock.
    monkeypatch.setenv("FAKE_VLLM_RPC", "hang")
    sidecar = _sidecar(fake_vllm, tmp_path)
    outcome = {}

    def update():
        try:
            sidecar.update_weights(_update(_checkpoint(tmp_path), deadline_s=0.3))
        except RequestError as e:
            outcome["error"] = e

    thread = threading.Thread(target=update, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(10)
    try:
        assert not thread.is_alive(), "update_weights ignored its deadline"
        assert time.monotonic() - start < 5
        error = outcome["error"]
        assert error.status == 504 and error.extra == {"fatal": True}
        assert "exiting to be restarted" in error.message
        # Dead for good: no generate, no retry in place, and the launcher is told.
        assert sidecar.dead_calls == [True] and sidecar.health()["fatal"] is True
        for call, body in [
            (sidecar.generate, {"prompts": [[1]]}),
            (sidecar.update_weights, _update(_checkpoint(tmp_path, "v2"), version=2)),
        ]:
            with pytest.raises(RequestError) as info:
                call(body)
            assert info.value.status == 503 and info.value.extra == {"fatal": True}
    finally:
        fake_vllm.LLM.last.release.set()


@pytest.mark.parametrize(
    "rpc, status, kind",
    [("bad_checkpoint", 400, "VllmRequestError"), ("error", 500, "VllmEngineDead")],
)
def test_failed_reload_is_fatal_with_the_right_status(fake_vllm, tmp_path, monkeypatch, rpc,
                                                      status, kind):
    # A worker's refusal crosses vLLM's process boundary as a bare Exception: before, a bad
    # checkpoint was a 500, and the sidecar stayed up with half-loaded weights (503 until
    # a reload "succeeded" in place).
    monkeypatch.setenv("FAKE_VLLM_RPC", rpc)
    sidecar = _sidecar(fake_vllm, tmp_path)
    with pytest.raises(RequestError) as info:
        sidecar.update_weights(_update(_checkpoint(tmp_path)))
    assert info.value.status == status and info.value.extra == {"fatal": True}
    assert kind in info.value.message and sidecar.dead_calls == [True]


def test_checks_before_the_workers_leave_the_engine_alive(fake_vllm, tmp_path):
    engine, llm = _engine(fake_vllm)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        engine.update_weights(empty, timeout=5)
    assert engine.dead is None and llm.reloads == 0
    assert engine.update_weights(_checkpoint(tmp_path), timeout=5) == 1


# --- request errors that are not ValueError; greedy n > 1 ---------------------------------


def test_vllm_validation_error_is_a_400(fake_vllm, tmp_path):
    # VLLMValidationError (0.33) is not a ValueError: before, a 500.
    sidecar = _sidecar(fake_vllm, tmp_path)
    body = {"prompts": [list(range(40))], "sampling": {"max_tokens": 30}}  # > fake's 64
    with pytest.raises(RequestError) as info:
        sidecar.generate(body)
    assert info.value.status == 400 and "max_model_len" in info.value.message
    assert sidecar.fatal is None  # the request's fault: the sidecar serves on
    assert sidecar.generate({"prompts": [[1, 2]], "sampling": {"max_tokens": 3}})


def test_greedy_with_n_samples_once_and_copies_like_jax_engine(fake_vllm):
    # vLLM refuses greedy n > 1; JaxEngine returns n equal rows (test_jax_engine.py), so
    # VllmEngine does the same. Before: VLLMValidationError, a 500.
    engine, llm = _engine(fake_vllm)
    out = engine.generate([[1, 2], [3, 4, 5]], SamplingParams(n=3, temperature=0, max_tokens=4))
    assert [len(row) for row in out] == [3, 3]
    for row in out:
        assert all(c.token_ids == row[0].token_ids and c.text == row[0].text for c in row)
        assert row[1] is not row[0]  # copies: a caller may edit one
    assert [sp.n for sp in llm.requests[-1]] == [1, 1]


# --- seeds ------------------------------------------------------------------------------


def test_each_prompt_gets_its_own_seed(fake_vllm):
    # Before: one SamplingParams(seed=params.seed) for every prompt, and vLLM's noise
    # depends on (seed, position): equal-length prompts got the same tokens.
    from jaxalign.rollout.vllm_engine import prompt_seed

    engine, llm = _engine(fake_vllm)
    params = SamplingParams(n=2, max_tokens=6, seed=7)
    out = engine.generate([[1, 2, 3], [4, 5, 6], [7, 8, 9]], params)
    seeds = [sp.seed for sp in llm.requests[-1]]
    assert seeds == [7, prompt_seed(7, 1), prompt_seed(7, 2)] and len(set(seeds)) == 3
    samples = [tuple(c.token_ids) for row in out for c in row]
    assert len(set(samples)) == len(samples)  # no two rows share their noise

    # Prompt 0 alone is seeded exactly as asked; `seeds=` (generate_seeded's fast path)
    # gives prompt i what it draws alone with seed=seeds[i].
    alone = [engine.generate([p], SamplingParams(n=2, max_tokens=6, seed=s))[0]
             for p, s in [([4, 5, 6], 11), ([1, 2, 3], 12)]]
    together = engine.generate([[4, 5, 6], [1, 2, 3]], params, seeds=[11, 12])
    assert [[c.token_ids for c in row] for row in together] == [
        [c.token_ids for c in row] for row in alone
    ]
    with pytest.raises(ValueError, match="2 seeds for 1 prompts"):
        engine.generate([[1]], params, seeds=[1, 2])


def test_generate_seeded_batches_vllm_prompts(fake_vllm):
    from jaxalign.evaluation import generate_seeded

    engine, llm = _engine(fake_vllm)
    before = len(llm.requests)
    generate_seeded(engine, [[1, 2], [3, 4]], SamplingParams(max_tokens=3), [5, 6])
    assert len(llm.requests) == before + 1  # one batched call, not one per prompt
    assert [sp.seed for sp in llm.requests[-1]] == [5, 6]


def test_unseeded_option_sends_no_seed(fake_vllm):
    engine, llm = _engine(fake_vllm, seeded=False)
    engine.generate([[1], [2]], SamplingParams(max_tokens=2, seed=3))
    assert [sp.seed for sp in llm.requests[-1]] == [None, None]


# --- the server process dies, the client restarts it ---------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_cmd(model: Path, port: int, root: Path) -> list[str]:
    return [sys.executable, "-m", "jaxalign.rollout.server", "--backend", "vllm",
            "--model", str(model), "--port", str(port), "--weights-root", str(root)]


def _env(rpc: str) -> dict:
    path = os.pathsep.join([str(FAKE_ROOT), str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "FAKE_VLLM_RPC": rpc, "JAX_PLATFORMS": "cpu"}


def _model_dir(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps({"vocab_size": 50, "max_position_embeddings": 64})
    )
    return model


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _kill(*procs: subprocess.Popen) -> None:
    """Ends the sidecar processes a test started that are still running."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _start(cmd, env) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()
    assert line.startswith(LISTENING), (line, proc.stderr.read() if proc.poll() else "")
    return proc, line[len(LISTENING):].strip()


@pytest.mark.slow
def test_server_process_exits_after_a_stuck_reload(tmp_path):
    model, root = _model_dir(tmp_path), tmp_path / "exports"
    proc, url = _start(_server_cmd(model, 0, root), _env("hang"))
    try:
        status, answer = _post(url + "/update_weights", _update(_checkpoint(root), deadline_s=0.5))
        assert status == 504 and answer["fatal"] is True, answer
        assert proc.wait(timeout=30) == FATAL_EXIT_CODE  # the stuck rpc thread did not hold it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "fatal" in proc.stderr.read()


@pytest.mark.slow
def test_client_restarts_a_sidecar_whose_reload_timed_out(tmp_path):
    from jaxalign.rollout import SidecarEngine

    model, root = _model_dir(tmp_path), tmp_path / "exports"
    port = _free_port()
    proc, url = _start(_server_cmd(model, port, root), _env("hang"))
    restarts = []

    def restart(url):  # a healthy sidecar on the same port (the launcher's job)
        restarts.append(subprocess.Popen(_server_cmd(model, port, root), env=_env("ok"),
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    engine = SidecarEngine(url, restart_command=restart, update_deadline=0.5,
                           restart_timeout=60, startup_timeout=30)
    try:
        # Before: SidecarError (HTTP 504), then 503 on every generate; a retried reload
        # would have run in place on the half-loaded engine.
        assert engine.update_weights(_checkpoint(root)) == 1
        assert proc.wait(timeout=30) == FATAL_EXIT_CODE and len(restarts) == 1
        health = engine.health()[url]
        assert health["weights_version"] == 1 and health["pid"] == restarts[0].pid
        out = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=3))
        assert out[0][0].weights_version == 1
    finally:
        engine.close()
        _kill(proc, *restarts)


@pytest.mark.slow
def test_a_refused_checkpoint_restarts_the_sidecar_but_is_not_resent(tmp_path):
    from jaxalign.rollout import SidecarEngine, SidecarError

    model, root = _model_dir(tmp_path), tmp_path / "exports"
    port = _free_port()
    proc, url = _start(_server_cmd(model, port, root), _env("bad_checkpoint"))
    restarts = []

    def restart(url):
        restarts.append(subprocess.Popen(_server_cmd(model, port, root), env=_env("ok"),
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    engine = SidecarEngine(url, restart_command=restart, restart_timeout=60)
    try:
        # A 4xx is the request's fault: the dead sidecar is replaced (weights of --model,
        # version 0), and the same checkpoint is not sent again to kill the new one too.
        with pytest.raises(SidecarError, match="HTTP 400.*bad checkpoint.*restarted the sidecar"):
            engine.update_weights(_checkpoint(root))
        assert proc.wait(timeout=30) == FATAL_EXIT_CODE and len(restarts) == 1
        assert engine.weights_version == 0 and engine.health()[url]["weights_version"] == 0
        assert engine.generate([[1, 2]], SamplingParams(max_tokens=2))[0][0].weights_version == 0
    finally:
        engine.close()
        _kill(proc, *restarts)


@pytest.mark.slow
def test_without_a_restart_command_the_trainer_is_told_to_restart(tmp_path):
    from jaxalign.rollout import SidecarEngine, SidecarError

    model, root = _model_dir(tmp_path), tmp_path / "exports"
    proc, url = _start(_server_cmd(model, 0, root), _env("error"))
    engine = SidecarEngine(url)
    try:
        with pytest.raises(SidecarError, match="HTTP 500.*the sidecar is exiting: restart it"):
            engine.update_weights(_checkpoint(root))
        assert proc.wait(timeout=30) == FATAL_EXIT_CODE
    finally:
        engine.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_only_the_vllm_adapter_imports_vllm():
    pattern = re.compile(r"^\s*(import vllm|from vllm)\b", re.M)
    importers = sorted(
        str(f.relative_to(REPO)) for f in (REPO / "jaxalign").rglob("*.py")
        if pattern.search(f.read_text())
    )
    assert importers == ["jaxalign/rollout/vllm_engine.py"]


# --- adapter-only updates (issue 18): a LoRARequest swapped in, never a reload in place --------


@dataclasses.dataclass(frozen=True)
class _LoRARequest:  # vllm.lora.request.LoRARequest's positional fields
    lora_name: str
    lora_int_id: int
    lora_path: str


def _adapter(root: Path, name: str, rank: int) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"adapter " + name.encode())
    (path / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 2 * rank}))
    return path


def test_adapter_updates_swap_a_lora_request_and_a_bad_one_never_kills(fake_vllm, tmp_path,
                                                                        monkeypatch):
    lora_pkg = types.ModuleType("vllm.lora")
    request_mod = types.ModuleType("vllm.lora.request")
    request_mod.LoRARequest = _LoRARequest
    monkeypatch.setitem(sys.modules, "vllm.lora", lora_pkg)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request_mod)
    sidecar = _sidecar(fake_vllm, tmp_path, max_lora_rank=8)
    llm = fake_vllm.LLM.last
    assert llm.kwargs["enable_lora"] and llm.kwargs["max_lora_rank"] == 8
    good = _adapter(tmp_path, "a1", rank=4)
    assert sidecar.update_weights({**_update(good, version=3), "adapter": True})[
        "weights_version"] == 3
    out = sidecar.generate({"prompts": [[1, 2]], "sampling": {"max_tokens": 3}})
    assert out["weights_version"] == 3 and llm.reloads == 0  # nothing loaded in place
    assert llm.lora_requests[-1] == _LoRARequest("jaxalign-v3", 4, str(good))
    # the checksum covers adapter_config.json: a changed rank is a different adapter
    before = checkpoint_checksum(good)
    (good / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    assert checkpoint_checksum(good) != before
    # refused before anything changes: the sidecar serves on, with the last adapter
    too_big = _adapter(tmp_path, "a2", rank=16)
    with pytest.raises(RequestError) as info:
        sidecar.update_weights({**_update(too_big, version=4), "adapter": True})
    assert info.value.status == 400 and "--max-lora-rank 8" in info.value.message
    assert sidecar.fatal is None
    sidecar.generate({"prompts": [[1, 2]], "sampling": {"max_tokens": 3}})
    assert llm.lora_requests[-1].lora_path == str(good)
    # full weights replace the adapted policy: no adapter after them
    sidecar.update_weights(_update(_checkpoint(tmp_path), version=5))
    sidecar.generate({"prompts": [[1, 2]], "sampling": {"max_tokens": 3}})
    assert llm.lora_requests[-1] is None


def test_adapter_updates_without_lora_on_say_what_to_start_with(fake_vllm, tmp_path):
    sidecar = _sidecar(fake_vllm, tmp_path)
    with pytest.raises(RequestError) as info:
        sidecar.update_weights({**_update(_adapter(tmp_path, "a", 4)), "adapter": True})
    assert info.value.status == 400 and "--max-lora-rank" in info.value.message
    assert sidecar.fatal is None and "enable_lora" not in fake_vllm.LLM.last.kwargs
    with pytest.raises(RequestError, match="'adapter' must be true or false"):
        sidecar.update_weights({**_update(_checkpoint(tmp_path)), "adapter": "yes"})

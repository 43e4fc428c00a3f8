"""The rollout sidecar, ``--backend jax``, in real subprocesses over loopback HTTP.

Covers: generation equal to ``JaxEngine`` in-process, /health, bearer tokens, 400 / 404 /
405 / 411 / 413 answers, 409 on a weights-version conflict, ``update_weights`` from a
directory and from a model (checksummed, with a deadline; bad checksums and wrong
checkpoints refused with the old weights kept), a sidecar SIGKILLed mid-request (a clear
error without a restart command; restarted, re-synced and retried with one), and two
sidecars load-balanced in input order. Sidecars start once per module, in parallel.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lora_helpers import adapted

from jaxalign.data.tokenizer import byte_tokenizer
from jaxalign.models import from_pretrained, init_model, load_tokenizer, save_pretrained, tiny
from jaxalign.rollout import (
    JaxEngine,
    SamplingParams,
    SidecarEngine,
    SidecarError,
    WeightsVersionError,
)
from jaxalign.rollout.server import (
    LISTENING,
    JaxBackend,
    RequestError,
    Sidecar,
    checkpoint_checksum,
    params_from_json,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-token"
MAX_BATCH = 4
MAX_BYTES = 65536
# Strings and token ids of different lengths, all in one prompt bucket (<= 16 tokens), 8 of
# them: with MAX_BATCH 4 every sidecar compiles few shapes, which keeps the file fast.
PROMPTS = ["1 + 1 =", [5, 17, 40, 99], "The answer is", [200, 3], "x" * 14, [7] * 9, "?", "2*3"]
GREEDY = SamplingParams(temperature=0, max_tokens=12)
SAMPLED = SamplingParams(temperature=1.0, max_tokens=12, n=2, seed=3)


# --- helpers ------------------------------------------------------------------------------


def _server_cmd(model_dir, *extra, port=0):
    return [
        sys.executable,
        "-m",
        "jaxalign.rollout.server",
        "--backend",
        "jax",
        "--model",
        str(model_dir),
        "--dtype",
        "float32",
        "--port",
        str(port),
        "--token",
        TOKEN,
        *map(str, extra),
    ]


def _cache_env(cache: Path) -> dict[str, str]:
    """Sidecars of one model compile the same programs: a shared persistent cache."""
    return dict(
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )


class _Sidecar:
    """A sidecar subprocess; ``url`` once it printed its listening line."""

    def __init__(self, cmd, log: Path, cache: Path | None = None):
        # One CPU device: faster start, and the server needs no mesh.
        env = dict(
            os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1"
        )
        if cache is not None:
            env.update(_cache_env(cache))
        self.log = log
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=open(log, "w"),  # noqa: SIM115 (closed with the process)
            text=True,
        )
        self._url = None

    @property
    def url(self) -> str:
        return self._url or self.wait()

    def wait(self, timeout=120.0) -> str:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: lines.put(self.proc.stdout.readline()), daemon=True).start()
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            line = ""
        if not line.startswith(LISTENING):
            self.kill()
            pytest.fail(f"sidecar did not start: {line!r}\n{self.log.read_text()[-3000:]}")
        self._url = line[len(LISTENING) :].strip()
        return self._url

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _raw(url, method, path, body=None, *, token=TOKEN, headers=None):
    """One HTTP exchange -> (status, JSON answer, response headers)."""
    parsed = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    hdrs = dict(headers or {})
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    try:
        conn.request(method, path, body=body, headers=hdrs)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}"), dict(response.headers)
    finally:
        conn.close()


def _read_all(sock) -> str:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks).decode()


def _tokens(out):
    return [[c.token_ids for c in row] for row in out]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Two tiny checkpoints with the byte tokenizer (seeds 0 and 1) and a wrong-shaped one."""
    root = tmp_path_factory.mktemp("sidecar")
    tok = byte_tokenizer()
    cfg = tiny(vocab_size=len(tok))
    out = {}
    for name, model in [
        ("m0", init_model(cfg, seed=0)),
        ("m1", init_model(cfg, seed=1)),
        ("wrong", init_model(cfg.replace(intermediate_size=96), seed=0)),
    ]:
        out[name] = save_pretrained(model, root / name, tokenizer=tok)
    out["root"] = root
    return out


@pytest.fixture(scope="module")
def sidecars(dirs, tmp_path_factory):
    """Sidecars on m0, starting in parallel with the fixtures and tests that follow.

    A has small limits; B has the defaults; C, on a fixed port, is for the kill test. All
    may load checkpoints from anywhere under pytest's temporary root (``--weights-root``):
    the module's checkpoints and every test's ``tmp_path`` exports.
    """
    root, cache = dirs["root"], dirs["root"] / "jax-cache"
    weights_root = ("--weights-root", tmp_path_factory.getbasetemp())
    a_cmd = _server_cmd(
        dirs["m0"], "--max-batch", MAX_BATCH, "--max-request-bytes", MAX_BYTES, *weights_root
    )
    c_cmd = _server_cmd(dirs["m0"], *weights_root, port=_free_port())
    procs = {
        "a": _Sidecar(a_cmd, root / "a.log", cache),
        "b": _Sidecar(_server_cmd(dirs["m0"], *weights_root), root / "b.log", cache),
        "c": _Sidecar(c_cmd, root / "c.log", cache),
    }
    # How the kill test restarts C: the same command, the same compilation cache.
    procs["c_restart"] = ["env", *(f"{k}={v}" for k, v in _cache_env(cache).items()), *c_cmd]
    try:
        yield procs  # their URLs wait for the listening line, so what follows overlaps
    finally:
        for key in "abc":
            procs[key].kill()


@pytest.fixture(scope="module")
def reference(dirs):
    """In-process ``JaxEngine`` results for m0 and m1 (the sidecar's settings)."""
    out = {}
    engine = JaxEngine(from_pretrained(dirs["m0"], dtype=jnp.float32), load_tokenizer(dirs["m0"]))
    for name in ("m0", "m1"):
        engine.update_weights(dirs[name])  # one engine: its compiled functions are reused
        out[name] = {
            "greedy": engine.generate(PROMPTS, GREEDY),
            "sampled": engine.generate(PROMPTS, SAMPLED),
        }
    # The two checkpoints must be distinguishable by their outputs.
    assert _tokens(out["m0"]["greedy"]) != _tokens(out["m1"]["greedy"])
    return out


def _client(url, **kwargs) -> SidecarEngine:
    return SidecarEngine(url, token=TOKEN, retries=1, backoff=0.05, **kwargs)


def _sync(client: SidecarEngine, model_dir) -> int:
    """Puts every sidecar of ``client`` on ``model_dir`` with a fresh version."""
    return client.update_weights(model_dir)


# --- wire format (in-process) ---------------------------------------------------------------


def test_checksum_sees_content_and_names(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"a" * 1000)
    first = checkpoint_checksum(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"a" * 999 + b"b")  # same size, one byte
    assert checkpoint_checksum(tmp_path) != first
    (tmp_path / "model.safetensors").rename(tmp_path / "other.safetensors")
    assert checkpoint_checksum(tmp_path) not in (first,)
    with pytest.raises(FileNotFoundError):
        checkpoint_checksum(tmp_path / "missing")


def test_sampling_params_validation_messages():
    assert params_from_json({"stop": "x", "n": 2}) == SamplingParams(stop=("x",), n=2)
    for bad, message in [
        ({"n": 1.5}, "sampling.n must be an integer"),
        ({"n": True}, "sampling.n must be an integer"),
        ({"temperature": "hot"}, "sampling.temperature must be a number"),
        ({"stop_token_ids": [1, "2"]}, "must be a list of integers"),
        ({"temprature": 0}, "unknown sampling field"),
        ({"top_p": 0}, "top_p=0 must be in (0, 1]"),
    ]:
        with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)")):
            params_from_json(bad)


class _FakeInPlaceBackend:
    """A backend that reloads in place (like vLLM) and can be told to time out."""

    name, atomic_reload, weights_dtype, weights_version = "fake", False, "bfloat16", 0

    def __init__(self):
        self.fail = False

    def encode(self, text):
        return list(text.encode())

    def generate(self, prompts, params):
        return [[] for _ in prompts]

    def reload(self, path, version, timeout):
        if self.fail:
            raise TimeoutError("stuck")
        self.weights_version = version


def test_failed_in_place_reload_is_fatal_never_retried_in_place(tmp_path):
    """vLLM reloads in place: after a failed reload the weights are unknown, so the sidecar
    refuses generation and further reloads (503, fatal): it is restarted, not retried."""
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    backend = _FakeInPlaceBackend()
    sidecar = Sidecar(
        backend,
        model="m",
        max_batch=8,
        max_request_bytes=1000,
        max_seq_len=512,
        vocab_size=9,
        weights_roots=[tmp_path],
    )
    update = {"path": str(tmp_path), "version": 3, "checksum": checkpoint_checksum(tmp_path)}
    backend.fail = True
    with pytest.raises(RequestError) as info:
        sidecar.update_weights(update)
    assert info.value.status == 504 and sidecar.health()["weights_ok"] is False
    with pytest.raises(RequestError) as info:
        sidecar.generate({"prompts": ["a"]})
    assert info.value.status == 503 and "unknown state" in info.value.message
    backend.fail = False  # never retried in place: the process restarts from --model
    with pytest.raises(RequestError) as info:
        sidecar.update_weights(update)
    assert info.value.status == 503 and info.value.extra == {"fatal": True}


# Every SamplingParams field, with values the engines cannot take: JSON types, NaN and
# infinities (Python's JSON parser accepts them), integers past what the engines represent,
# semantic ranges, token ids past the vocabulary (9 here). Each must be a 400 naming the
# field, found before the engine runs (issue #19: NaN was a 500 after 2.5 s of decoding,
# seed 2**80 an OverflowError and a 500).
_BAD_SAMPLING = [
    ({"n": 0}, "n=0 must be >= 1"),
    ({"n": 2**80}, "sampling.n must be an integer (32-bit"),
    ({"temperature": float("nan")}, "sampling.temperature must be a number, finite and >= 0"),
    ({"temperature": float("inf")}, "sampling.temperature must be a number, finite and >= 0"),
    ({"temperature": 10**400}, "sampling.temperature must be a number, finite and >= 0"),
    ({"temperature": -0.5}, "temperature=-0.5 must be finite and >= 0"),
    ({"top_p": float("nan")}, "sampling.top_p must be a number in (0, 1]"),
    ({"top_p": 1.5}, "top_p=1.5 must be in (0, 1]"),
    ({"top_k": -2}, "top_k=-2 must be -1, 0 (off) or positive"),
    ({"top_k": 2**40}, "sampling.top_k must be an integer (32-bit"),
    ({"max_tokens": 2**31}, "sampling.max_tokens must be an integer (32-bit"),
    ({"max_tokens": 0}, "max_tokens=0 must be >= 1"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens=5 must be in [0, max_tokens]"),
    ({"min_tokens": 2**63}, "sampling.min_tokens must be an integer (32-bit"),
    ({"stop": ["x", 3]}, "sampling.stop must be a string or a list of strings"),
    ({"stop": [""]}, "stop strings must be non-empty"),
    ({"include_stop_str_in_output": 1}, "sampling.include_stop_str_in_output must be true"),
    ({"stop_token_ids": [-1]}, "sampling.stop_token_ids must be a list of integers"),
    ({"stop_token_ids": [2**80]}, "sampling.stop_token_ids must be a list of integers"),
    ({"stop_token_ids": [3, 9]}, "sampling.stop_token_ids [9] outside the vocabulary [0, 9)"),
    ({"seed": 2**80}, "sampling.seed must be an integer in [0, 2**32)"),
    ({"seed": 2**32}, "sampling.seed must be an integer in [0, 2**32)"),  # would alias seed 0
    ({"seed": -1}, "sampling.seed must be an integer in [0, 2**32)"),
    ({"seed": 1.0}, "sampling.seed must be an integer in [0, 2**32)"),
    ({"logprobs": "yes"}, "sampling.logprobs must be true or false"),
]


@pytest.mark.parametrize("sampling, message", _BAD_SAMPLING)
def test_every_sampling_field_is_checked_at_the_edge(sampling, message):
    with pytest.raises(RequestError) as info:
        params_from_json(sampling, vocab_size=9)
    assert info.value.status == 400 and message in info.value.message, info.value.message


def test_the_edge_table_covers_every_field_and_keeps_the_extremes():
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    assert {name for sampling, _ in _BAD_SAMPLING for name in sampling} == fields
    edge = {"seed": 2**32 - 1, "top_k": -1, "temperature": 0, "top_p": 1, "stop_token_ids": [8]}
    assert params_from_json(edge, vocab_size=9) == SamplingParams(**edge)
    assert params_from_json({"seed": 0, "min_tokens": 4, "max_tokens": 4}).seed == 0


class _RecordingBackend(_FakeInPlaceBackend):
    """Counts engine calls: a refused request must never reach the engine."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def generate(self, prompts, params):
        self.calls += 1
        return super().generate(prompts, params)


def _fake_sidecar(backend, **kwargs) -> Sidecar:
    limits = dict(max_batch=8, max_request_bytes=1000, max_seq_len=512, vocab_size=9)
    return Sidecar(backend, model="m", **{**limits, **kwargs})


def test_greedy_n_above_one_warns_once(capsys):
    sidecar = _fake_sidecar(_RecordingBackend())
    for _ in range(2):
        sidecar.generate({"prompts": [[1, 2]], "sampling": {"n": 3, "temperature": 0.0}})
    sidecar.generate({"prompts": [[1, 2]], "sampling": {"n": 3, "temperature": 0.7}})
    err = capsys.readouterr().err
    assert err.count("n=3 samples at temperature 0: they are n copies") == 1


def test_bad_sampling_never_reaches_the_engine():
    backend = _RecordingBackend()
    sidecar = _fake_sidecar(backend)
    for sampling, message in _BAD_SAMPLING:
        with pytest.raises(RequestError) as info:
            sidecar.generate({"prompts": [[1, 2]], "sampling": sampling})
        assert info.value.status == 400 and message in info.value.message
    assert backend.calls == 0
    sidecar.generate({"prompts": [[1, 2]], "sampling": {"seed": 2**32 - 1}})
    assert backend.calls == 1


def _fake_checkpoint(directory: Path, content: bytes = b"weights") -> Path:
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(content)
    (directory / "config.json").write_text("{}")
    return directory


def test_update_weights_only_from_under_the_weights_root(tmp_path):
    """Resolved paths only: ``..``, a symlinked directory or a symlinked file that leads out
    of the root is refused (403) before anything is read; inside it, links are fine."""
    root = tmp_path / "exports"
    good = _fake_checkpoint(root / "v00000001")
    outside = _fake_checkpoint(tmp_path / "elsewhere" / "ckpt", b"secret")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "alias").symlink_to(good, target_is_directory=True)  # stays inside: allowed
    mixed = root / "v00000002"
    mixed.mkdir()
    (mixed / "config.json").write_text("{}")
    (mixed / "model.safetensors").symlink_to(outside / "model.safetensors")
    backend = _FakeInPlaceBackend()
    # The root itself given through a symlink: compared after resolving, like the paths.
    (tmp_path / "root-link").symlink_to(root, target_is_directory=True)
    sidecar = _fake_sidecar(backend, weights_roots=[tmp_path / "root-link"])
    assert sidecar.health()["weights_roots"] == [str(root.resolve())]

    def update(path, checksum="sha256:" + "0" * 64):
        return sidecar.update_weights({"path": str(path), "version": 5, "checksum": checksum})

    for path in [
        outside,
        root / ".." / "elsewhere" / "ckpt",
        root / "escape",
        "/etc",
        "/no/such/dir",  # not even whether it exists is said
        tmp_path,  # the root's parent
    ]:
        with pytest.raises(RequestError) as info:
            update(path, checkpoint_checksum(outside))
        assert info.value.status == 403, path
        assert "not under this sidecar's weights root" in info.value.message
        assert "--weights-root" in info.value.message
    with pytest.raises(RequestError) as info:
        update(mixed)
    assert info.value.status == 403 and "links outside the weights root" in info.value.message
    assert backend.weights_version == 0  # nothing was loaded
    assert update(root / "alias", checkpoint_checksum(good))["weights_version"] == 5
    assert update(good, checkpoint_checksum(good))["weights_version"] == 5


def test_update_deadline_nan_is_400_and_huge_ones_are_capped(tmp_path):
    good = _fake_checkpoint(tmp_path / "v1")
    backend = _FakeInPlaceBackend()
    sidecar = _fake_sidecar(backend, weights_roots=[tmp_path])
    update = {"path": str(good), "version": 2, "checksum": checkpoint_checksum(good)}
    for bad in (float("nan"), 0, -1.0, "10", True):
        with pytest.raises(RequestError) as info:
            sidecar.update_weights({**update, "deadline_s": bad})
        assert info.value.status == 400 and "'deadline_s' must be" in info.value.message
    for huge in (float("inf"), 10**400):  # as long as --max-update-deadline allows
        assert sidecar.update_weights({**update, "deadline_s": huge})["weights_version"] == 2


def test_default_weights_root_is_where_the_client_exports():
    """No flags on either side: the client's default export directory is under the server's
    default root (/dev/shm when writable, else the temp dir)."""
    from jaxalign.rollout import client, server

    sidecar = _fake_sidecar(_FakeInPlaceBackend())
    assert sidecar.weights_roots == [os.path.realpath(server.default_weights_root())]
    export = client._default_export_dir()
    try:
        assert os.path.realpath(export).startswith(sidecar.weights_roots[0] + os.sep)
    finally:
        export.rmdir()
    args = server.parse_args(["--backend", "jax", "--model", "m"])
    assert args.weights_root is None  # -> Sidecar's default
    args = server.parse_args(
        ["--backend", "jax", "--model", "m", "--weights-root", "/a", "--weights-root", "/b"]
    )
    assert args.weights_root == ["/a", "/b"]
    with pytest.raises(ValueError, match="weights_roots is empty"):
        _fake_sidecar(_FakeInPlaceBackend(), weights_roots=[])



def test_help_shows_defaults_but_never_the_token(monkeypatch, capsys):
    from jaxalign.rollout import server

    monkeypatch.setenv("COLUMNS", "300")  # no wrapping inside a flag's help
    monkeypatch.setenv(server.TOKEN_ENV, "s3cret-from-env")
    with pytest.raises(SystemExit) as info:
        server.parse_args(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "s3cret-from-env" not in text  # the token is read after parsing
    for flag, default in [("--host", "127.0.0.1"), ("--port", 0),
                          ("--max-request-bytes", server.DEFAULT_MAX_REQUEST_BYTES),
                          ("--max-batch", server.DEFAULT_MAX_BATCH),
                          ("--max-update-deadline", server.DEFAULT_UPDATE_DEADLINE_S),
                          ("--dtype", "bfloat16"), ("--engine-batch", 64), ("--seed", 0)]:
        assert f"(default: {default})" in text.split(f"  {flag} ", 1)[1].split("\n  -")[0], flag
    assert "(default: None)" not in text and "(default: False)" not in text
    # The environment still supplies the token, and --token still wins over it.
    argv = ["--backend", "jax", "--model", "m"]
    assert server.parse_args(argv).token == "s3cret-from-env"
    assert server.parse_args([*argv, "--token", "t"]).token == "t"
    monkeypatch.delenv(server.TOKEN_ENV)
    assert server.parse_args(argv).token is None

def test_jax_backend_late_reload_keeps_the_old_weights(dirs, sidecars):
    del sidecars  # requested only so that they boot while this runs
    backend = JaxBackend(str(dirs["m0"]), dtype="float32", param_dtype="float32", engine_batch=8)
    before = [np.asarray(x) for x in jax.tree.leaves(backend.engine.state)]
    with pytest.raises(TimeoutError):
        backend.reload(str(dirs["m1"]), 7, timeout=1e-4)
    for thread in threading.enumerate():  # let the abandoned load finish: it must not swap
        if thread.name == "sidecar-reload":
            thread.join(60)
    assert backend.weights_version == 0
    after = [np.asarray(x) for x in jax.tree.leaves(backend.engine.state)]
    assert all(np.array_equal(x, y) for x, y in zip(before, after, strict=True))
    backend.reload(str(dirs["m1"]), 8, timeout=60)
    assert backend.weights_version == 8
    with pytest.raises(ValueError, match="served model has"):
        backend.reload(str(dirs["wrong"]), 9, timeout=60)
    assert backend.weights_version == 8


# --- one sidecar ----------------------------------------------------------------------------


def test_health_and_generation_match_in_process_engine(sidecars, reference):
    a, b = sidecars["a"], sidecars["b"]
    status, health, _ = _raw(a.url, "GET", "/health")
    assert status == 200
    assert health["backend"] == "jax" and health["busy"] is False
    assert health["max_batch"] == MAX_BATCH and health["weights_ok"] is True
    # where it computes, for a trainer on the same host (client.gpus_shared_with_sidecars)
    assert health["platform"] == "cpu" and "cuda_visible_devices" in health
    # B takes the whole batch in one request, so even sampling reproduces JaxEngine (A
    # would cut it in two, and the second request gets its own seed).
    client = _client(b.url)
    for key, params in [("greedy", GREEDY), ("sampled", SAMPLED)]:
        out = client.generate(PROMPTS, params)
        ref = reference["m0"][key]
        assert _tokens(out) == _tokens(ref)
        for row, ref_row in zip(out, ref, strict=True):
            for c, r in zip(row, ref_row, strict=True):
                assert c.text == r.text and c.finish_reason == r.finish_reason
                assert c.prompt_token_ids == r.prompt_token_ids
                np.testing.assert_array_equal(c.logprobs, r.logprobs)  # same XLA program
                assert c.weights_version == client.weights_version
    assert client.generate([], GREEDY) == []


def test_bearer_token_required(sidecars):
    a = sidecars["a"]
    for token in (None, "wrong"):
        status, answer, headers = _raw(a.url, "GET", "/health", token=token)
        assert status == 401 and "bearer token" in answer["error"]
        assert headers["WWW-Authenticate"].startswith("Bearer")
    status, _, _ = _raw(a.url, "POST", "/generate", {"prompts": ["a"]}, token="wrong")
    assert status == 401
    with pytest.raises(SidecarError, match="HTTP 401"):
        SidecarEngine(a.url, token="wrong", retries=0)


@pytest.mark.parametrize(
    "body, message",
    [
        (b"{bad", "not valid JSON"),
        ([1, 2], "must be a JSON object"),
        ({"prompts": "x"}, "'prompts' must be a list"),
        ({"prompts": ["a"], "extra": 1}, "unknown field"),
        ({"prompts": ["a"], "sampling": {"temprature": 0}}, "unknown sampling field"),
        ({"prompts": ["a"], "sampling": {"n": 1.5}}, "sampling.n must be an integer"),
        ({"prompts": ["a"], "sampling": {"max_tokens": 0}}, "max_tokens=0 must be >= 1"),
        ({"prompts": [[-1, 3]]}, "outside [0, 262)"),
        ({"prompts": [[3, 1.5]]}, "must be a string or a list of token ids"),
        ({"prompts": [[]]}, "is empty"),
        ({"prompts": [""]}, "is empty"),
        ({"prompts": ["a"], "expected_weights_version": "1"}, "must be an integer"),
    ],
)
def test_malformed_generate_is_400(sidecars, body, message):
    a = sidecars["a"]
    status, answer, _ = _raw(a.url, "POST", "/generate", body)
    assert status == 400, answer
    assert message in answer["error"]


def test_malformed_update_and_routes(sidecars, dirs):
    a = sidecars["a"]
    checksum = checkpoint_checksum(dirs["m1"])
    for body, message in [
        # (under the weights root: a path outside it is refused before it is looked at)
        (
            {"path": str(dirs["root"] / "no-such-dir"), "version": 1, "checksum": checksum},
            "no such directory",
        ),
        ({"path": str(dirs["m1"]), "version": -1, "checksum": checksum}, "non-negative"),
        ({"path": str(dirs["m1"]), "version": 1, "checksum": "md5:x"}, "'checksum' must"),
        ({"path": str(dirs["m1"]), "version": 1}, "'checksum' must"),
    ]:
        status, answer, _ = _raw(a.url, "POST", "/update_weights", body)
        assert status == 400 and message in answer["error"], answer
    assert _raw(a.url, "GET", "/generate")[0] == 405
    assert _raw(a.url, "GET", "/nothing")[0] == 404
    assert _raw(a.url, "GET", "/health")[1]["weights_ok"] is True


def test_nan_and_huge_sampling_values_are_400_before_the_engine(sidecars):
    """The two requests of issue #19, over HTTP: ``temperature: NaN`` (a JSON extension
    Python parses) and ``seed: 2**80``; both refused at once, the engine never called."""
    a = sidecars["a"]
    served = _raw(a.url, "GET", "/health")[1]["served"]["generate"]
    for body, message in [
        (b'{"prompts": ["a"], "sampling": {"temperature": NaN}}', "sampling.temperature"),
        (b'{"prompts": ["a"], "sampling": {"top_p": Infinity}}', "sampling.top_p"),
        ({"prompts": ["a"], "sampling": {"seed": 2**80}}, "sampling.seed"),
        ({"prompts": ["a"], "sampling": {"stop_token_ids": [262]}}, "outside the vocabulary"),
    ]:
        t0 = time.monotonic()
        status, answer, _ = _raw(a.url, "POST", "/generate", body)
        assert status == 400 and message in answer["error"], answer
        assert time.monotonic() - t0 < 2.0  # refused, not decoded
    health = _raw(a.url, "GET", "/health")[1]
    assert health["served"]["generate"] == served and health["weights_ok"] is True


def test_update_weights_outside_the_root_is_403(sidecars, dirs):
    """A real checkpoint outside ``--weights-root`` (here: pytest's temporary root) is
    refused, directly, through ``..`` and through a symlink; the weights stay."""
    import shutil
    import tempfile

    a = sidecars["a"]
    before = _raw(a.url, "GET", "/health")[1]
    assert before["weights_roots"] == [os.path.realpath(dirs["root"].parent)]
    outside = Path(tempfile.mkdtemp(prefix="jaxalign-outside-root-"))
    try:
        shutil.copytree(dirs["m1"], outside / "m1")
        link = dirs["root"] / "link-out"
        link.symlink_to(outside / "m1", target_is_directory=True)
        dotdot = Path(before["weights_roots"][0], *[".."] * 8, *outside.parts[1:], "m1")
        checksum = checkpoint_checksum(outside / "m1")
        for path in (outside / "m1", dotdot, link):
            body = {"path": str(path), "version": 77, "checksum": checksum}
            status, answer, _ = _raw(a.url, "POST", "/update_weights", body)
            assert status == 403 and "--weights-root" in answer["error"], answer
        with pytest.raises(SidecarError, match="HTTP 403"):
            _client(a.url).update_weights(str(outside / "m1"))
    finally:
        shutil.rmtree(outside)
    after = _raw(a.url, "GET", "/health")[1]
    assert after["weights_version"] == before["weights_version"] and after["weights_ok"]


def test_oversize_requests_are_413(sidecars):
    a = sidecars["a"]
    parsed = urllib.parse.urlsplit(a.url)
    # A terabyte announced, nothing sent: refused from the header alone.
    with socket.create_connection((parsed.hostname, parsed.port), timeout=10) as s:
        s.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n"
            + f"Authorization: Bearer {TOKEN}\r\n\r\n".encode()
        )
        reply = _read_all(s)
    assert reply.startswith("HTTP/1.0 413") and "max-request-bytes" in reply
    # A body just over the limit, actually sent.
    status, answer, _ = _raw(a.url, "POST", "/generate", {"prompts": ["y" * MAX_BYTES]})
    assert status == 413 and "exceeds --max-request-bytes" in answer["error"]
    # More rows than --max-batch, and a prompt that cannot fit max_tokens.
    body = {"prompts": PROMPTS, "sampling": {"n": 2}}
    status, answer, _ = _raw(a.url, "POST", "/generate", body)
    assert status == 413 and "at most 4" in answer["error"]
    body = {"prompts": ["abc"], "sampling": {"max_tokens": 600}}
    status, answer, _ = _raw(a.url, "POST", "/generate", body)
    assert status == 413 and "max_seq_len=512" in answer["error"]
    # No Content-Length at all.
    with socket.create_connection((parsed.hostname, parsed.port), timeout=10) as s:
        s.sendall(f"POST /generate HTTP/1.0\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
        assert _read_all(s).startswith("HTTP/1.0 411")
    assert _raw(a.url, "GET", "/health")[0] == 200  # still serving


def test_weights_version_conflict_is_409(sidecars):
    a = sidecars["a"]
    client = _client(a.url)
    current = client.weights_version
    body = {"prompts": ["a"], "expected_weights_version": current + 7}
    status, answer, _ = _raw(a.url, "POST", "/generate", body)
    assert status == 409
    assert answer["expected_weights_version"] == current + 7
    assert answer["weights_version"] == current
    client.weights_version = current + 7  # a trainer that believes in another policy
    with pytest.raises(WeightsVersionError) as info:
        client.generate(["a"], GREEDY)
    assert info.value.expected == current + 7 and info.value.actual == current
    assert f"expects version {current + 7}" in str(info.value)
    assert f"has version {current}" in str(info.value)


def test_update_weights_changes_outputs_and_version(sidecars, dirs, reference, tmp_path):
    a = sidecars["a"]
    client = _client(a.url, export_dir=tmp_path / "exports")
    before = client.weights_version

    # From a directory: outputs become m1's, and completions carry the new version.
    version = client.update_weights(str(dirs["m1"]), version=before + 10)
    assert version == before + 10 == client.weights_version
    assert _raw(a.url, "GET", "/health")[1]["weights_version"] == version
    out = client.generate(PROMPTS, GREEDY)
    assert _tokens(out) == _tokens(reference["m1"]["greedy"])
    assert {c.weights_version for row in out for c in row} == {version}

    # A bad checksum is refused before loading; the weights stay.
    body = {"path": str(dirs["m0"]), "version": 99, "checksum": "sha256:" + "0" * 64}
    status, answer, _ = _raw(a.url, "POST", "/update_weights", body)
    assert status == 400 and "checksum mismatch" in answer["error"]
    # A checkpoint of another shape fails to load; the JAX backend keeps the old weights.
    body = {
        "path": str(dirs["wrong"]),
        "version": 99,
        "checksum": checkpoint_checksum(dirs["wrong"]),
    }
    status, answer, _ = _raw(a.url, "POST", "/update_weights", body)
    assert status == 400 and "reload failed" in answer["error"]
    # A deadline that has passed before the reload can start.
    late = _client(a.url, update_deadline=1e-6)
    with pytest.raises(SidecarError, match="HTTP 504"):
        late.update_weights(str(dirs["m0"]))
    health = _raw(a.url, "GET", "/health")[1]
    assert health["weights_version"] == version and health["weights_ok"] is True
    assert _tokens(client.generate(PROMPTS, GREEDY)) == _tokens(reference["m1"]["greedy"])

    # From a model: exported (versioned directory, checksummed), reloaded, equal to m0.
    tok = byte_tokenizer()
    model = init_model(tiny(vocab_size=len(tok)), seed=0)
    version = client.update_weights(model)
    assert version == before + 11
    assert client.last_sync.path.endswith(f"v{version:08d}")
    assert client.last_sync.export_s > 0 and client.last_sync.reload_s > 0
    out = client.generate(PROMPTS, GREEDY)
    assert _tokens(out) == _tokens(reference["m0"]["greedy"])
    client.update_weights(model)  # the older export is pruned (keep_exports=1)
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == [f"v{version + 1:08d}"]
    with pytest.raises(TypeError, match="model or a checkpoint directory"):
        client.update_weights({"not": "a model"})
    client.close()
    assert not (tmp_path / "exports" / f"v{version + 1:08d}").exists()


def test_a_lora_policy_syncs_its_adapter_alone(sidecars, dirs, tmp_path):
    """A model with adapters is sent as a PEFT adapter (a few KB here); the JAX sidecar
    applies it to its base weights: outputs equal the merged model's in-process, and a
    second adapter replaces the first (it is not stacked on it)."""
    from jaxalign.models import lora

    b = sidecars["b"]
    client = _client(b.url, export_dir=tmp_path / "exports")
    client.update_weights(str(dirs["m0"]))  # the base, whatever earlier tests loaded
    engine = JaxEngine(from_pretrained(dirs["m0"], dtype=jnp.float32), byte_tokenizer())
    for seed in (1, 2):
        policy = adapted(init_model(tiny(vocab_size=len(byte_tokenizer())), seed=0), seed)
        version = client.update_weights(policy)
        sent = Path(client.last_sync.path)
        assert sorted(p.name for p in sent.iterdir()) == ["adapter_config.json",
                                                         "adapter_model.safetensors"]
        engine.update_weights(nnx.state(lora.merge_lora(policy), nnx.Param))
        want = engine.generate(PROMPTS, GREEDY)
        out = client.generate(PROMPTS, GREEDY)
        assert _tokens(out) == _tokens(want)
        assert {c.weights_version for row in out for c in row} == {version}
    base = JaxEngine(from_pretrained(dirs["m0"], dtype=jnp.float32), byte_tokenizer())
    assert _tokens(out) != _tokens(base.generate(PROMPTS, GREEDY))  # the adapter mattered
    client.close()


# --- several sidecars ------------------------------------------------------------------------


def test_two_sidecars_load_balanced_in_order(sidecars, dirs, reference):
    a, b = sidecars["a"], sidecars["b"]
    client = _client([a.url, b.url])
    _sync(client, dirs["m0"])  # earlier tests left them on different versions
    served = {u: h["served"]["generate"] for u, h in client.health().items()}
    out = client.generate(PROMPTS, GREEDY)
    assert _tokens(out) == _tokens(reference["m0"]["greedy"])
    assert [row[0].prompt_token_ids for row in out] == [
        row[0].prompt_token_ids for row in reference["m0"]["greedy"]
    ]
    after = {u: h["served"]["generate"] for u, h in client.health().items()}
    assert after[a.url] == served[a.url] + 1 and after[b.url] == served[b.url] + 1
    # n=2: A's share (4 prompts x 2 = 8 rows) is over its max_batch of 4, so the client
    # sends it as two requests. Every prompt answered once, in order, n completions each.
    out = client.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, n=2))
    assert len(out) == len(PROMPTS) and all(len(row) == 2 for row in out)
    ref = _tokens(reference["m0"]["greedy"])
    assert [[c.token_ids for c in row] for row in out] == [[r[0], r[0]] for r in ref]
    assert client.health()[a.url]["served"]["generate"] == after[a.url] + 2


def test_sidecars_on_different_versions_refuse_to_generate(sidecars, dirs):
    a, b = sidecars["a"], sidecars["b"]
    _client(a.url).update_weights(str(dirs["m1"]))
    client = _client([a.url, b.url])
    assert client.weights_version is None  # they disagree: refuse until synced
    with pytest.raises(SidecarError, match="different weights versions"):
        client.generate(PROMPTS, GREEDY)
    _sync(client, dirs["m0"])
    assert len(client.generate(PROMPTS, GREEDY)) == len(PROMPTS)


# --- failures --------------------------------------------------------------------------------


def test_killed_sidecar_reports_then_restarts(sidecars, dirs, reference):
    first = sidecars["c"]
    restarting = None
    try:
        url = first.url
        restarting = _client(url, restart_command=sidecars["c_restart"], restart_timeout=120)
        restarting.update_weights(str(dirs["m1"]), version=5)
        plain = _client(url)
        assert plain.weights_version == 5

        # SIGKILL while a request is running: the client without a restart command says so.
        errors = []

        def long_generate():
            try:
                plain.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=480))
            except SidecarError as e:
                errors.append(e)

        worker = threading.Thread(target=long_generate)
        worker.start()
        deadline = time.monotonic() + 60
        while not _raw(url, "GET", "/health")[1]["busy"]:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.02)
        os.kill(first.proc.pid, signal.SIGKILL)
        worker.join(60)
        assert len(errors) == 1
        message = str(errors[0])
        assert url in message and "unreachable" in message and "restart_command" in message

        # With a restart command: restarted, given version 5 again, and the batch retried.
        out = restarting.generate(PROMPTS, GREEDY)
        assert _tokens(out) == _tokens(reference["m1"]["greedy"])
        assert {c.weights_version for row in out for c in row} == {5}
        health = _raw(url, "GET", "/health")[1]
        assert health["weights_version"] == 5 and health["pid"] != first.proc.pid
    finally:
        if restarting is not None:
            restarting.close()  # stops the restarted sidecar

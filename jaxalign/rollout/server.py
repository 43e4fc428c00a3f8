"""The rollout sidecar: a generation engine in its own process, behind a small HTTP API.

    python -m jaxalign.rollout.server --backend vllm --model DIR [--host 127.0.0.1] [--port 0]
        [--token SECRET] [--max-request-bytes 67108864] [--max-batch 1024]
        [--weights-root DIR ...]

On startup it loads the model, then prints one line a launcher can parse,
``jaxalign-sidecar listening on http://HOST:PORT`` (``--port 0`` picks a free port), and
serves JSON over HTTP (``ThreadingHTTPServer``; every endpoint needs ``Authorization:
Bearer SECRET`` when a token is set, by ``--token`` or the ``JAXALIGN_SIDECAR_TOKEN``
environment variable, which keeps it out of ``ps``):

``GET /health``
    ``{"backend", "model", "weights_version", "weights_ok", "busy", "weights_dtype",
    "max_batch", "max_request_bytes", "max_seq_len", "weights_roots", "served", "pid",
    "platform", "cuda_visible_devices"}``.
``POST /generate``
    ``{"prompts": [str | [int]], "sampling": {SamplingParams fields},
    "expected_weights_version": int | null}`` ->
    ``{"weights_version": int, "completions": [[{Completion fields}] per prompt]}``.
    409 when ``expected_weights_version`` differs from the loaded weights: a trainer never
    mixes rollouts of two policies silently. Every sampling field is checked before the
    engine runs (JSON type, finite numbers, integers the engines can hold: seeds in
    ``[0, 2**32)``, counts in 32 bits; the ``SamplingParams`` ranges; stop token ids below
    the vocabulary size), so a bad value is a 400 naming the field, never an engine error.
``POST /update_weights``
    ``{"path": dir, "version": int, "checksum": "sha256:...", "deadline_s": float}`` ->
    ``{"weights_version": int, "seconds": float}``. The directory is a Hugging Face
    checkpoint written by ``save_pretrained``. It must lie under a ``--weights-root``
    (default ``/dev/shm``, else the temp dir: where ``SidecarEngine`` exports by default)
    once symlinks and ``..`` are resolved, and so must any file of it that is a symlink;
    else 403, before the path is even looked at: the token says who may ask, the roots say
    what may be read. The server verifies ``checksum`` (see ``checkpoint_checksum``) before
    loading, refusing a mismatch (400), and gives up after ``deadline_s`` (504). The JAX
    backend swaps the new state in atomically, so a failed or late reload keeps the old
    weights. vLLM loads in place, so a reload that failed (400 / 500) or timed out (504) is
    fatal for the process: the weights are a mix of two policies, and a timed-out vLLM call
    cannot be cancelled (with one GPU it holds the engine, with several its late reply stays
    queued). The answer then carries ``"fatal": true``, every later request (``/health``
    included) answers 503 with it, and the process exits ``FATAL_EXIT_CODE`` a moment later,
    to be restarted from ``--model`` (the client's ``restart_command``, or the launcher);
    a reload is never retried in place. An engine that reports itself dead while generating
    (``VllmEngineDead``) is fatal the same way.

Errors are ``{"error": message}``: 400 malformed (bad JSON, unknown or mistyped fields,
``SamplingParams`` validation), 401 missing or wrong token, 403 a checkpoint outside the
weights roots, 411 no Content-Length, 413 too large (a body over ``--max-request-bytes`` is
refused from its Content-Length, before it is read; more rows than ``--max-batch``; a
prompt plus ``max_tokens`` over ``--max-seq-len``), 404 / 405 unknown endpoint or method,
500 engine failure, 503 weights unknown (the sidecar is dead and exiting), 504 reload
deadline passed. vLLM's own refusals (``ValueError`` on 0.10/0.11, ``VLLMValidationError``,
not a ValueError, on 0.33+) are 400s like ours (``vllm_engine.VllmRequestError``). The
engine runs one request at a time (a lock); others wait and ``/health`` reports ``busy``.

The wire format (``params_from_json``, ``completion_to_json``, ``checkpoint_checksum``,
``RequestError``) is ``jaxalign.rollout.wire``, shared with ``jaxalign.rollout.client``.
"""

from __future__ import annotations

import argparse
import hmac
import http.server
import json
import os
import signal
import socket
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jaxalign.rollout.types import Completion, SamplingParams
from jaxalign.rollout.wire import (  # noqa: F401  (LISTENING, checksums: part of this API)
    LISTENING,
    TOKEN_ENV,
    RequestError,
    checkpoint_checksum,
    completion_from_json,
    completion_to_json,
    default_weights_root,
    params_from_json,
    params_to_json,
)

DEFAULT_MAX_REQUEST_BYTES = 64 * 2**20
DEFAULT_MAX_BATCH = 1024
DEFAULT_UPDATE_DEADLINE_S = 600.0
# Exit status of a sidecar that died of a failed in-place reload (or a dead engine), and how
# long it keeps answering 503 before it exits (so the failed request gets its answer).
FATAL_EXIT_CODE = 3
FATAL_GRACE_S = 1.0
# Bytes of a refused body read and thrown away before closing: closing a socket with unread
# data makes the kernel send RST, which can destroy the error response before the client
# reads it. Bounded, so a huge Content-Length never costs more than this.
_DISCARD_LIMIT = 8 * 2**20


def _within(path: str, root: str) -> bool:
    """Whether the resolved ``path`` is ``root`` or lies below it (both realpaths)."""
    return os.path.commonpath([path, root]) == root


# --- backends ---------------------------------------------------------------------------


class _Backend:
    """What both backends share: an ``engine`` and its ``tokenizer``."""

    engine: Any
    tokenizer: Any
    platform = "gpu"  # where the engine computes, reported by /health (see devices())
    # Engine errors after which the process cannot serve (the sidecar dies, see the module
    # docstring); none for the JAX backend.
    fatal_errors: tuple[type[BaseException], ...] = ()

    @property
    def weights_version(self) -> int:
        return self.engine.weights_version

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        return self.engine.generate(prompts, params)


class JaxBackend(_Backend):
    """``JaxEngine`` with a model loaded by ``from_pretrained`` and its own tokenizer.

    Reloading builds the new parameter state beside the old one and swaps it in only if it
    finished before the deadline, so a failed or late reload leaves the old weights intact.
    """

    name = "jax"
    atomic_reload = True

    def __init__(self, model_dir: str, *, dtype: str, param_dtype: str, engine_batch: int):
        import jax
        import jax.numpy as jnp

        from jaxalign.models.hf_io import from_pretrained, load_tokenizer
        from jaxalign.rollout.jax_engine import JaxEngine

        self._dtype, self._param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)
        model = from_pretrained(model_dir, dtype=self._dtype, param_dtype=self._param_dtype)
        self._base = model  # what an adapter update applies to (the last full weights)
        self.tokenizer = load_tokenizer(model_dir)
        self.engine = JaxEngine(model, self.tokenizer, max_batch_size=engine_batch)
        self.weights_dtype = str(self._param_dtype)
        self.platform = jax.default_backend()

    def reload(self, path: str, version: int, timeout: float, *, adapter: bool = False) -> None:
        """Loads a checkpoint directory, or (``adapter``) a PEFT adapter onto the base
        weights (the ``--model`` ones or the last full reload), merged."""
        from flax import nnx

        from jaxalign.models import lora, lora_io
        from jaxalign.models.hf_io import from_pretrained

        swap = threading.Lock()
        outcome: dict[str, Any] = {}  # "done" | "cancelled" | "error"

        def load():
            try:
                if adapter:  # onto a view of the base (new modules, the same arrays)
                    view = nnx.merge(*nnx.split(self._base))
                    model = lora.merge_lora(lora_io.load_adapter(view, path))
                else:
                    model = from_pretrained(path, dtype=self._dtype,
                                            param_dtype=self._param_dtype)
                state = nnx.state(model, nnx.Param)
                _check_same_shapes(self.engine.state, state, path)
                with swap:
                    if "cancelled" not in outcome:
                        self.engine.update_weights(state, version)
                        if not adapter:
                            self._base = model
                        outcome["done"] = True
            except BaseException as e:  # handed to the waiting request thread
                outcome["error"] = e

        worker = threading.Thread(target=load, name="sidecar-reload", daemon=True)
        worker.start()
        worker.join(timeout)
        with swap:
            if "error" in outcome:
                raise outcome["error"]
            if "done" not in outcome:
                outcome["cancelled"] = True  # the loader finishes in the background, unused
                raise TimeoutError(f"reload did not finish within {timeout:.1f} s")

    def close(self) -> None:
        pass


def _check_same_shapes(old, new, path: str) -> None:
    """Raises ValueError unless ``new`` has the parameters, shapes and dtypes of ``old``.

    ``from_pretrained`` builds whatever model the directory's config.json describes, and
    ``JaxEngine.update_weights`` compares tree structure only, so a checkpoint of another
    size would otherwise be installed and fail (or mislead) at the next generate.
    """
    import jax

    def spec(state):
        flat = jax.tree_util.tree_flatten_with_path(state)[0]
        return {jax.tree_util.keystr(k): (tuple(v.shape), str(v.dtype)) for k, v in flat}

    want, got = spec(old), spec(new)
    for key in sorted(set(want) | set(got)):
        if want.get(key) != got.get(key):
            raise ValueError(
                f"{path}: parameter {key} is {got.get(key)} (shape, dtype) but the served "
                f"model has {want.get(key)}; a sidecar reloads weights of its own architecture"
            )


class VllmBackend(_Backend):
    """``VllmEngine`` (``jaxalign.rollout.vllm_engine``); reloads in place on the GPU."""

    name = "vllm"
    atomic_reload = False

    def __init__(self, model_dir: str, **options: Any):
        from jaxalign.rollout.vllm_engine import VllmEngine, VllmEngineDead, VllmOptions

        self.engine = VllmEngine(model_dir, VllmOptions(**options))
        self.tokenizer = self.engine.tokenizer
        self.weights_dtype = self.engine.options.dtype
        self.fatal_errors = (VllmEngineDead,)

    def reload(self, path: str, version: int, timeout: float, *, adapter: bool = False) -> None:
        if adapter:  # a LoRARequest swapped in: nothing changes in place
            self.engine.load_adapter(path, version)
        else:
            self.engine.update_weights(path, version, timeout=timeout)

    def close(self) -> None:
        self.engine.close()


# --- the service (everything but HTTP) ----------------------------------------------------


class Sidecar:
    """Request validation, limits, the engine lock and weight versions; no HTTP here.

    Args:
        backend: a ``JaxBackend`` or ``VllmBackend`` (or anything with their attributes).
        model: the model directory, reported by ``/health``.
        max_batch: rows (prompts x n) per request at most.
        max_request_bytes: request body size at most.
        max_seq_len: prompt tokens plus ``max_tokens`` at most, per prompt.
        vocab_size: token ids must be below it.
        max_update_deadline_s: cap on the deadline of ``/update_weights``.
        weights_roots: the directories ``/update_weights`` may load from (a checkpoint
            must resolve, symlinks and ``..`` followed, to a path inside one of them);
            default: ``default_weights_root()``, where a trainer exports by default.
    """

    def __init__(
        self,
        backend,
        *,
        model: str,
        max_batch: int,
        max_request_bytes: int,
        max_seq_len: int,
        vocab_size: int,
        max_update_deadline_s: float = DEFAULT_UPDATE_DEADLINE_S,
        weights_roots: Sequence[str | os.PathLike] | None = None,
    ):
        self.backend = backend
        self.model = model
        self.max_batch = max_batch
        self.max_request_bytes = max_request_bytes
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size
        self.max_update_deadline_s = max_update_deadline_s
        if weights_roots is None:
            weights_roots = [default_weights_root()]
        if not weights_roots:
            raise ValueError("weights_roots is empty: no checkpoint could ever be loaded")
        # Resolved once, here: a root that is later replaced by a symlink cannot widen it.
        self.weights_roots = [os.path.realpath(r) for r in weights_roots]
        self.lock = threading.Lock()  # one engine call at a time
        self.weights_ok = True
        self.served = {"generate": 0, "update_weights": 0}
        self._warned_greedy_n = False
        # Why this sidecar can no longer serve (None while it can), and what to call once
        # when it dies (``main`` makes it stop the server and exit FATAL_EXIT_CODE).
        self.fatal: str | None = None
        self.on_fatal: Callable[[], Any] | None = None

    def _die(self, reason: str) -> None:
        """Marks the sidecar dead: every request answers 503 until the process exits."""
        self.weights_ok = False
        first = self.fatal is None
        self.fatal = reason
        print(f"sidecar: fatal: {reason}; exiting to be restarted", file=sys.stderr, flush=True)
        if first and self.on_fatal is not None:
            self.on_fatal()

    def _check_alive(self) -> None:
        if self.fatal is not None:
            raise RequestError(
                503,
                f"this sidecar is dead ({self.fatal}): the weights are in an unknown state and "
                "it is exiting; restart it (SidecarEngine(restart_command=...) does)",
                fatal=True,
            )

    def health(self) -> dict:
        return {
            "status": "ok" if self.fatal is None else f"dead: {self.fatal}",
            "fatal": self.fatal is not None,
            "backend": self.backend.name,
            "model": self.model,
            "weights_version": self.backend.weights_version,
            "weights_ok": self.weights_ok,
            "weights_dtype": self.backend.weights_dtype,
            "busy": self.lock.locked(),
            "max_batch": self.max_batch,
            "max_request_bytes": self.max_request_bytes,
            "max_seq_len": self.max_seq_len,
            "weights_roots": self.weights_roots,
            "served": dict(self.served),
            "pid": os.getpid(),
            # Which accelerators this process computes on, so a trainer on the same host can
            # refuse to share them (jaxalign.rollout.client.gpus_shared_with_sidecars).
            "platform": getattr(self.backend, "platform", None),  # None: unknown
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    def _prompt_ids(self, prompt: Any, i: int) -> list[int]:
        if isinstance(prompt, str):
            ids = self.backend.encode(prompt)
        elif isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            ids = prompt
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise RequestError(
                    400, f"prompts[{i}]: token ids {bad[:5]} outside [0, {self.vocab_size})"
                )
        else:
            raise RequestError(400, f"prompts[{i}] must be a string or a list of token ids")
        if not ids:
            raise RequestError(400, f"prompts[{i}] is empty")
        return ids

    def generate(self, body: Any) -> dict:
        self._check_alive()
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object")
        unknown = sorted(set(body) - {"prompts", "sampling", "expected_weights_version"})
        if unknown:
            raise RequestError(400, f"unknown field(s) {unknown}")
        prompts = body.get("prompts")
        if not isinstance(prompts, list):
            raise RequestError(400, "'prompts' must be a list of strings or token-id lists")
        params = params_from_json(body.get("sampling"), vocab_size=self.vocab_size)
        expected = body.get("expected_weights_version")
        if expected is not None and (not isinstance(expected, int) or isinstance(expected, bool)):
            raise RequestError(400, "'expected_weights_version' must be an integer or null")
        if params.n > 1 and params.temperature == 0 and not self._warned_greedy_n:
            self._warned_greedy_n = True  # once per process: a trainer may ask every step
            print(f"sidecar: warning: a request asked for n={params.n} samples at temperature 0: "
                  "they are n copies of one greedy completion (sample with temperature > 0, or "
                  "ask for n=1)", file=sys.stderr, flush=True)
        rows = len(prompts) * params.n
        if rows > self.max_batch:
            raise RequestError(
                413,
                f"{len(prompts)} prompts x n={params.n} = {rows} rows, but this sidecar takes "
                f"at most {self.max_batch} (--max-batch); split the batch",
            )
        # Under the lock: the engine decodes with the same tokenizer, and a Rust tokenizer
        # used from two threads at once can fail ("Already borrowed").
        with self.lock:
            encoded = [self._prompt_ids(p, i) for i, p in enumerate(prompts)]
            for i, ids in enumerate(encoded):
                if len(ids) + params.max_tokens > self.max_seq_len:
                    raise RequestError(
                        413,
                        f"prompts[{i}] has {len(ids)} tokens; with max_tokens="
                        f"{params.max_tokens} that exceeds max_seq_len={self.max_seq_len}",
                    )
            self._check_alive()  # a reload may have failed while this request waited
            self._check_version(expected)
            try:
                completions = self.backend.generate(encoded, params) if encoded else []
            except ValueError as e:  # the engine's own argument checks (vLLM's included)
                raise RequestError(400, str(e)) from None
            except self.backend.fatal_errors as e:
                self._die(f"the engine failed: {type(e).__name__}: {e}")
                raise RequestError(503, f"{type(e).__name__}: {e}", fatal=True) from None
            self.served["generate"] += 1
        return {
            "weights_version": self.backend.weights_version,
            "completions": [[completion_to_json(c) for c in row] for row in completions],
        }

    def _check_version(self, expected: int | None) -> None:
        if not self.weights_ok:
            raise RequestError(
                503,
                "the weights are in an unknown state after a failed update_weights; "
                "send update_weights again (or restart the sidecar)",
            )
        actual = self.backend.weights_version
        if expected is not None and expected != actual:
            raise RequestError(
                409,
                f"weights version conflict: the request expects version {expected}, "
                f"the sidecar has version {actual}",
                expected_weights_version=expected,
                weights_version=actual,
            )

    def _allowed_path(self, path: str) -> str:
        """``path`` resolved (symlinks, ``..``), if it lies under a weights root; else 403.

        The bearer token says who may ask; this says what may be read: without it any
        client could make the server open (and hash, and parse) any directory it can read.
        """
        real = os.path.realpath(path)
        if any(_within(real, root) for root in self.weights_roots):
            return real
        raise RequestError(
            403,
            f"{path}: not under this sidecar's weights root(s) {self.weights_roots} (after "
            "resolving symlinks and '..'); export the checkpoint there, or start the sidecar "
            "with --weights-root DIR covering the trainer's export directory "
            "(config.engine.export_dir, SidecarEngine(export_dir=...))",
        )

    def _check_files_within(self, directory: str) -> None:
        """403 when a file of the checkpoint is a symlink out of the weights roots."""
        try:
            entries = list(os.scandir(directory))
        except OSError as e:
            raise RequestError(400, f"{directory}: cannot list it ({e})") from None
        for entry in entries:
            if entry.is_symlink() and not any(
                _within(os.path.realpath(entry.path), root) for root in self.weights_roots
            ):
                raise RequestError(
                    403,
                    f"{entry.path} links outside the weights root(s) {self.weights_roots}; "
                    "a checkpoint's files must lie under a root too",
                )

    def update_weights(self, body: Any) -> dict:
        """``POST /update_weights``: check the request, verify the files, reload under the
        engine lock; answers the new version and the seconds it took."""
        start = time.monotonic()
        self._check_alive()
        path, version, checksum, deadline_s, adapter = self._parse_update(body)
        # Capped before float(): a huge integer (or Infinity) means "as long as allowed".
        deadline = start + float(min(deadline_s, self.max_update_deadline_s))
        path = self._verified_checkpoint(path, checksum)
        if not self.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise RequestError(504, "deadline passed while waiting for the engine to be free")
        try:
            self._check_alive()  # a reload may have failed while this request waited
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RequestError(504, "deadline passed before the reload could start")
            self._reload(path, version, remaining, adapter)
            self.weights_ok = True
            self.served["update_weights"] += 1
        finally:
            self.lock.release()
        return {
            "weights_version": self.backend.weights_version,
            "seconds": time.monotonic() - start,
        }

    def _parse_update(self, body: Any) -> tuple[str, int, str, float, bool]:
        """``(path, version, checksum, deadline_s, adapter)`` of an update request, or a
        400. ``adapter``: ``path`` is a PEFT adapter for the base weights, not a checkpoint."""
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object")
        unknown = sorted(set(body) - {"path", "version", "checksum", "deadline_s", "adapter"})
        if unknown:
            raise RequestError(400, f"unknown field(s) {unknown}")
        path, version, checksum = body.get("path"), body.get("version"), body.get("checksum")
        deadline_s = body.get("deadline_s", self.max_update_deadline_s)
        if not isinstance(path, str) or not path:
            raise RequestError(400, "'path' must be the checkpoint directory (a string)")
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise RequestError(400, "'version' must be a non-negative integer")
        if not isinstance(checksum, str) or not checksum.startswith("sha256:"):
            raise RequestError(400, "'checksum' must be 'sha256:<hex>' (checkpoint_checksum)")
        if (
            not isinstance(deadline_s, int | float)
            or isinstance(deadline_s, bool)
            or not deadline_s > 0  # NaN fails the comparison
        ):
            raise RequestError(400, "'deadline_s' must be a positive number of seconds")
        adapter = body.get("adapter", False)
        if not isinstance(adapter, bool):
            raise RequestError(400, "'adapter' must be true or false")
        return path, version, checksum, deadline_s, adapter

    def _verified_checkpoint(self, path: str, checksum: str) -> str:
        """The resolved checkpoint directory, allowed, present and hashing to ``checksum``.

        The allow-list comes first, so that even whether a path outside it exists is not
        revealed; everything after uses the resolved path, so a symlink swapped in later
        cannot redirect the checksum or the load. Hashed outside the engine lock: generation
        goes on meanwhile.
        """
        path = self._allowed_path(path)
        if not Path(path).is_dir():
            raise RequestError(
                400,
                f"{path}: no such directory on the sidecar's host (a sidecar on another host "
                "than the trainer needs the exports on a filesystem both see: the trainer's "
                "config.engine.export_dir, or SidecarEngine(export_dir=...))",
            )
        self._check_files_within(path)
        try:
            actual = checkpoint_checksum(path)
        except (FileNotFoundError, OSError) as e:
            raise RequestError(400, str(e)) from None
        if not hmac.compare_digest(actual, checksum):
            raise RequestError(
                400,
                f"{path}: checksum mismatch (request says {checksum}, the files hash to "
                f"{actual}); refusing to load a torn or different checkpoint",
            )
        return path

    def _reload(self, path: str, version: int, remaining: float, adapter: bool = False) -> None:
        """The backend's reload (engine lock held); a failure is a request error, fatal when
        the reload was in place (the weights are then in an unknown state; an adapter
        update never is)."""
        try:
            if adapter:
                self.backend.reload(path, version, remaining, adapter=True)
            else:
                self.backend.reload(path, version, remaining)
        except Exception as e:
            # 504 late, 400 the checkpoint's fault (CheckpointError and vLLM's
            # VllmRequestError are ValueErrors), else 500.
            if isinstance(e, TimeoutError):
                status, message = 504, f"update_weights deadline exceeded: {e}"
            else:
                status = 400 if isinstance(e, ValueError) else 500
                message = f"reload failed: {type(e).__name__}: {e}"
            if self.backend.atomic_reload or adapter:  # old weights intact: keep serving
                raise RequestError(status, message) from None
            # In place: the weights are unknown, and a timed-out call may still run or
            # answer late. Never retried here: the process restarts from --model.
            self._die(message)
            raise RequestError(
                status,
                f"{message}; the weights are in an unknown state, so this sidecar is "
                "exiting to be restarted",
                fatal=True,
            ) from None


# --- HTTP -----------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    """Routes requests to a ``Sidecar``; HTTP/1.0, one request per connection."""

    sidecar: Sidecar  # set on the subclass made by ``make_server``
    token: str | None
    timeout = 120  # seconds a slow client may take per socket read
    server_version = "jaxalign-sidecar"

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        routes = {
            "/health": ("GET", lambda body: self._health()),
            "/generate": ("POST", self.sidecar.generate),
            "/update_weights": ("POST", self.sidecar.update_weights),
        }
        path = self.path.split("?", 1)[0]
        try:
            if path not in routes:
                raise RequestError(404, f"no endpoint {path}; endpoints: {sorted(routes)}")
            if routes[path][0] != method:
                raise RequestError(405, f"{path} takes {routes[path][0]}, not {method}")
            self._check_auth()
            body = self._read_json() if method == "POST" else None
            status, payload = 200, routes[path][1](body)
        except RequestError as e:
            status, payload = e.status, {"error": e.message, **e.extra}
        except Exception as e:  # an engine failure: report it, keep serving
            traceback.print_exc(file=sys.stderr)
            status, payload = 500, {"error": f"{type(e).__name__}: {e}"}
        self._send(status, payload)

    def _health(self) -> dict:
        """``/health``, or 503 (with the same fields) once the sidecar is dead: a launcher
        or client waiting for a restarted sidecar must not take the dying one for it."""
        health = self.sidecar.health()
        if self.sidecar.fatal is not None:
            raise RequestError(503, f"dead: {self.sidecar.fatal}", **health)
        return health

    def _check_auth(self) -> None:
        if self.token is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            raise RequestError(401, "missing or wrong bearer token (Authorization: Bearer ...)")

    def _read_json(self) -> Any:
        if self.headers.get("Transfer-Encoding"):
            raise RequestError(411, "chunked bodies are not accepted; send Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "Content-Length is required")
        try:
            n = int(length)
        except ValueError:
            raise RequestError(400, f"bad Content-Length {length!r}") from None
        if n < 0:
            raise RequestError(400, f"bad Content-Length {length!r}")
        limit = self.sidecar.max_request_bytes
        if n > limit:  # refused from the header: the body is never held in memory
            raise RequestError(
                413, f"request body of {n} bytes exceeds --max-request-bytes={limit}"
            )
        data = self.rfile.read(n)
        self._body_read = True
        if len(data) != n:
            raise RequestError(400, f"body ended after {len(data)} of {n} bytes")
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"body is not valid JSON: {e}") from None

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            if status == 401:
                self.send_header("WWW-Authenticate", 'Bearer realm="jaxalign-sidecar"')
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            return  # the client went away (e.g. it timed out); its request is simply dropped
        if self.command == "POST" and not getattr(self, "_body_read", False):
            self._discard_body()

    def _discard_body(self) -> None:
        """Reads and drops (at most ``_DISCARD_LIMIT`` bytes, ~1 s) a body left unread."""
        try:
            left = min(int(self.headers.get("Content-Length") or 0), _DISCARD_LIMIT)
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(1.0)
            while left > 0:
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except (OSError, ValueError):
            pass

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"[sidecar {time.strftime('%H:%M:%S')}] {format % args}\n")


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


def make_server(sidecar: Sidecar, host: str, port: int, token: str | None) -> _Server:
    """An HTTP server for ``sidecar`` bound to ``host:port`` (not started)."""
    handler = type("Handler", (_Handler,), {"sidecar": sidecar, "token": token})
    server_cls = _Server
    if ":" in host:  # an IPv6 literal such as ::1
        server_cls = type("Server6", (_Server,), {"address_family": socket.AF_INET6})
    return server_cls((host, port), handler)


def server_url(server: _Server) -> str:
    host, port = server.server_address[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


# --- command line ------------------------------------------------------------------------


def _model_limits(model_dir: str) -> tuple[int, int]:
    """(vocab_size, max_position_embeddings) from config.json, without importing jax."""
    config = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(config.read_text())
        return int(cfg["vocab_size"]), int(cfg["max_position_embeddings"])
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"{config}: no vocab_size / max_position_embeddings ({e})") from None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default in ``--help``, except where there is no value to show: a
    default of None (the help says what happens then) and on/off switches. Also the eval
    script's (``eval/evaluate.py``)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)

    def _split_lines(self, text: str, width: int) -> list[str]:
        # argparse's wrap breaks at hyphens, splitting a flag named in the help (--max-\nlen).
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m jaxalign.rollout.server",
        description="Serve a rollout engine over HTTP (see the module docstring).",
        formatter_class=HelpFormatter,
    )
    ap.add_argument(
        "--backend",
        choices=("jax", "vllm"),
        required=True,
        help="the engine: the JAX sampler or vLLM",
    )
    ap.add_argument(
        "--model", required=True, metavar="DIR", help="Hugging Face checkpoint directory"
    )
    ap.add_argument("--host", default="127.0.0.1", help="bind address")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free one and prints it")
    # The token's default is read after parsing, so --help never prints the secret.
    ap.add_argument(
        "--token",
        metavar="SECRET",
        help=f"bearer token every request must carry (default: ${TOKEN_ENV}; "
        "neither: no authentication)",
    )
    ap.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        metavar="N",
        help="largest request body accepted",
    )
    ap.add_argument(
        "--max-batch", type=int, default=DEFAULT_MAX_BATCH, metavar="N", help="rows per request"
    )
    ap.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        metavar="N",
        help="most tokens per row, prompt plus max_tokens (default: the model's "
        "max_position_embeddings, or vllm's --max-model-len)",
    )
    ap.add_argument(
        "--max-update-deadline",
        type=float,
        default=DEFAULT_UPDATE_DEADLINE_S,
        metavar="SECONDS",
        help="cap on an /update_weights request's deadline_s",
    )
    ap.add_argument(
        "--weights-root",
        action="append",
        metavar="DIR",
        help="a directory /update_weights may load checkpoints from (repeatable); default: "
        f"{default_weights_root()}, where a trainer's SidecarEngine exports by default",
    )
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype; vllm: the model dtype")
    ap.add_argument(
        "--param-dtype", default="float32", metavar="DTYPE", help="jax: parameter dtype"
    )
    ap.add_argument(
        "--engine-batch", type=int, default=64, metavar="N", help="jax: rows per micro-batch"
    )
    ap.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        metavar="FRACTION",
        help="vllm: share of GPU memory it may take",
    )
    ap.add_argument(
        "--tensor-parallel-size", type=int, default=1, metavar="N", help="vllm: GPUs per engine"
    )
    ap.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        metavar="N",
        help="vllm: context length (default: the model's)",
    )
    ap.add_argument("--seed", type=int, default=0, metavar="N", help="vllm engine seed")
    ap.add_argument(
        "--max-lora-rank", type=int, default=0, metavar="R",
        help="vllm: serve LoRA adapters up to rank R (adapter-only weight updates); 0 = off",
    )
    ap.add_argument(
        "--vllm-unseeded",
        action="store_true",
        help="vllm: send no per-prompt seed (faster sampler, samples not reproducible)",
    )
    args = ap.parse_args(argv)
    if args.token is None:
        args.token = os.environ.get(TOKEN_ENV)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    vocab_size, max_positions = _model_limits(args.model)
    if args.backend == "jax":
        backend = JaxBackend(
            args.model,
            dtype=args.dtype,
            param_dtype=args.param_dtype,
            engine_batch=args.engine_batch,
        )
    else:
        backend = VllmBackend(
            args.model,
            dtype=args.dtype,
            gpu_memory_utilization=args.gpu_memory_utilization,
            tensor_parallel_size=args.tensor_parallel_size,
            max_model_len=args.max_model_len,
            seed=args.seed,
            seeded=not args.vllm_unseeded,
            max_lora_rank=args.max_lora_rank,
        )
        max_positions = args.max_model_len or max_positions
    sidecar = Sidecar(
        backend,
        model=args.model,
        max_batch=args.max_batch,
        max_request_bytes=args.max_request_bytes,
        max_seq_len=args.max_seq_len or max_positions,
        vocab_size=vocab_size,
        max_update_deadline_s=args.max_update_deadline,
        weights_roots=args.weights_root,
    )
    for root in sidecar.weights_roots:
        if not os.path.isdir(root):  # allowed: a trainer may create it on its first export
            print(f"note: --weights-root {root} does not exist (yet)", file=sys.stderr)
    server = make_server(sidecar, args.host, args.port, args.token)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.token is None:
        print(
            f"warning: serving on {args.host} without --token: anyone who can reach it can "
            "generate and make it load files",
            file=sys.stderr,
        )
    # SIGTERM ends serve_forever cleanly (shutdown must run on another thread).
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())

    def stop_after_grace():  # the failed request and any waiting ones get their 503 first
        time.sleep(FATAL_GRACE_S)
        server.shutdown()

    sidecar.on_fatal = lambda: threading.Thread(target=stop_after_grace, daemon=True).start()
    print(f"{LISTENING}{server_url(server)}", flush=True)  # the line launchers wait for
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if sidecar.fatal is None:
            backend.close()
    if sidecar.fatal is not None:
        # A stuck vLLM call may never return, and closing the engine may wait on it: give
        # the close a bounded time, then leave without running exit handlers.
        closer = threading.Thread(target=backend.close, daemon=True)
        closer.start()
        closer.join(30.0)
        sys.stderr.flush()
        os._exit(FATAL_EXIT_CODE)


if __name__ == "__main__":
    main()

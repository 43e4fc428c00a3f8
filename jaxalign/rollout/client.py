"""The trainer's side of the rollout sidecar: a ``RolloutEngine`` that talks HTTP.

``SidecarEngine(urls)`` generates by splitting the prompt batch into contiguous shares,
one per sidecar, sent in parallel and reassembled in input order (each share further cut
to fit the sidecar's ``max_batch`` and ``max_request_bytes``, read from its ``/health``).
Every request carries the client's ``weights_version``; a sidecar holding other weights
answers 409 and the client raises ``WeightsVersionError`` naming both versions, so
rollouts from two policies are never mixed silently. Each completion is checked to carry
that version and its prompt's token ids.

``update_weights(model)`` exports the parameters with ``save_pretrained`` to a fresh
versioned directory (under ``/dev/shm`` when it exists: RAM, no disk I/O), hashes it
(``checkpoint_checksum``) and asks every sidecar to load it with a deadline. A directory
path is accepted too (an export made elsewhere). On multi-host JAX every process calls
``update_weights``: the export gathers the parameters and process 0 alone writes the files
and talks to the sidecars, then broadcasts the outcome; ``export_dir`` must then be a path
the sidecars can read.

Failures: connection errors and timeouts are retried ``retries`` times with exponential
backoff. If a sidecar stays unreachable and ``restart_command`` is set, the client runs it,
waits for ``/health``, re-sends the last weights update (a restarted sidecar starts from
its ``--model`` directory) and retries the request once more; otherwise it raises
``SidecarError`` naming the URL and the error. A retried generate request replaces the lost
one: results are only taken from complete responses, so nothing is dropped or duplicated.
Sidecars the client restarted are its children: ``close()`` (or the trainer's exit) stops
them.
A sidecar whose in-place reload failed or timed out (vLLM) answers ``"fatal": true`` and
exits: its weights are unknown and the reload is never retried in place. With
``restart_command`` the client waits for it to go, restarts it (re-sending the last good
weights) and sends the request once more, unless the failure was the request's fault
(a 4xx, such as a checkpoint the workers refused: then it raises after the restart);
without, it raises ``SidecarError`` saying the sidecar must be restarted.
HTTP errors (400, 401, 413, ...) are not retried; their message is in the exception.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import http.client
import json
import os
import shutil
import tempfile
import time
import urllib.parse
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from jaxalign.models import lora
from jaxalign.models.hf_io import save_pretrained
from jaxalign.models.lora_io import save_adapter
from jaxalign.rollout.restarts import Restarter, SidecarError, poll_health
from jaxalign.rollout.types import Completion, Prompt, SamplingParams
from jaxalign.rollout.wire import (
    TOKEN_ENV,
    checkpoint_checksum,
    completion_from_json,
    default_weights_root,
    params_to_json,
)


class WeightsVersionError(SidecarError):
    """A sidecar holds other weights than the client expects (HTTP 409)."""

    def __init__(self, message: str, *, url: str, expected: int | None, actual: int | None):
        super().__init__(message)
        self.url, self.expected, self.actual = url, expected, actual


class _TransportError(Exception):
    """No complete HTTP answer: refused, reset, closed mid-response, or timed out."""


class _SidecarDied(SidecarError):
    """The sidecar answered ``"fatal": true``: it is dead and exits, to be restarted."""

    def __init__(self, message: str, *, status: int):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class SyncTimings:
    """Where the time of the last ``update_weights`` went (seconds)."""

    export_s: float
    checksum_s: float
    reload_s: float
    path: str

    @property
    def total_s(self) -> float:
        return self.export_s + self.checksum_s + self.reload_s


def _default_export_dir() -> Path:
    """A new directory under ``default_weights_root()``: the sidecar's default allow-list
    root is the same path, so the one-host setup works with no flags on either side."""
    return Path(tempfile.mkdtemp(prefix="jaxalign-sidecar-", dir=default_weights_root()))


def _derived_seed(seed: int, index: int) -> int:
    """Seed of request ``index`` of a generate call: distinct streams for distinct requests.

    Engines seed per request, so two requests with the same seed would draw the same noise
    for their rows. Request 0 keeps ``seed``, so one sidecar reproduces ``JaxEngine``.
    """
    if index == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _visible(value: str | None, count: int) -> set[str]:
    """The GPUs a ``CUDA_VISIBLE_DEVICES`` value selects (unset: all ``count`` of the host),
    as written: indices (``"0"``, ``"1"``) or UUIDs (``"GPU-..."``)."""
    if value is None:
        return {str(i) for i in range(count)}
    return {v.strip() for v in value.split(",") if v.strip()}


def gpus_shared_with_sidecars(
    health: dict[str, dict],
    *,
    trainer_visible: str | None,
    trainer_gpus: int,
    is_local: Callable[[str], bool],
) -> list[str]:
    """One message per sidecar on this host that computes on a GPU the trainer uses too.

    Two processes on one GPU each plan its whole memory (XLA preallocates 75%, vLLM its
    ``gpu_memory_utilization``): the second one fails to allocate, or both slow to a crawl.
    Decided from ``CUDA_VISIBLE_DEVICES`` of both (a sidecar reports its own in ``/health``);
    a sidecar with it unset computes on GPU 0 (vLLM's and JAX's first device). Sidecars on
    other hosts, on a CPU, from before ``/health`` reported devices, or named by UUID
    where the trainer names indices (or the reverse) cannot be told apart and pass.

    Args:
        health: ``/health`` answers by sidecar URL.
        trainer_visible: the trainer's ``CUDA_VISIBLE_DEVICES`` (None: unset).
        trainer_gpus: GPUs the trainer's JAX sees (``jax.local_device_count()``).
        is_local: whether a URL names this host.
    """
    mine = _visible(trainer_visible, trainer_gpus)
    clashes = []
    for url, h in health.items():
        if not is_local(url) or h.get("platform") not in ("gpu", "cuda"):
            continue
        if "cuda_visible_devices" not in h:
            continue
        theirs_value = h["cuda_visible_devices"]
        theirs = _visible(theirs_value, 1)  # unset: the sidecar's first device, GPU 0
        if all(v.isdigit() for v in mine) != all(v.isdigit() for v in theirs):
            continue  # indices against UUIDs: cannot tell
        shared = sorted(mine & theirs)
        if shared:
            clashes.append(
                f"the sidecar at {url} computes on GPU {','.join(shared)} (its "
                f"CUDA_VISIBLE_DEVICES={theirs_value or 'unset'}), which this trainer uses too "
                f"(CUDA_VISIBLE_DEVICES={trainer_visible or f'unset: all {trainer_gpus} GPUs'})"
            )
    return clashes


class SidecarEngine:
    """A ``RolloutEngine`` backed by one or more sidecar processes.

    Args:
        urls: sidecar base URLs (``http://127.0.0.1:8000``) or one URL.
        token: bearer token (default: ``$JAXALIGN_SIDECAR_TOKEN``).
        timeout: seconds one HTTP request may take (a generate call included).
        retries: extra attempts after a connection error or timeout.
        backoff: first wait between attempts in seconds, doubled each time.
        restart_command: run when a sidecar stays unreachable: a callable taking the URL, an
            argv list, or a shell-style string; strings may use ``{url}``, ``{host}`` and
            ``{port}``. ``None``: raise ``SidecarError`` instead.
        restart_timeout: seconds to wait for a restarted sidecar's ``/health``.
        export_dir: where ``update_weights`` writes versioned exports (default: a new
            directory under ``/dev/shm``, else the system temp dir: the sidecar's default
            ``--weights-root``; any other directory must lie under a root the sidecars
            were started with, or they refuse it with 403).
        export_dtype: dtype of exported tensors (default: what the sidecar reports as its
            ``weights_dtype``, e.g. bfloat16 for vLLM, which halves the bytes).
        keep_exports: exports kept on disk (the newest; a restart re-sends the last one).
        update_deadline: seconds a sidecar may take to verify and load new weights.
        startup_timeout: seconds to wait for every sidecar's ``/health`` in the constructor.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        token: str | None = None,
        timeout: float = 600.0,
        retries: int = 3,
        backoff: float = 0.5,
        restart_command: str | Sequence[str] | Callable[[str], Any] | None = None,
        restart_timeout: float = 600.0,
        export_dir: str | os.PathLike | None = None,
        export_dtype: Any = None,
        keep_exports: int = 1,
        update_deadline: float = 600.0,
        startup_timeout: float = 0.0,
    ):
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("SidecarEngine needs at least one URL")
        for url in self.urls:
            parsed = urllib.parse.urlsplit(url)
            if parsed.scheme != "http" or not parsed.hostname or not parsed.port:
                raise ValueError(f"sidecar URL {url!r} must look like http://HOST:PORT")
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.restart_command = restart_command
        self.restart_timeout = restart_timeout
        # restarts (restarts.py) are apart from the request path: _call decides when
        self._restarter = (Restarter(restart_command, restart_timeout)
                           if restart_command is not None else None)
        self.export_dir = Path(export_dir) if export_dir is not None else None
        self.export_dtype = export_dtype
        self.keep_exports = max(1, keep_exports)
        self.update_deadline = update_deadline
        self.last_sync: SyncTimings | None = None
        self._exports: list[Path] = []  # directories this client wrote, oldest first
        self._last_update: dict | None = None  # the payload to re-send after a restart
        self._health: dict[str, dict] = {}
        self._cleanup: weakref.finalize | None = None

        health = self.wait_ready(startup_timeout)
        versions = {url: h["weights_version"] for url, h in health.items()}
        # Sidecars started from the same --model agree (version 0). If they do not, no
        # version is right for all of them until update_weights installs one everywhere.
        self.weights_version: int | None = (
            versions[self.urls[0]] if len(set(versions.values())) == 1 else None
        )
        self._disagreement = versions

    # --- HTTP ----------------------------------------------------------------------------

    def _request(self, url: str, method: str, path: str, payload: Any = None, timeout=None):
        """One HTTP exchange -> (status, JSON body). Raises ``_TransportError``."""
        parsed = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(
            parsed.hostname, parsed.port, timeout=self.timeout if timeout is None else timeout
        )
        headers = {"Connection": "close"}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        body = None
        if payload is not None:
            body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as e:  # refused, reset, timeout, EOF
            detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            raise _TransportError(detail) from None
        finally:
            conn.close()
        try:
            answer = json.loads(data) if data else {}
        except json.JSONDecodeError:
            answer = {"error": data[:200].decode(errors="replace")}
        return response.status, answer

    def _call(self, index: int, method: str, path: str, payload: Any = None, timeout=None):
        """``_request`` with retries, then one restart, then ``SidecarError``; checks status."""
        url = self.urls[index]
        errors = []
        for attempt in range(self.retries + 1):
            try:
                return self._checked(url, path, *self._request(url, method, path, payload, timeout))
            except _TransportError as e:
                errors.append(str(e))
                if attempt < self.retries:
                    time.sleep(self.backoff * 2**attempt)
            except _SidecarDied as e:
                return self._after_death(index, method, path, payload, timeout, e)
        what = f"sidecar {url} is unreachable: {method} {path} failed {len(errors)} time(s)"
        if self.restart_command is None:
            raise SidecarError(
                f"{what} (last error: {errors[-1]}); it may have died. Restart it, or pass "
                "restart_command= to let the client restart it"
            )
        self._restart(index, reason=errors[-1])
        try:
            return self._checked(url, path, *self._request(url, method, path, payload, timeout))
        except _TransportError as e:
            raise SidecarError(f"{what}, and again after a restart ({e})") from None

    def _after_death(self, index, method, path, payload, timeout, died: _SidecarDied) -> dict:
        """A sidecar died (a failed in-place reload): restart it, then maybe resend once."""
        url = self.urls[index]
        if self.restart_command is None:
            raise SidecarError(
                f"{died}; the sidecar is exiting: restart it, or pass restart_command= to "
                "let the client restart it"
            ) from None
        self._restarter.wait_gone(url, self._probe)
        self._restart(index, reason=str(died))
        if died.status < 500:  # the request's fault (e.g. a refused checkpoint): not resent
            raise SidecarError(f"{died} (restarted the sidecar with the previous weights)")
        try:
            return self._checked(url, path, *self._request(url, method, path, payload, timeout))
        except _TransportError as e:
            raise SidecarError(f"{died}; restarted it, but {method} {path} failed ({e})") from None

    def _probe(self, url: str, timeout: float) -> tuple[int, dict] | None:
        """One ``GET /health`` without retries: ``(status, body)``, or None if no answer."""
        try:
            return self._request(url, "GET", "/health", timeout=timeout)
        except _TransportError:
            return None

    def _checked(self, url: str, path: str, status: int, answer: dict) -> dict:
        if status == 200:
            return answer
        message = answer.get("error", answer)
        if answer.get("fatal") is True:
            raise _SidecarDied(f"sidecar {url}{path}: HTTP {status}: {message}", status=status)
        if status == 409:
            raise WeightsVersionError(
                f"sidecar {url}: {message}",
                url=url,
                expected=answer.get("expected_weights_version"),
                actual=answer.get("weights_version"),
            )
        raise SidecarError(f"sidecar {url}{path}: HTTP {status}: {message}")

    # --- health, restarts ----------------------------------------------------------------

    def health(self) -> dict[str, dict]:
        """``/health`` of every sidecar, by URL (with retries and restarts)."""
        return {url: self._refresh_health(i) for i, url in enumerate(self.urls)}

    def _refresh_health(self, index: int) -> dict:
        self._health[self.urls[index]] = h = self._call(index, "GET", "/health", timeout=30)
        return h

    def wait_ready(self, timeout: float) -> dict[str, dict]:
        """Polls every sidecar's ``/health`` until all answer or ``timeout`` seconds pass.

        With ``timeout=0`` (the constructor's default) a sidecar that does not answer at
        once gets the usual retries and restart instead.
        """
        out = {}
        for i, url in enumerate(self.urls):
            answer = poll_health(self._probe, url, up=True, timeout=timeout, interval=0.5,
                                 request_timeout=30, ready=lambda status: True)
            if answer is not None:
                out[url] = self._checked(url, "/health", *answer)
            elif timeout > 0:  # waited already: no retries on top
                raise SidecarError(f"sidecar {url} did not answer /health within "
                                   f"{timeout:.0f} s")
            else:
                out[url] = self._refresh_health(i)  # retries / restart as configured
            self._health[url] = out[url]
        return out

    def _restart(self, index: int, reason: str) -> None:
        """Restarts a lost sidecar (``restarts.Restarter``) and gives it the current policy."""
        url = self.urls[index]
        self._health[url] = self._restarter.restart(url, reason, self._probe)
        if self._last_update is not None:
            # The new process holds its --model weights; give it the current policy again.
            try:
                self._checked(
                    url,
                    "/update_weights",
                    *self._request(url, "POST", "/update_weights", self._last_update),
                )
            except _TransportError as e:
                raise SidecarError(f"sidecar {url} restarted but lost again ({e})") from None

    def close(self) -> None:
        """Stops the sidecars this client restarted and deletes its exports."""
        if self._restarter is not None:
            self._restarter.stop()
        for path in self._exports:
            shutil.rmtree(path, ignore_errors=True)
        self._exports.clear()
        if self._cleanup is not None:
            self._cleanup()  # the default export directory itself

    # --- generate -----------------------------------------------------------------------

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[Completion]]:
        """Samples ``params.n`` completions per prompt over the sidecars, in input order."""
        prompts = [p if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        if self.weights_version is None:
            raise SidecarError(
                f"the sidecars hold different weights versions {self._disagreement}; call "
                "update_weights first so they all hold the same policy"
            )
        if not prompts:
            return []
        # Contiguous shares, sizes differing by at most one; empty shares are skipped.
        k = len(self.urls)
        bounds = [len(prompts) * i // k for i in range(k + 1)]
        shares = [(i, bounds[i], bounds[i + 1]) for i in range(k) if bounds[i + 1] > bounds[i]]
        requests = {i: self._plan(i, prompts[lo:hi], params) for i, lo, hi in shares}
        # Number every request of this call (for distinct seeds), in input order.
        counter = 0
        for i, _, _ in shares:
            for request in requests[i]:
                request["seed_index"], counter = counter, counter + 1
        out: list[list[Completion] | None] = [None] * len(prompts)
        with concurrent.futures.ThreadPoolExecutor(len(shares)) as pool:
            futures = {
                pool.submit(self._generate_share, i, prompts[lo:hi], requests[i], params): lo
                for i, lo, hi in shares
            }
            for future in concurrent.futures.as_completed(futures):
                lo = futures[future]
                for j, row in enumerate(future.result()):
                    out[lo + j] = row
        assert all(row is not None for row in out)  # every prompt answered exactly once
        return out  # type: ignore[return-value]

    def _plan(self, index: int, prompts: list, params: SamplingParams) -> list[dict]:
        """Cuts one sidecar's share into requests within its max_batch and body limits."""
        health = self._health.get(self.urls[index]) or self._refresh_health(index)
        max_batch, max_bytes = health["max_batch"], health["max_request_bytes"]
        if params.n > max_batch:
            raise SidecarError(
                f"sidecar {self.urls[index]} takes at most {max_batch} rows per request, "
                f"fewer than n={params.n}"
            )
        per = max_batch // params.n
        pieces = [(lo, min(lo + per, len(prompts))) for lo in range(0, len(prompts), per)]
        fitted = []
        while pieces:  # halve pieces whose JSON body is over the limit
            lo, hi = pieces.pop(0)
            size = len(json.dumps(prompts[lo:hi])) + 4096  # + sampling and envelope
            if size <= max_bytes:
                fitted.append({"lo": lo, "hi": hi})
            elif hi - lo == 1:
                raise SidecarError(
                    f"prompt of ~{size} bytes exceeds the max_request_bytes={max_bytes} of "
                    f"sidecar {self.urls[index]}"
                )
            else:
                mid = (lo + hi) // 2
                pieces[:0] = [(lo, mid), (mid, hi)]
        return fitted

    def _generate_share(self, index, prompts, requests, params) -> list[list[Completion]]:
        url = self.urls[index]
        rows: list[list[Completion]] = []
        for request in requests:
            batch = prompts[request["lo"] : request["hi"]]
            sampling = dataclasses.replace(
                params, seed=_derived_seed(params.seed, request["seed_index"])
            )
            payload = {
                "prompts": batch,
                "sampling": params_to_json(sampling),
                "expected_weights_version": self.weights_version,
            }
            answer = self._call(index, "POST", "/generate", payload)
            rows.extend(self._parse(url, batch, params, answer))
        return rows

    def _parse(self, url: str, batch: list, params: SamplingParams, answer: dict):
        """Checks a /generate answer: one row per prompt, n each, our version, our prompt."""
        version = self.weights_version
        completions = answer.get("completions")
        if not isinstance(completions, list) or len(completions) != len(batch):
            raise SidecarError(
                f"sidecar {url}: malformed /generate answer "
                f"({len(completions) if isinstance(completions, list) else 'no'} rows for "
                f"{len(batch)} prompts)"
            )
        rows = []
        for prompt, row in zip(batch, completions, strict=True):
            if len(row) != params.n:
                raise SidecarError(f"sidecar {url}: {len(row)} completions, expected n={params.n}")
            parsed = [completion_from_json(c) for c in row]
            for c in parsed:
                if c.weights_version != version:
                    raise WeightsVersionError(
                        f"sidecar {url} returned a completion of weights version "
                        f"{c.weights_version}, expected {version}",
                        url=url,
                        expected=version,
                        actual=c.weights_version,
                    )
                if not isinstance(prompt, str) and c.prompt_token_ids != prompt:
                    raise SidecarError(f"sidecar {url}: a completion answers another prompt")
            rows.append(parsed)
        return rows

    # --- weights ------------------------------------------------------------------------

    def update_weights(self, weights: Any, version: int | None = None) -> int:
        """Installs new weights on every sidecar; returns the new weights version.

        A model with LoRA adapters (``jaxalign.models.lora``) sends the adapter alone
        (``lora_io.save_adapter``, PEFT's format: a few MB instead of every weight): each
        sidecar applies it to the base weights it serves (its ``--model``, which must be
        the base the trainer froze); so does a PEFT adapter directory. vLLM sidecars need
        ``--max-lora-rank``.

        Args:
            weights: a ``Qwen2ForCausalLM`` (exported here with ``save_pretrained``, or its
                adapter alone), a Hugging Face checkpoint directory or a PEFT adapter
                directory the sidecars can read.
            version: the new version (default: the current one plus one).

        Raises:
            SidecarError: when any sidecar failed to load them (then ``weights_version`` is
                unchanged and generate calls fail with a version conflict until a later
                ``update_weights`` succeeds everywhere).
        """
        current = self.weights_version
        if version is None:
            known = [current] if current is not None else list(self._disagreement.values())
            version = max(known) + 1
        version = int(version)
        t0 = time.perf_counter()
        if isinstance(weights, str | os.PathLike):
            path = Path(weights)
            if not path.is_dir():
                raise ValueError(f"{path}: not a checkpoint directory")
            adapter = (path / "adapter_config.json").is_file()
        else:
            if not isinstance(weights, nnx.Module):
                raise TypeError(
                    "SidecarEngine.update_weights takes a model or a checkpoint directory, "
                    f"not {type(weights).__name__} (nnx.merge a State into its model first)"
                )
            adapter = lora.has_lora(weights)
        multihost = jax.process_count() > 1
        error: BaseException | None = None
        checksum_s = reload_s = 0.0
        if not isinstance(weights, str | os.PathLike):
            try:  # collective; a failed write on process 0 still reaches the broadcast below
                path = self._export(weights, version)
            except BaseException as e:
                error = e
        export_s = time.perf_counter() - t0

        if jax.process_index() == 0 and error is None:
            try:
                t1 = time.perf_counter()
                checksum = checkpoint_checksum(path)
                checksum_s = time.perf_counter() - t1
                payload = {
                    "path": str(path.resolve()),
                    "version": version,
                    "checksum": checksum,
                    "deadline_s": self.update_deadline,
                    **({"adapter": True} if adapter else {}),
                }
                t2 = time.perf_counter()
                self._push(payload)
                reload_s = time.perf_counter() - t2
                self._last_update = payload
            except BaseException as e:
                error = e
        if multihost:  # everyone learns process 0's outcome (and waits for it)
            ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
            if not int(ok) and error is None:
                raise SidecarError("process 0 failed to update the sidecars (see its log)")
        if error is not None:
            raise error
        self.weights_version = version
        self.last_sync = SyncTimings(export_s, checksum_s, reload_s, str(path))
        self._prune_exports(keep=path)
        return version

    def _export(self, model, version: int) -> Path:
        if self.export_dir is None:
            self.export_dir = _default_export_dir()
            # Ours alone: removed by close(), or at exit if the trainer never calls it
            # (under /dev/shm a leaked export holds RAM until reboot).
            self._cleanup = weakref.finalize(self, shutil.rmtree, self.export_dir, True)
        path = self.export_dir / f"v{version:08d}"
        dtype = self.export_dtype
        if dtype is None:
            dtype = (self._health.get(self.urls[0]) or self._refresh_health(0))["weights_dtype"]
        if lora.has_lora(model):
            save_adapter(model, path)
        else:
            save_pretrained(model, path, dtype=dtype)
        if jax.process_index() == 0:
            self._exports.append(path)
        return path

    def _push(self, payload: dict) -> None:
        """POSTs an update to every sidecar in parallel; raises naming every failure."""
        with concurrent.futures.ThreadPoolExecutor(len(self.urls)) as pool:
            futures = [
                pool.submit(
                    self._call,
                    i,
                    "POST",
                    "/update_weights",
                    payload,
                    self.update_deadline + 30,  # the sidecar gives up first and says so
                )
                for i in range(len(self.urls))
            ]
            errors = []
            for future in futures:
                try:
                    future.result()
                except SidecarError as e:
                    errors.append(str(e))
        if errors:
            raise SidecarError(
                f"update_weights to version {payload['version']} failed on "
                f"{len(errors)}/{len(self.urls)} sidecar(s): " + " | ".join(errors)
            )

    def _prune_exports(self, keep: Path) -> None:
        stale = [p for p in self._exports if p != keep]
        excess = len(self._exports) - self.keep_exports
        for path in stale[: max(0, excess)]:
            shutil.rmtree(path, ignore_errors=True)
            self._exports.remove(path)

"""The sidecar's wire format, shared by the server (``jaxalign.rollout.server``) and its
client (``jaxalign.rollout.client``): sampling parameters and completions as JSON, every
sampling field checked at the edge (``params_from_json``: a 400 naming the field, never an
engine error), the checksum of a weights directory, the line a starting server prints, the
token's environment variable and where exports go by default.

Kept apart from the server so the client (a trainer process) imports no HTTP server code,
and so one module defines what both sides put on the wire.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxalign.rollout.types import Completion, SamplingParams

LISTENING = "jaxalign-sidecar listening on "  # a started server's first line, then its URL
TOKEN_ENV = "JAXALIGN_SIDECAR_TOKEN"


class RequestError(Exception):
    """An HTTP error answer: status, message, and extra JSON fields."""

    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


# --- wire format ------------------------------------------------------------------------

# Bounds of what the engines can represent. The JAX engine seeds with ``jax.random.key``,
# which keeps only the low 32 bits of a seed (without jax_enable_x64): seeds 0 and 2**32
# would draw the same stream, and 2**64 raises OverflowError deep in the engine. Counts go
# into int32 scalars (``jnp.int32(top_k)``), which overflow the same way. One limit for
# both backends, so a request means the same thing whichever serves it.
SEED_LIMIT = 2**32
INT32_LIMIT = 2**31


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite_number(v: Any) -> bool:
    """A JSON number that is a real value: not a bool, NaN or +-Infinity (Python's JSON
    parser accepts those), nor an integer too large for a float."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond float range, e.g. 10**400
        return False


def _is_int32(v: Any) -> bool:
    return _is_int(v) and -INT32_LIMIT <= v < INT32_LIMIT


def _is_seed(v: Any) -> bool:
    return _is_int(v) and 0 <= v < SEED_LIMIT


# How each SamplingParams field is checked on the wire, before ``SamplingParams`` checks the
# ranges that hold for every engine (n >= 1, top_p in (0, 1], min_tokens <= max_tokens,
# ...): JSON type, finiteness, and what an engine can represent. Every field has a row;
# a field added to SamplingParams without one fails the import below instead of slipping
# through unchecked. (What ``/generate`` also checks, knowing the model: stop token ids
# below the vocabulary size, rows against --max-batch, prompt + max_tokens against
# --max-seq-len.)
_PARAM_CHECKS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "n": ("an integer (32-bit)", _is_int32),
    "temperature": ("a number, finite and >= 0 (0 is greedy)", _is_finite_number),
    "top_p": ("a number in (0, 1]", _is_finite_number),
    "top_k": ("an integer (32-bit; 0 and -1 turn it off)", _is_int32),
    "max_tokens": ("an integer (32-bit)", _is_int32),
    "min_tokens": ("an integer (32-bit)", _is_int32),
    "stop": (
        "a string or a list of strings",
        lambda v: (
            isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v))
        ),
    ),
    "include_stop_str_in_output": ("true or false", lambda v: isinstance(v, bool)),
    "stop_token_ids": (
        "a list of integers (non-negative token ids)",
        lambda v: isinstance(v, list) and all(_is_int32(t) and t >= 0 for t in v),
    ),
    "seed": ("an integer in [0, 2**32) (the JAX engine's seed range)", _is_seed),
    "logprobs": ("true or false", lambda v: isinstance(v, bool)),
}
_unchecked = {f.name for f in dataclasses.fields(SamplingParams)} ^ set(_PARAM_CHECKS)
if _unchecked:
    raise TypeError(
        f"SamplingParams fields without a row in _PARAM_CHECKS (or stale rows): "
        f"{sorted(_unchecked)}"
    )


def params_to_json(params: SamplingParams) -> dict:
    """``SamplingParams`` as a JSON object (tuples become lists)."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(params).items()
    }


def params_from_json(obj: Any, *, vocab_size: int | None = None) -> SamplingParams:
    """Parses and validates the ``sampling`` object of a request, before any engine runs.

    Args:
        obj: the decoded JSON value (None: the defaults).
        vocab_size: when given, stop token ids must lie in ``[0, vocab_size)``.

    Raises:
        RequestError: 400 naming the field, for a non-object, an unknown field, a mistyped,
            non-finite or out-of-range value (``_PARAM_CHECKS``), a value ``SamplingParams``
            rejects (its message is passed on), or a stop token id outside the vocabulary.
    """
    if obj is None:
        return SamplingParams()
    if not isinstance(obj, dict):
        raise RequestError(400, "'sampling' must be a JSON object of SamplingParams fields")
    unknown = sorted(set(obj) - set(_PARAM_CHECKS))
    if unknown:
        raise RequestError(
            400, f"unknown sampling field(s) {unknown}; known: {sorted(_PARAM_CHECKS)}"
        )
    for name, value in obj.items():
        what, ok = _PARAM_CHECKS[name]
        if not ok(value):
            raise RequestError(400, f"sampling.{name} must be {what}, got {_short(value)}")
    try:
        params = SamplingParams(**obj)
    except ValueError as e:
        raise RequestError(400, str(e)) from None
    if vocab_size is not None:
        bad = [t for t in params.stop_token_ids if t >= vocab_size]
        if bad:
            raise RequestError(
                400, f"sampling.stop_token_ids {bad[:5]} outside the vocabulary [0, {vocab_size})"
            )
    return params


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut: an error message should not echo a megabyte of request."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def completion_to_json(c: Completion) -> dict:
    return dataclasses.asdict(c)


def completion_from_json(obj: dict) -> Completion:
    """The inverse of ``completion_to_json``."""
    return Completion(**obj)


def checkpoint_checksum(path: str | os.PathLike) -> str:
    """``"sha256:<hex>"`` over the weight files of a checkpoint directory.

    Covers every ``*.safetensors`` file, ``model.safetensors.index.json`` and a PEFT
    adapter's ``adapter_config.json``: the sha256 of
    each file's bytes, combined in name order with its name and size. Full content hashes,
    not (name, size) plus samples, because the failure this guards against is a torn or
    stale copy (a crash mid-write, a reused directory, an incomplete rsync to another host),
    which can keep every size and header intact. sha256 runs at ~1.7 GB/s per core here
    (files are hashed in parallel threads; hashlib releases the GIL): ~0.3 s for a 100M
    fp32 export, ~2 s for a 1.5B bf16 one (3 GB), next to a reload that reads the same
    bytes anyway (and then finds them in the page cache).

    Raises:
        FileNotFoundError: when the directory has no safetensors files.
    """
    root = Path(path)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{root}: no *.safetensors files")
    for extra in ("model.safetensors.index.json", "adapter_config.json"):  # (a PEFT adapter's
        if (root / extra).is_file():  # rank, alpha and targets change what it computes)
            files.append(root / extra)

    def digest(file: Path) -> str:
        with open(file, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    with concurrent.futures.ThreadPoolExecutor(min(8, len(files))) as pool:
        digests = list(pool.map(digest, files))
    total = hashlib.sha256()
    for file, d in zip(files, digests, strict=True):
        total.update(f"{file.name}\t{file.stat().st_size}\t{d}\n".encode())
    return "sha256:" + total.hexdigest()


def default_weights_root() -> Path:
    """Where a trainer's ``SidecarEngine`` writes its exports unless told otherwise.

    ``/dev/shm`` when it is a writable directory (RAM: no disk I/O), else the system temp
    directory. The client makes its default export directory under this path and the
    server allows ``/update_weights`` from it by default, so the usual one-host setup
    needs no flags on either side.
    """
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())

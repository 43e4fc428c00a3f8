"""Scoring many responses in worker processes, every item under a hard deadline.

``ScoringPool`` keeps ``num_workers`` persistent worker processes. Items go out in chunks;
a worker sends back each result as soon as it has it, so the parent always knows which item
a worker is on and how long it has been on it. Inside a worker, grading runs in the main
thread, so the soft limit (a ``setitimer`` signal, ``grader.time_limit``) interrupts most
slow computations and the item scores 0 with ``timed_out``. A worker that still makes no
progress for ``timeout + grace`` seconds (stuck in C code that never returns to the
interpreter) is killed and replaced: its current item scores 0 with ``timed_out`` and the
rest of its chunk goes back to the queue. A worker that dies on its own (a crash, the memory
limit) costs only the item it was on, scored 0 with ``error``. Results come back in input
order; nothing is dropped or duplicated.

Why not ``multiprocessing.Pool`` or ``concurrent.futures``: neither can kill one stuck task
without tearing down the pool. Why not multiprocessing's "spawn" start method either: it
re-imports the parent's ``__main__`` in every worker (``python -m jaxalign.train`` would
import jax and flax into each grader). Workers are fresh interpreters started with
``subprocess`` (fork+exec, safe in a process with JAX threads, like "spawn") that import
only ``jaxalign.verify``, and talk to the parent over a ``multiprocessing`` connection.

Functions sent to workers must be importable by name (module-level, or a
``functools.partial`` of one); functions defined in a ``__main__`` script are not. A worker
imports with the parent's ``sys.path`` (passed in ``JAXALIGN_VERIFY_SYS_PATH``), so a
function the parent can import by name (a user reward from the run's folder, a module the
parent put on ``sys.path``) the worker can too.
"""

from __future__ import annotations

import atexit
import collections
import math
import os
import pathlib
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, Pipe, wait
from typing import Any

from jaxalign.verify.grader import DEFAULT_TIMEOUT, grade_with_status
from jaxalign.verify.rewards import make_result, r1_zero_reward_fn

DEFAULT_GRACE = 1.0  # seconds past the soft limit before a worker is killed
DEFAULT_MEMORY_LIMIT = 4 << 30  # bytes of address space per worker (None: no limit)
_STARTUP_TIMEOUT = 120.0  # seconds for a new worker to import math-verify and warm up
# Most text per message. A queued chunk must fit in the socket buffer (~200 KB on Linux) so
# that sending it to a busy worker never blocks the parent.
_CHUNK_BYTES = 64 << 10
# The parent's sys.path, for the worker's imports (os.pathsep-separated).
SYS_PATH_ENV = "JAXALIGN_VERIFY_SYS_PATH"


def _payload_bytes(args: tuple) -> int:
    return 64 + sum(len(a) for a in args if isinstance(a, str))


# --- the worker ---------------------------------------------------------------------------


def _worker_main(fd: int, memory_limit: int | None, warm_up: bool = True) -> None:
    """Entry point of a worker process: serve chunks from the parent until told to stop."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    parent_path = [p for p in os.environ.get(SYS_PATH_ENV, "").split(os.pathsep) if p]
    # Import as the parent does: its entries in its order, then any of ours it lacks.
    sys.path[:] = parent_path + [p for p in sys.path if p not in parent_path]
    conn = Connection(fd)
    try:
        if memory_limit:
            import resource

            # A runaway sympy computation gets MemoryError instead of taking the host down.
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
        from jaxalign.verify import grader

        if warm_up:
            grader.warm_up()
        else:
            grader._math_verify()  # the import, at least, stays out of the first item's time
    except BaseException as e:  # noqa: BLE001 -- report anything, then die
        conn.send(("fatal", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):  # the parent is gone
            return
        try:
            message = pickle.loads(data)
        except Exception as e:  # e.g. a function that only exists in the parent's __main__
            conn.send(("unreadable", f"{type(e).__name__}: {e}"[:500]))
            continue
        if message is None:
            return
        batch_id, fn, kwargs, items = message
        for index, args in items:
            try:
                reply = (batch_id, index, True, fn(*args, **kwargs))
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # noqa: BLE001 -- one bad item must not end the batch
                reply = (batch_id, index, False, f"{type(e).__name__}: {e}"[:500])
            try:
                conn.send(reply)
            except Exception as e:  # an unpicklable result
                conn.send((batch_id, index, False, f"unpicklable result: {e}"[:500]))


def _worker_command(fd: int, memory_limit: int | None, warm_up: bool) -> list[str]:
    code = (
        "import sys; from jaxalign.verify.pool import _worker_main; "
        "_worker_main(int(sys.argv[1]), int(sys.argv[2]) or None, sys.argv[3] == '1')"
    )
    return [sys.executable, "-c", code, str(fd), str(memory_limit or 0), str(int(warm_up))]


class _Worker:
    """One worker process, its connection, and the items it holds."""

    def __init__(self, memory_limit: int | None, warm_up: bool):
        self.conn, child = Pipe(duplex=True)
        env = dict(os.environ)
        # Make this checkout of jaxalign importable in the child even if it is not installed.
        package_root = str(pathlib.Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        # Relative entries ('' is the current folder) made absolute, as the parent reads them.
        env[SYS_PATH_ENV] = os.pathsep.join(os.path.abspath(p) for p in sys.path)
        self.process = subprocess.Popen(
            _worker_command(child.fileno(), memory_limit, warm_up),
            pass_fds=(child.fileno(),),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        child.close()  # so that the worker's death reads as EOF here
        self.started = time.monotonic()
        self.ready = False
        self.pending: collections.deque[int] = collections.deque()  # sent, not yet answered
        self.last_progress = self.started  # when the current item started, roughly

    def kill(self) -> None:
        try:
            self.process.kill()
            self.process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.conn.close()


# --- the pool -----------------------------------------------------------------------------


class _Batch:
    """The state of one ``_run``: results so far, the queue, and how to fill failed items."""

    def __init__(self, batch_id, fn, kwargs, arg_tuples, on_timeout, on_error, group_key):
        self.id, self.fn, self.kwargs, self.args = batch_id, fn, kwargs, arg_tuples
        self.on_timeout, self.on_error = on_timeout, on_error
        n = len(arg_tuples)
        self.results: list = [None] * n
        self.done = [False] * n
        self.remaining = n
        order = (
            range(n)
            if group_key is None
            else sorted(range(n), key=lambda i: group_key(arg_tuples[i]))
        )
        self.queue = collections.deque(order)

    def finish(self, index: int, value: Any) -> None:
        if not self.done[index]:
            self.results[index], self.done[index] = value, True
            self.remaining -= 1

    def take(self, max_items: int, max_bytes: float) -> list[int]:
        """Up to ``max_items`` queued indices holding at most ``max_bytes`` of text (at least
        one item unless even the first is over ``max_bytes``)."""
        items, size = [], 0
        while self.queue and len(items) < max_items:
            size += _payload_bytes(self.args[self.queue[0]])
            if size > max_bytes or (items and size > _CHUNK_BYTES):
                break
            items.append(self.queue.popleft())
        return items


class ScoringPool:
    """A pool of grading processes with per-item deadlines.

    Use as a context manager (``with ScoringPool(2) as pool: pool.score(...)``) or call
    ``close()``; ``score_batch`` wraps a shared pool. A pool is thread-safe (concurrent calls
    run one after another) but belongs to the process that made it: a forked child must make
    its own.

    Args:
        num_workers: worker processes (default: the number of CPUs).
        timeout: default per-item limit in seconds. The reward function gets it as its
            ``timeout`` argument (the soft limit inside the worker); the worker is killed
            if an item takes ``timeout + grace``.
        grace: seconds past ``timeout`` before a worker is killed.
        chunk_size: most items per message; smaller chunks are used for small batches so
            that every worker gets work.
        memory_limit: bytes of address space per worker (None: unlimited).
        warm_up: have each new worker run ``grader.warm_up()`` (about a second of CPU)
            before taking work, so that sympy's one-time costs do not land on real items.
            Turn off where start-up time matters more (tests).

    Attributes:
        stats: counts over the pool's life: ``items``, ``timed_out`` (soft limits hit plus
            workers killed), ``killed``, ``errors``, ``restarts``, and ``max_item_seconds``
            (the longest an item kept a worker busy, as seen by the parent).
    """

    def __init__(
        self,
        num_workers: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        grace: float = DEFAULT_GRACE,
        chunk_size: int = 64,
        memory_limit: int | None = DEFAULT_MEMORY_LIMIT,
        warm_up: bool = True,
    ):
        self._workers: list[_Worker] = []
        self._owner = os.getpid()
        if num_workers is not None and num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if timeout is None or timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.num_workers = num_workers or os.cpu_count() or 1
        self.timeout = float(timeout)
        self.grace = float(grace)
        self.chunk_size = max(1, int(chunk_size))
        self.memory_limit = memory_limit
        self.warm_up = warm_up
        self.stats: dict[str, float] = dict.fromkeys(
            ("items", "timed_out", "killed", "errors", "restarts", "max_item_seconds"), 0
        )
        self._lock = threading.Lock()
        self._batch_id = 0
        self._closed = False

    # -- public API

    def score(
        self,
        responses: Sequence[str],
        ground_truths: Sequence,
        reward_fn: Callable[..., dict] = r1_zero_reward_fn,
        *,
        timeout: float | None = None,
        **reward_kwargs: Any,
    ) -> list[dict]:
        """Rewards of every (response, ground truth) pair, in input order.

        Args:
            responses: model outputs.
            ground_truths: one per response (a list element means "any of these").
            reward_fn: ``reward_fn(response, ground_truth, timeout=..., **reward_kwargs)``,
                importable by name, e.g. ``r1_zero_reward_fn``, or a ``Reward``.
            timeout: per-item limit (default: the pool's).
            **reward_kwargs: passed to ``reward_fn`` (``strict_form``, ``format_bonus``).

        Returns:
            One dict per response. An item whose worker was killed scores 0 with
            ``"timed_out": True``; one whose grading raised scores 0 with ``"error"``.
        """
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
        results = self._run(
            reward_fn,
            list(zip(responses, ground_truths, strict=True)),
            reward_kwargs,
            timeout,
            on_timeout=lambda: make_result(False, False, timed_out=True),
            on_error=lambda msg: dict(make_result(False, False), error=msg),
            # Same ground truth, same chunk: each worker parses a gold once and caches it.
            group_key=lambda args: repr(args[1]),
        )
        self.stats["timed_out"] += sum(1 for r in results if r.get("timed_out"))
        return results

    def map(
        self,
        fn: Callable,
        arg_tuples: Sequence[tuple],
        *,
        timeout: float | None = None,
        on_timeout: Any = None,
        on_error: Any = None,
        **kwargs: Any,
    ) -> list:
        """``[fn(*args, timeout=timeout, **kwargs) for args in arg_tuples]``, in input order.

        ``fn`` must accept ``timeout`` (the soft limit) and be importable by name. Items
        whose worker is killed give ``on_timeout``; items that raise give ``on_error``.
        """
        return self._run(
            fn, list(arg_tuples), kwargs, timeout, lambda: on_timeout, lambda msg: on_error
        )

    def grade_with_status(
        self, given: str, golds: list, *, strict_form: bool = False, timeout: float | None = None
    ) -> tuple[bool, bool]:
        """``grader.grade_with_status`` in a worker: for callers off the main thread."""
        (result,) = self._run(
            grade_with_status,
            [(given, golds)],
            {"strict_form": strict_form},
            timeout,
            on_timeout=lambda: (False, True),
            on_error=lambda msg: (False, False),
        )
        self.stats["timed_out"] += int(result[1])
        return tuple(result)

    def close(self) -> None:
        """Stops the workers (idempotent; a no-op in a forked child, which does not own them)."""
        with self._lock:
            self._closed = True
            if os.getpid() != self._owner:
                self._workers = []
                return
            for w in self._workers:
                try:
                    w.conn.send(None)
                except OSError:
                    pass
            for w in self._workers:
                try:
                    w.process.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass
                w.kill()
            self._workers = []

    def __enter__(self) -> ScoringPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_owner", None) == os.getpid():
            for w in self._workers:
                w.kill()

    # -- the scheduler

    def _run(self, fn, arg_tuples, kwargs, timeout, on_timeout, on_error, group_key=None) -> list:
        timeout = self.timeout if timeout is None else float(timeout)
        try:  # fail here, clearly, rather than in a worker
            pickle.dumps((fn, kwargs))
        except Exception as e:
            raise TypeError(
                f"cannot send {fn!r} to verifier workers ({e}): pass a module-level function "
                "(or a functools.partial of one) and picklable keyword arguments"
            ) from e
        with self._lock:
            if self._closed:
                raise RuntimeError("ScoringPool is closed")
            if os.getpid() != self._owner:
                raise RuntimeError("a ScoringPool cannot be used in a forked child: make a new one")
            self._batch_id += 1
            batch = _Batch(
                self._batch_id,
                fn,
                dict(kwargs, timeout=timeout),
                arg_tuples,
                on_timeout,
                on_error,
                group_key,
            )
            try:
                self._schedule(batch, hard_limit=timeout + self.grace)
            except BaseException:
                # Interrupted (Ctrl-C, a bug): workers may still hold this batch's items.
                # Replace them all so nothing stale leaks into the next batch.
                for w in self._workers:
                    w.kill()
                self._workers = []
                raise
            self.stats["items"] += len(arg_tuples)
            return batch.results

    def _schedule(self, batch: _Batch, hard_limit: float) -> None:
        """Feeds workers, collects results and kills overrunning workers until all are done."""
        # Enough chunks for every worker to get several: balances a small batch.
        chunk = max(1, min(self.chunk_size, math.ceil(len(batch.args) / (4 * self.num_workers))))
        self._start_workers()
        while batch.remaining:
            for w in list(self._workers):
                self._feed(w, batch, chunk)
            now = time.monotonic()
            deadlines = [
                w.last_progress + hard_limit if w.ready else w.started + _STARTUP_TIMEOUT
                for w in self._workers
                if w.pending or not w.ready
            ]
            ready = wait(
                [w.conn for w in self._workers],
                timeout=max(0.0, min(deadlines) - now) if deadlines else None,
            )
            for w in list(self._workers):
                if w.conn in ready and not self._collect(w, batch):
                    continue  # it died and was replaced
                self._reap_if_overdue(w, batch, hard_limit)

    def _feed(self, w: _Worker, batch: _Batch, chunk: int) -> None:
        """Sends ``w`` work: a chunk if idle, plus up to one more queued behind it.

        The queued chunk lets the worker go on without waiting for the parent. It is kept
        under ``_CHUNK_BYTES``: a send to a busy worker must fit in the socket buffer, or a
        worker stuck in C code would block the parent here and no deadline would be enforced.
        """
        while w.ready and batch.queue and len(w.pending) <= chunk:
            items = batch.take(chunk, _CHUNK_BYTES if w.pending else math.inf)
            if not items:
                return
            if not w.pending:
                w.last_progress = time.monotonic()
            w.pending.extend(items)
            try:
                w.conn.send((batch.id, batch.fn, batch.kwargs, [(i, batch.args[i]) for i in items]))
            except OSError as e:
                self._lost(w, batch, repr(e))
                return

    def _collect(self, w: _Worker, batch: _Batch) -> bool:
        """Reads everything ``w`` has sent. Returns False if it died (and was replaced)."""
        try:
            while w.conn.poll():
                message = w.conn.recv()
                kind = message[0]
                if kind == "ready":
                    w.ready = True
                elif kind == "unreadable":
                    raise RuntimeError(
                        f"a verifier worker could not read its task ({message[1]}); "
                        "functions sent to workers must be importable by name"
                    )
                elif kind == "fatal":
                    raise RuntimeError(f"a verifier worker failed to start: {message[1]}")
                elif kind == batch.id:
                    _, index, ok, value = message
                    now = time.monotonic()
                    self._note_item_time(now - w.last_progress)
                    w.last_progress = now
                    w.pending.remove(index)
                    if not ok:
                        self.stats["errors"] += 1
                    batch.finish(index, value if ok else batch.on_error(value))
                # else: a result left over from an interrupted batch
        except (EOFError, OSError):
            self._lost(w, batch, f"exit code {w.process.poll()}")
            return False
        return True

    def _reap_if_overdue(self, w: _Worker, batch: _Batch, hard_limit: float) -> None:
        """Kills ``w`` if its current item is past the hard deadline; scores that item."""
        elapsed = time.monotonic() - (w.last_progress if w.ready else w.started)
        if w.ready and w.pending and elapsed > hard_limit:
            self.stats["killed"] += 1
            self._note_item_time(elapsed)
            batch.finish(w.pending.popleft(), batch.on_timeout())
            batch.queue.extendleft(reversed(w.pending))  # the rest of its chunk, in order
            self._retire(w)
        elif not w.ready and elapsed > _STARTUP_TIMEOUT:
            raise RuntimeError(f"a verifier worker did not start in {_STARTUP_TIMEOUT:g}s")

    def _lost(self, w: _Worker, batch: _Batch, why: str) -> None:
        """``w`` died or broke its pipe: the item it was on is lost, the rest re-queued."""
        if not w.ready:
            raise RuntimeError(f"a verifier worker exited while starting ({why})")
        if w.pending:
            self.stats["errors"] += 1
            batch.finish(w.pending.popleft(), batch.on_error(f"the worker process died ({why})"))
        batch.queue.extendleft(reversed(w.pending))
        self._retire(w)

    def _note_item_time(self, seconds: float) -> None:
        self.stats["max_item_seconds"] = max(self.stats["max_item_seconds"], seconds)

    def _start_workers(self) -> None:
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self.memory_limit, self.warm_up))

    def _retire(self, w: _Worker) -> None:
        w.kill()
        self._workers.remove(w)
        self._start_workers()
        self.stats["restarts"] += 1


# --- shared pools and the simple entry point ---------------------------------------------

_SHARED: dict[int, ScoringPool] = {}
_SHARED_LOCK = threading.Lock()


def shared_pool(num_workers: int | None = None) -> ScoringPool:
    """A process-wide pool with ``num_workers`` workers, started on first use, closed at exit.

    Starting workers takes a second or two (each imports sympy and math-verify), so
    repeated ``score_batch`` calls reuse these.
    """
    n = num_workers or os.cpu_count() or 1
    with _SHARED_LOCK:
        pool = _SHARED.get(n)
        if pool is None or pool._closed or pool._owner != os.getpid():
            pool = _SHARED[n] = ScoringPool(n)
            atexit.register(pool.close)
        return pool


def score_batch(
    responses: Sequence[str],
    ground_truths: Sequence,
    reward_fn: Callable[..., dict] = r1_zero_reward_fn,
    *,
    num_workers: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    **reward_kwargs: Any,
) -> list[dict]:
    """Scores a batch in worker processes; results in input order.

    Args:
        responses: model outputs.
        ground_truths: one per response (a list element means "any of these").
        reward_fn: a module-level reward function, e.g. ``r1_zero_reward_fn`` (default) or
            ``question_only_reward_fn``, or a ``Reward`` (``rewards.resolve_reward``: a
            config's spec, user functions and weighted sums included).
        num_workers: worker processes of the shared pool (None: the number of CPUs). 0 scores
            in this process; the time limit then needs the main thread (elsewhere each call
            is sent to the shared pool anyway).
        timeout: per-item limit in seconds.
        **reward_kwargs: passed to ``reward_fn`` (``strict_form``, ``format_bonus``).

    Returns:
        One reward dict per response (see ``ScoringPool.score``).
    """
    if num_workers == 0:
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
        return [
            reward_fn(r, g, timeout=timeout, **reward_kwargs)
            for r, g in zip(responses, ground_truths, strict=True)
        ]
    return shared_pool(num_workers).score(
        responses, ground_truths, reward_fn, timeout=timeout, **reward_kwargs
    )

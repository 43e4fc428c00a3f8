"""Bringing a lost sidecar back: the restart command, waiting on ``/health``, cleanup.

Split from the client's request path (``client.SidecarEngine``): the client decides *that*
a sidecar is lost (retries spent, or the sidecar reported itself dead after a failed
in-place reload); ``Restarter`` knows *how* to bring one back, and ``poll_health`` is the
one loop that waits on a sidecar's ``/health``, for it to come up or to go away.

A probe is ``probe(url, timeout) -> (status, body)``, or ``None`` when nothing answered
(refused, reset, timed out): the client's HTTP exchange, so this module speaks no HTTP.
"""

from __future__ import annotations

import shlex
import subprocess
import time
import urllib.parse
import weakref
from collections.abc import Callable, Sequence
from typing import Any

Probe = Callable[[str, float], "tuple[int, dict] | None"]


class SidecarError(RuntimeError):
    """A sidecar could not be reached, or refused or failed a request (the URL is named)."""


def poll_health(probe: Probe, url: str, *, up: bool, timeout: float, interval: float,
                request_timeout: float = 10.0, ready: Callable[[int], bool] = (200).__eq__,
                gave_up: Callable[[], str | None] = lambda: None) -> tuple[int, dict] | None:
    """Polls ``url``'s ``/health`` until it answers with a ``ready`` status (``up``: returns
    ``(status, body)``) or stops answering (not ``up``: returns ``(0, {})``), for at most
    ``timeout`` seconds (at least one probe). Returns ``None`` when the time runs out.

    Args:
        ready: which HTTP statuses end an ``up`` wait (default: 200).
        gave_up: called between probes; a message stops the wait with ``SidecarError``
            (e.g. the restart command exited before the sidecar answered).
    """
    deadline = time.monotonic() + timeout
    while True:
        answer = probe(url, request_timeout)
        if up and answer is not None and ready(answer[0]):
            return answer
        if not up and answer is None:
            return 0, {}
        message = gave_up()
        if message:
            raise SidecarError(message)
        if time.monotonic() >= deadline:
            return None
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


def stop_processes(processes: list[subprocess.Popen]) -> None:
    """Terminates (then kills) processes; also run at exit for sidecars a client restarted."""
    for proc in processes:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    processes.clear()


class Restarter:
    """Runs ``command`` to restart a sidecar and waits for it; stops what it started.

    Args:
        command: a callable taking the URL, an argv list, or a shell-style string; strings
            may use ``{url}``, ``{host}`` and ``{port}``.
        timeout: seconds a restarted sidecar may take to answer ``/health`` (and a dying
            one to stop answering).
    """

    def __init__(self, command: str | Sequence[str] | Callable[[str], Any], timeout: float):
        self.command, self.timeout = command, timeout
        self.processes: list[subprocess.Popen] = []
        weakref.finalize(self, stop_processes, self.processes)  # they die with the trainer

    def restart(self, url: str, reason: str, probe: Probe) -> dict:
        """Starts the sidecar at ``url`` again and returns its first ``/health`` body.

        Raises:
            SidecarError: the command exited first, or ``/health`` never answered.
        """
        parsed = urllib.parse.urlsplit(url)
        fields = dict(url=url, host=parsed.hostname, port=parsed.port)
        proc = None
        if callable(self.command):
            self.command(url)
        else:
            argv = (shlex.split(self.command.format(**fields)) if isinstance(self.command, str)
                    else [str(a).format(**fields) for a in self.command])
            proc = subprocess.Popen(argv)
            self.processes.append(proc)

        def exited() -> str | None:
            if proc is not None and proc.poll() is not None:
                return (f"sidecar {url} was unreachable ({reason}); the restart command exited "
                        f"with status {proc.returncode} before the sidecar answered /health")
            return None

        answer = poll_health(probe, url, up=True, timeout=self.timeout, interval=0.5,
                             gave_up=exited)
        if answer is None:
            raise SidecarError(
                f"sidecar {url} was unreachable ({reason}); restarted it, but /health did "
                f"not answer within {self.timeout:.0f} s")
        return answer[1]

    def wait_gone(self, url: str, probe: Probe) -> None:
        """Waits until a dying sidecar stops answering (it exits after its last 503)."""
        if poll_health(probe, url, up=False, timeout=self.timeout, interval=0.2,
                       request_timeout=5) is None:
            raise SidecarError(
                f"sidecar {url} reported itself dead but still answers after "
                f"{self.timeout:.0f} s; stop it by hand")

    def stop(self) -> None:
        stop_processes(self.processes)

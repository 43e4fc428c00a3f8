"""jaxalign.rollout.restarts: the one /health wait and the restart command, on fake probes.

The client's end-to-end restarts (a killed sidecar, a failed in-place reload) are tested
against real sidecar processes in test_server.py and test_vllm_defects.py.
"""

import sys

import pytest

from jaxalign.rollout.restarts import Restarter, SidecarError, poll_health


def scripted(*answers):
    """A probe answering from a script (None: no answer), repeating its last answer."""
    calls = []

    def probe(url, timeout):
        calls.append((url, timeout))
        return answers[min(len(calls), len(answers)) - 1]

    return probe, calls


def test_up_waits_for_a_ready_status_and_returns_it():
    probe, calls = scripted(None, (503, {"loading": True}), (200, {"ok": 1}))
    assert poll_health(probe, "u", up=True, timeout=10, interval=0) == (200, {"ok": 1})
    assert len(calls) == 3
    probe, calls = scripted(None, (401, {"error": "token"}))
    assert poll_health(probe, "u", up=True, timeout=10, interval=0,
                       ready=lambda status: True) == (401, {"error": "token"})


def test_down_waits_until_nothing_answers():
    probe, calls = scripted((200, {}), (503, {}), None)
    assert poll_health(probe, "u", up=False, timeout=10, interval=0) == (0, {})
    assert len(calls) == 3


def test_the_deadline_gives_none_after_at_least_one_probe():
    probe, calls = scripted(None)
    assert poll_health(probe, "u", up=True, timeout=0, interval=0) is None
    assert len(calls) == 1
    probe, calls = scripted((200, {}))
    assert poll_health(probe, "u", up=False, timeout=0.05, interval=0.01) is None
    assert len(calls) >= 2


def test_gave_up_stops_the_wait_with_its_message():
    probe, _ = scripted(None)
    with pytest.raises(SidecarError, match="exited"):
        poll_health(probe, "u", up=True, timeout=10, interval=0, gave_up=lambda: "exited")


def test_a_restart_command_that_exits_first_is_reported_with_its_status():
    restarter = Restarter([sys.executable, "-c", "raise SystemExit(3)"], timeout=30)
    probe, _ = scripted(None)
    with pytest.raises(SidecarError, match="exited with status 3 before the sidecar answered"):
        restarter.restart("http://127.0.0.1:9", "connection refused", probe)
    assert not restarter.processes or restarter.processes[0].poll() == 3


def test_a_callable_restart_returns_the_first_health_body():
    started = []
    restarter = Restarter(started.append, timeout=30)
    probe, _ = scripted(None, (200, {"weights_version": 0}))
    assert restarter.restart("http://h:1", "gone", probe) == {"weights_version": 0}
    assert started == ["http://h:1"]


def test_a_sidecar_that_never_comes_back_or_never_goes_away_is_an_error():
    restarter = Restarter(lambda url: None, timeout=0.05)
    with pytest.raises(SidecarError, match="did not answer within"):
        restarter.restart("http://h:1", "gone", scripted(None)[0])
    with pytest.raises(SidecarError, match="still answers after"):
        restarter.wait_gone("http://h:1", scripted((503, {}))[0])


def test_stop_ends_the_processes_it_started():
    restarter = Restarter([sys.executable, "-c", "import time; time.sleep(60)"], timeout=0.2)
    probe, _ = scripted(None)
    with pytest.raises(SidecarError):
        restarter.restart("http://h:1", "gone", probe)
    proc = restarter.processes[0]
    assert proc.poll() is None
    restarter.stop()
    assert proc.poll() is not None and not restarter.processes

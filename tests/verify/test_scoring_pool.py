"""ScoringPool and score_batch: order, equality with in-process scoring, killed and crashed
workers, errors, and the pool's life cycle.

The helpers below run inside worker processes, which import this module by name: the
``pool`` fixture puts this directory on the workers' PYTHONPATH.
"""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from jaxalign.verify import (
    ScoringPool,
    question_only_reward_fn,
    r1_zero_reward_fn,
    score_batch,
)

HERE = pathlib.Path(__file__).resolve().parent


def echo(x, timeout=None):
    return x


def stuck(seconds, timeout=None):
    """Ignores the soft limit (SIGALRM blocked) like C code that never returns: only a kill
    stops it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(seconds)
    return "finished"


def sleep_or_echo(x, timeout=None):
    return stuck(60) if x == "stuck" else x


def crash(code, timeout=None):
    os._exit(code)


def fail(message, timeout=None):
    raise ValueError(message)


def imports_jax(timeout=None):
    return sorted(m for m in sys.modules if m == "jax" or m.startswith(("jax.", "jaxlib", "flax")))


def hanging_reward(response, ground_truth, timeout=None):
    if response == "hang":
        stuck(60)
    return r1_zero_reward_fn(response, ground_truth, timeout=timeout)


@pytest.fixture(scope="module")
def pool():
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), old) if p)
    try:
        with ScoringPool(num_workers=2, timeout=0.5, grace=0.5, warm_up=False) as p:
            yield p
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old


def r1(answer):
    return f"Some reasoning. </think> <answer>{answer}</answer>"


RESPONSES = [r1("5"), r1("6"), "no format 5", r1("\\frac{6}{4}"), r1("x = 5"), r1("(1,2)")]
TRUTHS = ["5", "5", "5", "1.5", "5", "(2,1)"]


def test_results_equal_in_process_scoring_in_input_order(pool):
    responses = RESPONSES * 50
    truths = TRUTHS * 50
    expected = [r1_zero_reward_fn(r, g) for r, g in zip(responses, truths, strict=True)]
    assert [e["reward"] for e in expected[:6]] == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    assert pool.score(responses, truths) == expected
    assert pool.map(echo, [(i,) for i in range(1000)]) == list(range(1000))


def test_reward_kwargs_and_other_reward_functions(pool):
    assert pool.score([r1("\\frac{6}{4}")], ["1.5"], strict_form=True)[0]["reward"] == 0.0
    assert pool.score([r1("6")], ["5"], format_bonus=0.5)[0]["reward"] == 0.5
    assert pool.score(["\\boxed{5}"], ["5"], question_only_reward_fn)[0]["reward"] == 1.0


def test_a_stuck_worker_is_killed_and_replaced(pool):
    killed, restarts = pool.stats["killed"], pool.stats["restarts"]
    args = [(i,) for i in range(40)]
    args[3] = ("stuck",)
    start = time.monotonic()
    results = pool.map(sleep_or_echo, args, on_timeout="TIMEOUT")
    # The stuck item ends at the hard deadline (0.5 + 0.5 s), not after a minute; the rest
    # of its worker's chunk is re-queued and comes back in order.
    assert time.monotonic() - start < 10
    assert results == [i if i != 3 else "TIMEOUT" for i in range(40)]
    assert pool.stats["killed"] == killed + 1
    assert pool.stats["restarts"] == restarts + 1
    assert pool.map(echo, [(i,) for i in range(100)]) == list(range(100))  # still works


def test_a_stuck_item_in_a_batch_costs_only_itself(pool):
    responses = [r1(str(i)) for i in range(60)]
    responses[41] = "hang"
    truths = [str(i) for i in range(60)]
    start = time.monotonic()
    results = pool.score(responses, truths, hanging_reward)
    assert time.monotonic() - start < 15
    for i, result in enumerate(results):
        if i == 41:
            assert result == {
                "format_reward": 0.0, "answer_reward": 0.0, "reward": 0.0, "timed_out": True
            }  # fmt: skip
        else:
            assert result == {"format_reward": 1.0, "answer_reward": 1.0, "reward": 1.0}, i


def test_a_soft_timeout_is_scored_zero_and_counted(pool):
    before = pool.stats["timed_out"]
    results = pool.score([r1("10^{10^{10^{10}}}"), r1("5")], ["5", "5"])
    assert results[0] == {
        "format_reward": 1.0, "answer_reward": 0.0, "reward": 0.0, "timed_out": True
    }  # fmt: skip
    assert results[1]["reward"] == 1.0
    assert pool.stats["timed_out"] == before + 1
    assert pool.stats["max_item_seconds"] < 0.5 + 0.5 + 0.5


def test_a_crashed_worker_costs_one_item(pool):
    results = pool.map(crash, [(3,)], on_error="ERR")
    assert results == ["ERR"]
    assert pool.map(echo, [(i,) for i in range(10)]) == list(range(10))


def test_an_exception_is_an_error_result_not_a_crash(pool):
    assert pool.map(fail, [("boom",), ("bang",)], on_error="ERR") == ["ERR", "ERR"]
    result = pool.score([r1("5")], [object()])[0]  # an unusable ground truth
    assert result["reward"] == 0.0


def test_unpicklable_functions_are_refused_up_front(pool):
    with pytest.raises(TypeError, match="module-level"):
        pool.map(lambda x, timeout=None: x, [(1,)])
    assert pool.map(echo, [(1,)]) == [1]


def test_mismatched_lengths_are_refused(pool):
    with pytest.raises(ValueError, match="2 responses but 1 ground truths"):
        pool.score(["a", "b"], ["1"])
    with pytest.raises(ValueError):
        score_batch(["a", "b"], ["1"], num_workers=0)


def test_workers_never_import_jax(pool):
    assert pool.map(imports_jax, [()] * 4) == [[]] * 4


def test_the_package_never_imports_jax():
    code = (
        "import sys, jaxalign.verify; jaxalign.verify.grade('1', '1'); "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_context_manager_stops_the_workers():
    with ScoringPool(num_workers=1, timeout=1.0, warm_up=False) as p:
        assert p.score([r1("5")], ["5"])[0]["reward"] == 1.0
        processes = [w.process for w in p._workers]
    assert all(proc.poll() is not None for proc in processes)
    with pytest.raises(RuntimeError, match="closed"):
        p.score([r1("5")], ["5"])
    p.close()  # idempotent


def test_score_batch_in_process_and_shared_pool():
    responses, truths = RESPONSES * 3, TRUTHS * 3
    in_process = score_batch(responses, truths, num_workers=0)
    assert in_process == [r1_zero_reward_fn(r, g) for r, g in zip(responses, truths, strict=True)]
    assert score_batch(responses, truths) == in_process
    assert score_batch([], []) == []


def test_invalid_pool_arguments():
    with pytest.raises(ValueError):
        ScoringPool(num_workers=0)
    with pytest.raises(ValueError):
        ScoringPool(timeout=0)


def test_a_forked_child_leaves_the_parents_workers_alone(pool):
    pid = os.fork()
    if pid == 0:  # the child: must refuse the pool, and its close() must not stop the workers
        code = 1
        try:
            pool.map(echo, [(1,)])
        except RuntimeError:
            pool.close()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert pool.map(echo, [(i,) for i in range(10)]) == list(range(10))


def test_rewards_computed_in_threads_are_not_silently_zero():
    """The failure other frameworks hit: rewards in a thread pool quietly becoming 0."""
    from concurrent.futures import ThreadPoolExecutor

    responses, truths = RESPONSES * 4, TRUTHS * 4
    in_main_thread = [r1_zero_reward_fn(r, g) for r, g in zip(responses, truths, strict=True)]
    with ThreadPoolExecutor(4) as threads:
        in_threads = list(threads.map(r1_zero_reward_fn, responses, truths))
    assert in_threads == in_main_thread
    assert sum(r["reward"] for r in in_threads) == 12.0

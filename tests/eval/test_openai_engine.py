"""``eval/evaluate.py --engine openai:URL`` against an OpenAI-compatible stand-in.

The stand-in is ``http.server`` in a thread on 127.0.0.1 that answers ``GET /v1/models``
and ``POST /v1/completions`` the way ``vllm serve`` does (the stop string cut from the
text and named in ``stop_reason``, log-prob tokens when asked), with scripted completions,
and records every request. The script runs its normal path: samples file, summary, resume.
"""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from jaxalign.evaluation import problem_seeds

PROBLEMS = [{"q": "What is 1+1?", "a": "2", "uid": "p1"},
            {"q": "What is 2+2?", "a": "4", "uid": "p2"},
            {"q": "What is 3+3?", "a": "6", "uid": "p3"}]
# Per question: (text the server returns, finish_reason, tokens). 1+1 right, 2+2 wrong, 3+3
# cut at max_tokens.
SCRIPT = {
    "1+1": (" one and one </think> <answer>2", "stop", 9),
    "2+2": (" guess </think> <answer>5", "stop", 7),
    "3+3": (" let me think about it for a long", "length", 16),
}


class StandIn:
    """The server's state: its requests, and a status to answer with (200: scripted)."""

    def __init__(self, *, name_stop: bool = True):
        self.requests: list[dict] = []
        self.status = 200
        self.name_stop = name_stop

    def answer(self, body: dict) -> dict:
        key = next(k for k in SCRIPT if k in body["prompt"])
        text, finish, count = SCRIPT[key]
        choices = []
        for j in range(body["n"]):
            choice = {"index": j, "text": text, "finish_reason": finish,
                      "logprobs": {"tokens": ["t"] * count,
                                   "token_logprobs": [-0.5] * count}}
            if self.name_stop:  # vLLM: the matched stop string, None for EOS
                choice["stop_reason"] = "</answer>" if finish == "stop" else None
            choices.append(choice)
        return {"id": "cmpl-1", "object": "text_completion", "model": body["model"],
                "choices": choices,
                "usage": {"prompt_tokens": 5, "completion_tokens": count * body["n"]}}


@pytest.fixture
def server():
    state = StandIn()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": "stand-in"}]})
            else:
                self._send(404, {"error": "no such path"})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state.requests.append(body)
            if self.path != "/v1/completions":
                self._send(404, {"error": "no such path"})
            elif state.status != 200:
                self._send(state.status, {"error": {"message": "max_tokens is too large"}})
            else:
                self._send(200, state.answer(body))

        def _send(self, status, payload):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def bench(tmp_path):
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return ["--benchmarks", str(path), "--fields", "question=q,answer=a,id=uid"]


def _run(ev, out, *args):
    return ev.run(ev.parse_args([*args, "--out", str(out), "--num-workers", "0",
                                 "--no-progress", "--no-plots"]))


def test_evaluates_through_an_openai_compatible_server(ev, server, bench, tmp_path):
    out = tmp_path / "out"
    summary = _run(ev, out, "--engine", f"openai:{server.url}", *bench, "--n", "2",
                   "--temperature", "0.7", "--top_p", "0.9", "--max_tokens", "16",
                   "--seed", "3")
    result = summary["results"]["tiny"]
    assert (result["examples"], result["samples"], result["accuracy"]) == (3, 6, 1 / 3)
    assert result["counts"] == {"format1_answer1": 2, "format1_answer0": 2, "format0": 2}
    assert (result["truncated"], result["response_length"]) == (2, (9 + 7 + 16) / 3)
    assert summary["settings"]["model"] == f"(served by openai:{server.url})"

    # The requests: one per problem, the documented fields, the problem's own seed.
    by_question = {p["q"]: r for r in server.requests for p in PROBLEMS if p["q"] in r["prompt"]}
    assert len(server.requests) == 3 and len(by_question) == 3
    from jaxalign.data.datasets import load_jsonl

    examples = load_jsonl(bench[1], ev.parse_fields(bench[3]))
    seeds = problem_seeds(3, "tiny", examples)
    for problem, seed in zip(PROBLEMS, seeds, strict=True):
        request = by_question[problem["q"]]
        assert request == {"model": "stand-in", "prompt": request["prompt"], "max_tokens": 16,
                           "temperature": 0.7, "top_p": 0.9, "n": 2, "stop": ["</answer>"],
                           "seed": seed, "logprobs": 1}
        assert request["prompt"].endswith("Assistant: <think>")

    rows = [json.loads(line) for line in (out / "samples" / "tiny.jsonl").read_text().split("\n")
            if line]
    first = next(r for r in rows if r["index"] == 0)
    assert first["response"].endswith("<answer>2</answer>")  # the stop string put back
    assert first["finish_reason"] == "stop" and first["extracted"] == "2"

    # A re-run resumes: nothing left, nothing sent.
    again = _run(ev, out, "--engine", f"openai:{server.url}", *bench, "--n", "2",
                 "--temperature", "0.7", "--top_p", "0.9", "--max_tokens", "16", "--seed", "3")
    assert again["progress"]["tiny"] == {"generated": 0, "skipped": 3}
    assert len(server.requests) == 3


def test_server_errors_and_bad_flags_are_one_line_errors(ev, server, bench, tmp_path):
    server.status = 400
    with pytest.raises(ev.EvalError, match="HTTP 400.*max_tokens is too large"):
        _run(ev, tmp_path / "a", "--engine", f"openai:{server.url}", *bench)
    with pytest.raises(ev.EvalError, match="need the model's tokenizer"):
        _run(ev, tmp_path / "b", "--engine", f"openai:{server.url}", *bench,
             "--budget-forcing", "max_thinking=64")
    with pytest.raises(ev.EvalError, match="choose one of"):
        _run(ev, tmp_path / "c", "--engine", "openai:localhost:8000", *bench)
    with pytest.raises(ev.EvalError, match="Connection refused|URLError"):
        _run(ev, tmp_path / "d", "--engine", "openai:http://127.0.0.1:9", *bench)


def test_a_server_that_does_not_name_the_stop_string(ev, server, capsys):
    # Without stop_reason / matched_stop, EOS and a stop string look alike: nothing is
    # appended (the r1_zero format check then fails rather than passing wrongly).
    from jaxalign.rollout import SamplingParams

    server.name_stop = False
    engine = ev.OpenAIEngine(server.url + "/v1", model="stand-in")
    params = SamplingParams(max_tokens=16, stop=("</answer>",), include_stop_str_in_output=True)
    (row,) = engine.generate(["Question: What is 1+1?"], params)
    assert row[0].text == SCRIPT["1+1"][0] and len(row[0].token_ids) == 9
    assert "does not say which stop string" in capsys.readouterr().err
    # One-prompt calls are seeded with the request's seed itself (as VllmEngine).
    assert server.requests[-1]["seed"] == 0

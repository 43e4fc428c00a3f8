"""``eval/evaluate.py``'s command line: one spelling per flag in ``--help`` (dashes), the
underscore spelling of every flag accepted as an alias, defaults shown in ``--help``, and the
warning for ``--n > 1`` at temperature 0. Parsing only: nothing is generated."""

import argparse
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT


def _flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every option of the parser but ``--help``."""
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def _value(action: argparse.Action) -> str:
    """A value the flag accepts that differs from its default."""
    if action.choices:
        return next(c for c in action.choices if c != action.default)
    if action.type is int:
        return str((action.default or 0) + 3)
    if action.type is float:
        return str((action.default or 0.0) + 0.25)
    return "x_y-z"  # underscores and dashes in a value are left alone


def test_help_shows_one_dashed_spelling_per_flag(ev):
    for action in _flags(ev.build_parser()):
        assert len(action.option_strings) == 1, action.option_strings
        assert "_" not in action.option_strings[0], action.option_strings


def test_every_flag_takes_its_underscore_spelling(ev):
    parser = ev.build_parser()
    out = ["--out", "o"]
    baseline = parser.parse_args(out)
    for action in _flags(parser):
        flag = action.option_strings[0]
        alias = "--" + flag[2:].replace("-", "_")
        args = [] if action.nargs == 0 else [_value(action)]
        base = [] if action.dest == "out" else out
        want = parser.parse_args([*base, flag, *args])
        assert getattr(want, action.dest) != getattr(baseline, action.dest), flag
        assert parser.parse_args([*base, alias, *args]) == want, alias
        if args:
            assert parser.parse_args([*base, f"{alias}={args[0]}"]) == want, alias
            assert parser.parse_args([*base, f"{flag}={args[0]}"]) == want, flag


def test_aliases_reach_the_config(ev):
    """The spellings the README and older commands use still parse, to the same config."""
    dashed = ev.parse_args(["--top-p", "0.9", "--max-tokens", "16", "--num-workers", "0",
                            "--data-dir", "d", "--batch-size", "4", "--out", "o"])
    underscored = ev.parse_args(["--top_p", "0.9", "--max_tokens=16", "--num_workers", "0",
                                 "--data_dir=d", "--batch_size", "4", "--out", "o"])
    assert underscored == dashed
    assert (dashed.top_p, dashed.max_tokens, dashed.num_workers) == (0.9, 16, 0)
    assert (dashed.data_dir, dashed.batch_size) == ("d", 4)


def test_an_unknown_flag_is_reported_as_typed(ev, capsys):
    with pytest.raises(SystemExit):
        ev.parse_args(["--out", "o", "--max_tokenz", "8"])
    assert "--max_tokenz" in capsys.readouterr().err


def _help_entries(text: str) -> dict[str, str]:
    """``--help`` output -> {flag: its usage and help text, on one line}."""
    entries: dict[str, str] = {}
    flag = None
    for line in text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = line.strip()
        elif flag and line.strip():
            entries[flag] += " " + line.strip()
    return entries


def test_help_shows_every_default(ev, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # no wrapping inside a flag's help
    entries = _help_entries(ev.build_parser().format_help())
    for action in _flags(ev.build_parser()):
        line = entries[action.option_strings[0]]
        if action.default is None or action.nargs == 0:
            assert "(default: None)" not in line and "(default: True)" not in line
        else:
            assert "default: " in line and str(action.default) in line, line


def test_help_from_the_command_line():
    proc = subprocess.run([sys.executable, "eval/evaluate.py", "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, COLUMNS="300"))
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"--max-tokens N +new tokens per response.*\(default: 1024\)", proc.stdout)
    assert "--temperature T" in proc.stdout and "(default: 0.0)" in proc.stdout
    assert "--max_tokens N" not in proc.stdout  # aliases are not listed


# --- n > 1 at temperature 0 ----------------------------------------------------------------


@pytest.fixture
def bench_args(tmp_path):
    path = tmp_path / "bench.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    return ["--benchmarks", str(path), "--fields", "question=question,answer=answer",
            "--engine", "openai:http://127.0.0.1:9", "--out", str(tmp_path / "out")]


def _warnings(ev, capsys, *argv) -> list[str]:
    ev.plan(ev.parse_args(list(argv)))  # checks the flags; no engine is contacted
    return [line for line in capsys.readouterr().err.splitlines() if "warning" in line]


def test_n_above_one_at_temperature_zero_warns(ev, capsys, bench_args):
    warned = _warnings(ev, capsys, *bench_args, "--n", "4")  # --temperature 0: the default
    assert warned == ["warning: --n 4 at --temperature 0 (greedy) draws 4 identical samples "
                      "per problem; pass --temperature > 0 to sample, or --n 1"]
    assert _warnings(ev, capsys, *bench_args, "--n", "4", "--temperature", "0.7") == []
    assert _warnings(ev, capsys, *bench_args, "--n", "1") == []

"""Helpers of the data tests: JSONL files written line by line."""

import json


def write_lines(path, lines):
    """Writes ``lines`` (strings, each a line) to ``path`` as UTF-8; returns ``path``."""
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def row(**fields):
    """One JSONL row of ``fields``."""
    return json.dumps(fields)

"""Command-line helpers of the training entry point: a bad flag explained in one line.

absl and ml_collections report an unknown config field (``--config.train.foo=1``) as a
30-line traceback ending ``AttributeError: "'foo'"``. ``explain_flag_error`` turns any
flag-parsing failure into one line: an unknown field with the closest real field names
and the fields of its block, or the parser's own first line for everything else (a value
of the wrong type, an unknown preset).
"""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Mapping, Sequence
from typing import Any

from jaxalign.rundir import flatten


def load_config_file(spec: str):
    """``configs/X.py[:preset]`` -> its ``get_config(preset)`` (as ``config_flags`` loads it)."""
    path, _, preset = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_jaxalign_cli_config", path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"--config={spec}: {path} is not a Python config file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(preset) if preset else module.get_config()


def config_overrides(argv: Sequence[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """``(--config value, [(field path, the flag as written), ...])`` from a command line."""
    spec, fields = None, []
    args = list(argv[1:])
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            spec = args[i + 1]
        elif arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg.startswith(("--config.", "--noconfig.")):
            name = arg.split("=", 1)[0].split("config.", 1)[1]
            fields.append((name, arg))
    return spec, fields


def unknown_field(config: Mapping[str, Any], path: str) -> str | None:
    """The first prefix of the dotted ``path`` that ``config`` lacks, or None."""
    node: Any = config
    parts = path.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, Mapping) or part not in node:
            return ".".join(parts[: depth + 1])
        node = node[part]
    return None


def explain_unknown(config: Mapping[str, Any], missing: str, flag: str) -> str:
    """One line: the unknown field, the closest real names, and its block's fields."""
    names = list(flatten(config))
    parent, _, _ = missing.rpartition(".")
    close = difflib.get_close_matches(missing, names, n=3, cutoff=0.6)
    if not close:  # a typo in the last part only: compare within the block
        siblings = [n for n in names if n.startswith(parent + ".")] if parent else names
        close = difflib.get_close_matches(missing, siblings, n=3, cutoff=0.3)
    block = config
    for part in parent.split(".") if parent else []:
        block = block[part]
    message = f"unknown field config.{missing} ({flag})"
    if close:
        message += "; did you mean " + " or ".join(f"config.{c}" for c in close) + "?"
    fields = ", ".join(sorted(block)) if isinstance(block, Mapping) else ""
    if fields:
        message += f" The fields of config{'.' + parent if parent else ''}: {fields}"
    return message


def explain_flag_error(argv: Sequence[str], error: BaseException) -> str:
    """The one-line explanation of a failed ``flags.FLAGS(argv)``."""
    spec, fields = config_overrides(argv)
    if spec is not None:
        try:
            config = load_config_file(spec).to_dict()
        except Exception as e:  # the config file itself failed: that is the message
            return f"--config={spec}: {_first_line(e)}"
        for path, flag in fields:
            missing = unknown_field(config, path)
            if missing is not None:
                return explain_unknown(config, missing, flag)
    return _first_line(error)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__

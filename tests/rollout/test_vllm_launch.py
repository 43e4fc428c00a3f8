"""The vLLM sidecar's own environment: ``launch/vllm_env.sh`` and ``sidecar.sh --vllm-env``;
and the ``--help`` of every launcher (they share ``lib.sh``'s ``header_help``).

Dry runs only (a real install is GBs; ``launch/vllm_env.sh --check`` is the real test).
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"


def _run(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def test_vllm_env_parses_has_help_and_prints_its_python():
    assert subprocess.run(["bash", "-n", str(LAUNCH / "vllm_env.sh")]).returncode == 0
    assert os.access(LAUNCH / "vllm_env.sh", os.X_OK)
    assert "--check" in _run("vllm_env.sh", "--help").stdout
    lines = _run("vllm_env.sh", "--env", "/envs/v", "--vllm", "0.11.0", "--dry-run").stdout
    *commands, python = lines.splitlines()
    assert python == "/envs/v/bin/python"
    install = shlex.split(commands[-1])
    assert install[:5] == ["uv", "pip", "install", "--python", "/envs/v/bin/python"]
    # 0.11 does not cap transformers, and was built against 4.x.
    assert "vllm==0.11.0" in install and "transformers<5" in install
    out = _run("vllm_env.sh", "--dry-run").stdout.splitlines()
    assert "vllm==0.33.0" in out[1] and "transformers<5" not in out[1]  # the default



@pytest.mark.parametrize("script", ["sidecar.sh", "vllm_env.sh", "gpu_nodes.sh", "tpu_pod.sh"])
def test_help_is_the_header_comment_and_nothing_else(script):
    """``--help`` prints the comment block at the top, read to its end (``lib.sh``'s
    ``header_help``), not a fixed line range: that once went stale and printed
    ``set -euo pipefail`` after the usage text."""
    lines = (LAUNCH / script).read_text().splitlines()
    header = []
    for line in lines[1:]:  # after the #! line
        if not line.startswith("#"):
            break
        header.append(line[2:] if line.startswith("# ") else line[1:])
    shown = _run(script, "--help").stdout.splitlines()
    assert shown == header
    assert not any(line.lstrip().startswith(("set -", "usage()", "source ")) for line in shown)

def test_the_default_vllm_is_in_the_supported_range():
    from packaging.specifiers import SpecifierSet

    from jaxalign.rollout.vllm_engine import SUPPORTED_VLLM

    text = (LAUNCH / "vllm_env.sh").read_text()
    default = next(line.split("=", 1)[1] for line in text.splitlines()
                   if line.startswith("DEFAULT_VLLM="))
    tested = next(line for line in text.splitlines() if line.startswith("TESTED_VLLM="))
    assert default in SpecifierSet(SUPPORTED_VLLM) and default in tested


def test_sidecar_runs_vllm_from_its_own_environment():
    out = _run("sidecar.sh", "--backend", "vllm", "--model", "/models/m", "--gpus", "0,1",
               "--vllm-env", "/envs/v", "--vllm-version", "0.33.0", "--dry-run").stdout
    lines = out.splitlines()
    setup = shlex.split(lines[0])
    assert setup[:3] == ["cd", str(REPO), "&&"]
    assert setup[3:] == ["launch/vllm_env.sh", "--env", "/envs/v", "--vllm", "0.33.0"]
    starts = [shlex.split(line) for line in lines[1:3]]
    for words in starts:
        assert words[5:8] == ["/envs/v/bin/python", "-m", "jaxalign.rollout.server"]
    # Over ssh: the environment is made on every host before its servers start.
    out = _run("sidecar.sh", "--backend", "vllm", "--model", "/m", "--hosts", "a,b",
               "--vllm-env", "/envs/v", "--dry-run").stdout.splitlines()
    assert [shlex.split(line)[:2] for line in out[:2]] == [["ssh", "a"], ["ssh", "b"]]
    assert "launch/vllm_env.sh --env /envs/v" in out[0] and "/envs/v/bin/python" in out[2]
    refused = _run("sidecar.sh", "--backend", "jax", "--model", "/m", "--vllm-env", "/e",
                   "--dry-run", check=False)
    assert refused.returncode == 2 and "--vllm-env is for --backend vllm" in refused.stderr

"""The shell launchers: syntax, the commands their --dry-run prints, and a real jax sidecar.

``tpu_pod.sh`` also runs for real against a stand-in ``gcloud`` that records its calls (no
cloud here), so the reuse-or-create branch is exercised, not only printed. The printed
environment of ``gpu_nodes.sh`` is fed to ``jaxalign.distributed.initialize_from_env`` to
check the two agree on names and meaning.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import urllib.request
from pathlib import Path

import jax
import pytest

from jaxalign import distributed

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCH = REPO_ROOT / "launch"
TRAIN = ["--config", "configs/grpo.py", "--config.data.template=it's {question}"]


def _run(script: str, *args: str, env: dict | None = None, check: bool = True):
    out = subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                         env=dict(os.environ, **(env or {})), timeout=120, cwd=REPO_ROOT)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def _assignments(tokens: list[str]) -> tuple[dict[str, str], list[str]]:
    """Leading ``K=V`` words (env) and the rest of a command's words."""
    env = {}
    while tokens and "=" in tokens[0] and not tokens[0].startswith("-"):
        key, value = tokens.pop(0).split("=", 1)
        env[key] = value
    return env, tokens


@pytest.mark.parametrize("script", ["tpu_pod.sh", "gpu_nodes.sh", "sidecar.sh"])
def test_scripts_parse_and_have_help(script):
    assert subprocess.run(["bash", "-n", str(LAUNCH / script)]).returncode == 0
    assert os.access(LAUNCH / script, os.X_OK)
    out = _run(script, "--help")
    assert "--dry-run" in out.stdout


# --- tpu_pod.sh -------------------------------------------------------------------------------

POD = ["--name", "s1", "--zone", "us-central2-b", "--accelerator-type", "v4-32",
       "--workdir", "gs://bucket/runs/a"]


def test_tpu_pod_dry_run_creates_installs_and_trains_on_all_workers():
    lines = _run("tpu_pod.sh", *POD, "--project", "p", "--dry-run", "--", *TRAIN).stdout
    cmds = [shlex.split(line) for line in lines.splitlines()]
    assert cmds[0][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "s1"]
    assert cmds[1][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "s1"]
    assert {"--zone=us-central2-b", "--project=p", "--accelerator-type=v4-32"} <= set(cmds[1])
    scp = next(c for c in cmds if c[4:5] == ["scp"])
    assert "--worker=all" in scp and scp[6] == "s1:jaxalign.tar.gz"
    ssh = [c for c in cmds if c[4:5] == ["ssh"]]
    assert len(ssh) == 2 and all("--worker=all" in c for c in ssh)
    install = ssh[0][-1]  # a Python 3.11 environment by uv: the images' python3 is 3.10
    assert "uv venv --allow-existing --python 3.11 ~/jaxalign-venv" in install
    assert "uv pip install --python ~/jaxalign-venv/bin/python -e ~/jaxalign[tpu] gcsfs" in install
    remote = ssh[1][-1].removeprefix("--command=")
    words = shlex.split(remote)
    assert words[:3] == ["cd", "~/jaxalign", "&&"]
    env, argv = _assignments(words[3:])
    assert env == {"JAXALIGN_DISTRIBUTED": "auto"}  # jax detects the slice itself
    assert argv == ["~/jaxalign-venv/bin/python", "-m", "jaxalign.train", *TRAIN,
                    "--config.workdir=gs://bucket/runs/a"]


def test_tpu_pod_reuses_an_existing_slice_and_creates_a_missing_one(tmp_path):
    """A stand-in gcloud records every call; describe fails or succeeds as told."""
    fake = tmp_path / "bin" / "gcloud"
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\necho "$*" >> "$GCLOUD_LOG"\n'
                    '[[ "$4" == describe ]] && exit "$DESCRIBE_RC"\nexit 0\n')
    fake.chmod(0o755)
    for rc, creates in (("1", True), ("0", False)):
        log = tmp_path / f"calls{rc}.txt"
        _run("tpu_pod.sh", *POD, "--delete-after", "--", *TRAIN,
             env={"PATH": f"{fake.parent}:{os.environ['PATH']}", "GCLOUD_LOG": str(log),
                  "DESCRIBE_RC": rc, "TMPDIR": str(tmp_path)})
        verbs = [line.split()[3] for line in log.read_text().splitlines()]
        want = ["describe", "create"] if creates else ["describe"]
        assert verbs == [*want, "scp", "ssh", "ssh", "delete"]
    assert (tmp_path / "jaxalign-s1.tar.gz").stat().st_size > 10_000  # the checkout, packed


@pytest.mark.parametrize("args, message", [
    (["--name", "s1", "--", "--config", "c.py"], "are required"),
    ([*POD[:-1], "/local/dir", "--", "--config", "c.py"], "must be a gs:// URL"),
    (POD, "give the training flags after --"),
])
def test_tpu_pod_argument_errors(args, message):
    out = _run("tpu_pod.sh", *args, "--dry-run", check=False)
    assert out.returncode == 2 and message in out.stderr


# --- gpu_nodes.sh -----------------------------------------------------------------------------


def _check_process(env: dict, argv: list[str], i: int, n: int, coordinator: str, monkeypatch):
    assert env == {"JAX_COORDINATOR_ADDRESS": coordinator, "JAX_NUM_PROCESSES": str(n),
                   "JAX_PROCESS_ID": str(i)}
    assert argv == ["python", "-m", "jaxalign.train", *TRAIN]
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    assert distributed.initialize_from_env(env)  # what train.py does with them
    assert calls == [dict(coordinator_address=coordinator, num_processes=n, process_id=i)]


def test_gpu_nodes_over_ssh_one_process_per_host(monkeypatch):
    out = _run("gpu_nodes.sh", "--hosts", "gpu0,gpu1,gpu2", "--port", "9999",
               "--remote-dir", "/srv/jaxalign", "--dry-run", "--", *TRAIN).stdout
    lines = out.splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        ssh, tty, host, remote = shlex.split(line)
        assert (ssh, tty, host) == ("ssh", "-tt", f"gpu{i}")  # Ctrl-C reaches the host
        words = shlex.split(remote)
        assert words[:3] == ["cd", "/srv/jaxalign", "&&"]
        _check_process(*_assignments(words[3:]), i, 3, "gpu0:9999", monkeypatch)


def test_gpu_nodes_under_slurm_reads_the_task_and_the_first_node(tmp_path, monkeypatch):
    scontrol = tmp_path / "scontrol"  # SLURM's hostname expansion, stood in
    scontrol.write_text("#!/usr/bin/env bash\nprintf 'node07\\nnode08\\n'\n")
    scontrol.chmod(0o755)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_PROCID": "1", "SLURM_NTASKS": "2",
           "SLURM_JOB_NODELIST": "node[07-08]"}
    line = _run("gpu_nodes.sh", "--slurm", "--dry-run", "--", *TRAIN, env=env).stdout.strip()
    _check_process(*_assignments(shlex.split(line)), 1, 2, "node07:12355", monkeypatch)
    out = _run("gpu_nodes.sh", "--slurm", "--dry-run", "--", *TRAIN, check=False,
               env={"SLURM_PROCID": ""})
    assert out.returncode != 0 and "SLURM_PROCID" in out.stderr


def test_gpu_nodes_explicit_flags_and_errors(monkeypatch):
    line = _run("gpu_nodes.sh", "--coordinator", "10.0.0.1:1234", "--num-processes", "4",
                "--process-id", "3", "--dry-run", "--", *TRAIN).stdout.strip()
    _check_process(*_assignments(shlex.split(line)), 3, 4, "10.0.0.1:1234", monkeypatch)
    out = _run("gpu_nodes.sh", "--coordinator", "h:1", "--dry-run", "--", *TRAIN, check=False)
    assert out.returncode == 2 and "--num-processes" in out.stderr


def test_gpu_nodes_really_starts_the_processes_with_their_environment(tmp_path):
    """Not a dry run: a stand-in interpreter records the environment and arguments it got
    (and a stand-in ssh runs the remote command here)."""
    fake = tmp_path / "fake-python"
    fake.write_text('#!/usr/bin/env bash\n{ pwd; echo "$JAX_COORDINATOR_ADDRESS '
                    '$JAX_NUM_PROCESSES $JAX_PROCESS_ID"; printf "%s\\n" "$@"; } '
                    '> "$OUT.$JAX_PROCESS_ID"\n')
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\nprintf 'node07\\nnode08\\n'\n")
    (bin_dir / "ssh").write_text('#!/usr/bin/env bash\n[[ $1 == -tt ]] || exit 9\n'
                                 'exec bash -c "$3"\n')
    for f in (fake, bin_dir / "scontrol", bin_dir / "ssh"):
        f.chmod(0o755)
    path = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    runs = {
        "explicit": (["--coordinator", "10.0.0.1:1234", "--num-processes", "4",
                      "--process-id", "3"], {}, {3: "10.0.0.1:1234 4 3"}),
        "slurm": (["--slurm"], {**path, "SLURM_PROCID": "1", "SLURM_NTASKS": "2",
                                "SLURM_JOB_NODELIST": "node[07-08]"}, {1: "node07:12355 2 1"}),
        "ssh": (["--hosts", "gpu0,gpu1"], path, {0: "gpu0:12355 2 0", 1: "gpu0:12355 2 1"}),
    }
    for name, (flags, env, want) in runs.items():
        out = tmp_path / name
        _run("gpu_nodes.sh", *flags, "--python", str(fake), "--remote-dir", str(tmp_path),
             "--", *TRAIN, env={**env, "OUT": str(out)})
        for pid, line in want.items():
            cwd, got, *argv = Path(f"{out}.{pid}").read_text().splitlines()
            assert (cwd, got) == (str(tmp_path), line), name
            assert argv == ["-m", "jaxalign.train", *TRAIN], name


# --- sidecar.sh -------------------------------------------------------------------------------


def _sidecar_commands(out: str):
    """(start commands, health URLs, the URL list of the last line)."""
    lines = out.splitlines()
    waits = [ln.removeprefix("wait for GET ").removesuffix("/health") for ln in lines
             if ln.startswith("wait for GET ")]
    starts = [ln for ln in lines[:-1] if not ln.startswith("wait for GET ")]
    return starts, waits, lines[-1].split(",")


def test_sidecar_dry_run_one_server_per_gpu_here():
    out = _run("sidecar.sh", "--backend", "vllm", "--model", "/models/m", "--gpus", "0,1,2+3",
               "--port", "8100", "--dry-run", "--", "--tensor-parallel-size", "1").stdout
    starts, waits, urls = _sidecar_commands(out)
    assert urls == waits == ["http://127.0.0.1:8100", "http://127.0.0.1:8101",
                             "http://127.0.0.1:8102"]
    for start, gpus, port in zip(starts, ["0", "1", "2,3"], [8100, 8101, 8102], strict=True):
        words = shlex.split(start)
        assert words[:3] == ["cd", str(REPO_ROOT), "&&"]
        assert words[3:5] == ["env", f"CUDA_VISIBLE_DEVICES={gpus}"]
        assert words[5:] [:3] == ["python", "-m", "jaxalign.rollout.server"]
        assert " ".join(words[8:]).startswith(
            f"--backend vllm --model /models/m --host 127.0.0.1 --port {port} "
            "--tensor-parallel-size 1")


def test_sidecar_dry_run_over_ssh():
    out = _run("sidecar.sh", "--backend", "jax", "--model", "/m", "--gpus", "0,1",
               "--hosts", "a,b", "--dry-run").stdout
    starts, waits, urls = _sidecar_commands(out)
    assert urls == ["http://a:8000", "http://a:8001", "http://b:8002", "http://b:8003"]
    assert [shlex.split(s)[1] for s in starts] == ["a", "a", "b", "b"]
    remote = shlex.split(shlex.split(starts[3])[2])
    assert "--host" in remote and remote[remote.index("--host") + 1] == "0.0.0.0"
    assert "CUDA_VISIBLE_DEVICES=1" in remote and remote[-1] == "&"
    out = _run("sidecar.sh", "--backend", "jax", "--model", "/m", "--hosts", "a", "--port", "0",
               "--dry-run", check=False)
    assert out.returncode == 2 and "this machine only" in out.stderr
    out = _run("sidecar.sh", "--backend", "tgi", "--model", "/m", "--dry-run", check=False)
    assert out.returncode == 2 and "vllm or jax" in out.stderr


@pytest.mark.slow
def test_sidecar_starts_a_jax_server_and_prints_a_healthy_url(tmp_path):
    from jaxalign.data.tokenizer import byte_tokenizer
    from jaxalign.models import init_model, save_pretrained, tiny

    tok = byte_tokenizer()
    save_pretrained(init_model(tiny(vocab_size=len(tok)), seed=0), tmp_path / "m", tokenizer=tok)
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAXALIGN_SIDECAR_TOKEN": "secret"}
    logs = tmp_path / "logs"
    try:
        out = _run("sidecar.sh", "--backend", "jax", "--model", str(tmp_path / "m"), "--gpus",
                   "none", "--port", "0", "--log-dir", str(logs), "--timeout", "90", "--",
                   "--dtype", "float32", env=env)
        url = out.stdout.splitlines()[-1]
        assert url.startswith("http://127.0.0.1:") and "," not in url
        req = urllib.request.Request(url + "/health", headers={"Authorization": "Bearer secret"})
        health = json.loads(urllib.request.urlopen(req, timeout=10).read())
        assert health["backend"] == "jax" and health["weights_ok"] is True
    finally:
        for pid in (logs / "sidecars.pids").read_text().split():
            try:
                os.kill(int(pid), 15)
            except ProcessLookupError:
                pass

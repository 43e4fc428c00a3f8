"""The sidecar's modules import in the sidecar's own environment.

``launch/vllm_env.sh`` installs vLLM with jax and flax only: no ml_collections, grain or
math-verify. A module on the server's import path that needs one of them breaks the
sidecar (and CI's vLLM contract check) only there; this catches it in the main tests.
"""

import subprocess
import sys
import textwrap

ABSENT_THERE = ("ml_collections", "grain", "math_verify", "wandb", "datasets")


def test_the_server_and_its_backends_import_without_the_trainers_packages():
    code = textwrap.dedent(f"""
        import importlib.abc, sys
        class Absent(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in {ABSENT_THERE!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (absent there)")
        sys.meta_path.insert(0, Absent())
        import jaxalign.rollout.server, jaxalign.rollout.vllm_engine, jaxalign.models.lora
        print("imported")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "imported" in out.stdout, out.stderr[-3000:]

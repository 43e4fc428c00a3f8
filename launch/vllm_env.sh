#!/usr/bin/env bash
# Create or reuse the Python environment a vLLM sidecar runs in, apart from the trainer's.
#
#   launch/vllm_env.sh [--env DIR] [--vllm VERSION] [--python PY] [--dry-run]
#   launch/vllm_env.sh --check [--keep] [--torch SPEC] [VERSION ...]
#
# vLLM pins its own torch, CUDA and transformers (0.33: torch 2.14 on CUDA 13,
# transformers < 5.21), which clash with jax[cuda12] and the trainer's test pins, so it
# never goes into the trainer's environment (the trainer never imports vllm). This makes
# DIR (default ~/.cache/jaxalign/vllm-VERSION) with `uv venv` (uv is installed into a
# plain venv first when it is not on PATH), installs vllm==VERSION with its own
# dependencies, plus jax and flax for CPU (jaxalign.rollout imports them; no jax GPU
# plugin), and prints the environment's python on the last line. An environment that
# already holds that vLLM is reused. jaxalign itself is not installed: the sidecar runs
# from the checkout (launch/sidecar.sh cds into it). VERSION defaults to DEFAULT_VLLM;
# the supported range is SUPPORTED_VLLM in jaxalign/rollout/vllm_engine.py.
#
# --check runs tests/rollout/test_vllm_contract.py against each VERSION (default: the
# tested ones below), each in a fresh CPU-only environment under $TMPDIR: vllm with
# --no-deps, its pure-Python requirements, and a CPU torch (--torch, default the
# trainer's test pin, torch==2.13.0) in place of its CUDA stack; no GPU needed. --keep
# keeps the environments. Exit status: the number of versions that failed.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"  # header_help
usage() { header_help "$0"; exit "${1:-2}"; }

DEFAULT_VLLM=0.33.0
TESTED_VLLM=(0.10.0 0.11.0 0.33.0 0.34.0)
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENV_DIR="" VERSION="$DEFAULT_VLLM" PYTHON=python3 CHECK=0 KEEP=0 DRY_RUN=0 TORCH=torch==2.13.0
VERSIONS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --env) ENV_DIR="$2"; shift 2 ;;
    --vllm) VERSION="$2"; shift 2 ;;
    --python) PYTHON="$2"; shift 2 ;;
    --torch) TORCH="$2"; shift 2 ;;
    --check) CHECK=1; shift ;;
    --keep) KEEP=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    -*) echo "vllm_env.sh: unknown argument $1" >&2; usage ;;
    *) VERSIONS+=("$1"); shift ;;
  esac
done
# Heavy or GPU-only requirements a CPU contract check leaves out (torch comes from --torch).
CPU_SKIP='^(torch|torchaudio|torchvision|torchcodec|triton|xformers|nvidia-.*|flashinfer.*|tilelang|quack-kernels|humming-kernels|tokenspeed-mla|pynvvideocodec|fastsafetensors|instanttensor|apache-tvm-ffi|nvtx|cupy.*|ray|zentorch|deep.?gemm|deep.?ep|opencv-python-headless)$'
# jaxalign.rollout imports these (the JAX engine), so the server needs them importable.
JAX_REQS=("jax>=0.7,<0.12" "flax>=0.11,<0.14")
# Pins vLLM $1 needs beyond its own metadata: 0.10 and 0.11 were built against transformers
# 4.x but do not cap it, and a resolver picks the newest 5.x.
extra_pins() { case "$1" in 0.10.*|0.11.*) echo "transformers<5" ;; esac; }

# uv for speed (about 5x faster than pip here); bootstrapped into a venv when missing.
make_env() {  # $1 = directory; sets UV and PY
  local dir="$1"
  if command -v uv >/dev/null; then
    UV=uv
    uv venv -q --seed --allow-existing --python "$PYTHON" "$dir"
  else
    "$PYTHON" -m venv "$dir"
    "$dir/bin/python" -m pip install -q uv
    UV="$dir/bin/uv"
  fi
  PY="$dir/bin/python"
}

if [[ $CHECK == 0 ]]; then
  ENV_DIR="${ENV_DIR:-$HOME/.cache/jaxalign/vllm-$VERSION}"
  if [[ $DRY_RUN == 1 ]]; then
    echo "uv venv --allow-existing $ENV_DIR"
    echo "uv pip install --python $ENV_DIR/bin/python vllm==$VERSION ${JAX_REQS[*]}" \
      "$(extra_pins "$VERSION")"
    echo "$ENV_DIR/bin/python"
    exit 0
  fi
  have="$("$ENV_DIR/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm"))' \
    2>/dev/null || true)"
  if [[ "$have" == "$VERSION" ]]; then
    echo "vllm_env.sh: reusing $ENV_DIR (vllm $have)" >&2
  else
    [[ -n "$have" ]] && echo "vllm_env.sh: $ENV_DIR has vllm $have; installing $VERSION" >&2
    make_env "$ENV_DIR"
    "$UV" pip install -q --python "$PY" "vllm==$VERSION" "${JAX_REQS[@]}" $(extra_pins "$VERSION")
    (cd "$REPO" && "$PY" -c 'import vllm, jaxalign.rollout.server') \
      || { echo "vllm_env.sh: $ENV_DIR cannot import the vLLM sidecar" >&2; exit 1; }
  fi
  echo "$ENV_DIR/bin/python"
  exit 0
fi

[[ ${#VERSIONS[@]} -eq 0 ]] && VERSIONS=("${TESTED_VLLM[@]}")
failed=0
for v in "${VERSIONS[@]}"; do
  dir="$(mktemp -d "${TMPDIR:-/tmp}/jaxalign-vllm-check-$v.XXXXXX")"
  start=$SECONDS
  set +e  # the subshell's own `set -e` holds only outside an && / || list: test $? instead
  (
    set -e
    make_env "$dir"
    # torch fetched by pip (the machine's pip configuration may point at a local CPU build,
    # which uv would not see), installed by uv.
    "$PY" -m pip download -q --no-deps "$TORCH" -d "$dir/wheels"
    "$UV" pip install -q --python "$PY" "$dir"/wheels/*.whl packaging
    "$UV" pip install -q --python "$PY" --no-deps "vllm==$v"
    "$PY" - "$CPU_SKIP" >"$dir/requirements.txt" <<'EOF'
import importlib.metadata, re, sys
from packaging.requirements import Requirement
skip = re.compile(sys.argv[1], re.I)
for line in importlib.metadata.requires("vllm") or []:
    req = Requirement(line)
    if (req.marker and not req.marker.evaluate({"extra": ""})) or skip.match(req.name):
        continue
    print(str(req).split(";")[0])
EOF
    torch_pin="torch==$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))')"
    echo "$torch_pin" >"$dir/constraints.txt"  # nothing may swap in vLLM's CUDA torch
    "$UV" pip install -q --python "$PY" -r "$dir/requirements.txt" -c "$dir/constraints.txt" \
      pytest "${JAX_REQS[@]}" $(extra_pins "$v")
    cd "$REPO"
    # --noconftest: the trainer's conftest imports what this environment does not have.
    PYTHONPATH="$REPO" "$PY" -m pytest -q -p no:cacheprovider --noconftest \
      tests/rollout/test_vllm_contract.py
    "$PY" -c 'import jaxalign.rollout.server, vllm'
  ) >"$dir.log" 2>&1
  rc=$?
  set -e
  status=passed
  [[ $rc == 0 ]] || { status=FAILED; failed=$((failed + 1)); tail -n 40 "$dir.log" >&2; }
  echo "vllm $v: $status in $((SECONDS - start)) s ($(tail -n 1 "$dir.log"); log $dir.log)"
  [[ $KEEP == 1 ]] || rm -rf "$dir"
done
exit "$failed"

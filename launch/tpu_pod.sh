#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: one `python -m jaxalign.train` per worker, all at once.
#
#   launch/tpu_pod.sh --name my-slice --zone us-central2-b --accelerator-type v4-32 \
#       --workdir gs://my-bucket/runs/grpo-1 [--project P] [--version tpu-ubuntu2204-base] \
#       [--python-version 3.11] [--spot] [--delete-after] [--dry-run] \
#       -- --config configs/grpo.py:qwen2p5_math_1p5b_tpu --config.model.path=/models/...
#
# Steps (each a gcloud command; --dry-run prints them all instead, one per line):
#   1. reuse the slice if `tpu-vm describe` finds it, else `tpu-vm create` it;
#   2. put this checkout on every worker as a tarball (`tpu-vm scp --worker=all`; configs/
#      comes with it) and install it there into ~/jaxalign-venv, a virtual environment of
#      Python --python-version made by uv (the TPU images' system Python is 3.10; jaxalign
#      needs 3.11+): `uv pip install -e ~/jaxalign[tpu] gcsfs` (gcsfs lets orbax and the
#      run-directory copy reach gs://). A reused slice keeps its environment;
#   3. run the training command (the environment's python) on every worker at once
#      (`tpu-vm ssh --worker=all`) with JAXALIGN_DISTRIBUTED=auto:
#      jax.distributed.initialize() detects the slice itself
#      (coordinator, process count and id). The run directory is --workdir on GCS: orbax
#      writes the checkpoints there collectively; process 0 stages the logs, plots and HF
#      export locally and copies them up after every checkpoint and at the end;
#   4. with --delete-after, delete the slice.
# No Pathways: plain multi-controller JAX, one process per TPU VM.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"  # header_help, quote, quote_all
usage() { header_help "$0"; exit "${1:-2}"; }

NAME="" ZONE="" ACCEL="" WORKDIR="" PROJECT="" VERSION="tpu-ubuntu2204-base"
PY_VERSION=3.11 SPOT=0 DELETE_AFTER=0 DRY_RUN=0
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --accelerator-type) ACCEL="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --python-version) PY_VERSION="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --delete-after) DELETE_AFTER=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown argument $1 (training flags go after --)" >&2; usage ;;
  esac
done
TRAIN_ARGS=("$@")
if [[ -z "$NAME" || -z "$ZONE" || -z "$ACCEL" || -z "$WORKDIR" ]]; then
  echo "tpu_pod.sh: --name, --zone, --accelerator-type and --workdir are required" >&2
  usage
fi
if [[ "$WORKDIR" != gs://* ]]; then
  echo "tpu_pod.sh: --workdir must be a gs:// URL (every worker must reach it), got $WORKDIR" >&2
  exit 2
fi
if [[ ${#TRAIN_ARGS[@]} -eq 0 ]]; then
  echo "tpu_pod.sh: give the training flags after --, e.g. -- --config configs/grpo.py" >&2
  exit 2
fi

# Print (dry run; shell-quoted, one command a line) or run one command.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    quote_all "$@"; echo
  else
    "$@"
  fi
}

TPU=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project="$PROJECT")
CREATE=("${TPU[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCEL" --version="$VERSION")
[[ $SPOT == 1 ]] && CREATE+=(--spot)

# 1. Reuse or create the slice (a dry run shows both: create runs only if describe fails).
if [[ $DRY_RUN == 1 ]]; then
  run "${TPU[@]}" describe "$NAME" "${WHERE[@]}"
  run "${CREATE[@]}"
elif ! "${TPU[@]}" describe "$NAME" "${WHERE[@]}" >/dev/null 2>&1; then
  run "${CREATE[@]}"
fi

# 2. This checkout on every worker, installed.
TARBALL="${TMPDIR:-/tmp}/jaxalign-$NAME.tar.gz"
run tar -czf "$TARBALL" -C "$REPO" --exclude=.git --exclude=runs --exclude=__pycache__ .
run "${TPU[@]}" scp "$TARBALL" "$NAME:jaxalign.tar.gz" "${WHERE[@]}" --worker=all
VENV_PY="~/jaxalign-venv/bin/python"
INSTALL="mkdir -p ~/jaxalign && tar -xzf ~/jaxalign.tar.gz -C ~/jaxalign"
INSTALL+=" && python3 -m pip install --user --quiet uv"
INSTALL+=" && ~/.local/bin/uv venv --allow-existing --python $(printf '%q' "$PY_VERSION") ~/jaxalign-venv"
INSTALL+=" && ~/.local/bin/uv pip install --python $VENV_PY -e ~/jaxalign[tpu] gcsfs"
run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$INSTALL"

# 3. Train on every worker at once (configs/ paths are relative to ~/jaxalign).
TRAIN="cd ~/jaxalign && JAXALIGN_DISTRIBUTED=auto $VENV_PY -m jaxalign.train"
for arg in "${TRAIN_ARGS[@]}"; do TRAIN+=" $(printf '%q' "$arg")"; done
TRAIN+=" --config.workdir=$(printf '%q' "$WORKDIR")"
run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$TRAIN"

# 4. Optionally give the slice back.
if [[ $DELETE_AFTER == 1 ]]; then
  run "${TPU[@]}" delete "$NAME" "${WHERE[@]}" --quiet
fi

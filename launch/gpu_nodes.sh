#!/usr/bin/env bash
# Train on several GPU hosts: one `python -m jaxalign.train` per host (each sees all its GPUs).
#
# Every process gets the coordinator (process 0's host:port), the process count and its id
# as JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID; jaxalign/train.py passes
# them to jax.distributed.initialize() (jax itself reads only the address). Three ways to say
# who is who:
#
#   # SLURM: one task per node; each task runs this script and reads SLURM_PROCID,
#   # SLURM_NTASKS and the first host of SLURM_JOB_NODELIST.
#   sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 --wrap \
#       "srun launch/gpu_nodes.sh --slurm -- --config configs/grpo.py:qwen2p5_math_1p5b ..."
#
#   # Plain SSH from any machine: process i runs on the i-th host, the first coordinates.
#   launch/gpu_nodes.sh --hosts gpu0,gpu1 [--remote-dir /path/to/jaxalign] -- --config ...
#
#   # Explicit, on each host yourself (or from another scheduler):
#   launch/gpu_nodes.sh --coordinator gpu0:12355 --num-processes 2 --process-id 1 -- --config ...
#
# Options: --port P (coordinator port for --slurm/--hosts, default 12355), --python PY (the
# interpreter on the hosts, default python), --dry-run (print each process's command,
# environment included, instead of running it). The workdir (--config.workdir) must be a
# directory every host sees (NFS, Lustre) or a gs:// URL: orbax writes checkpoints there
# from all processes (checked at start-up); only process 0 writes logs, plots and the HF
# export. Over ssh each host gets a terminal (-tt), so a Ctrl-C here stops them all.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"  # header_help, quote, quote_all
usage() { header_help "$0"; exit "${1:-2}"; }

MODE="" HOSTS="" COORDINATOR="" PORT=12355 NUM="" PID="" PYTHON=python DRY_RUN=0
REMOTE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --slurm) MODE=slurm; shift ;;
    --hosts) MODE=ssh; HOSTS="$2"; shift 2 ;;
    --coordinator) COORDINATOR="$2"; shift 2 ;;
    --num-processes) NUM="$2"; shift 2 ;;
    --process-id) PID="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --remote-dir) REMOTE_DIR="$2"; shift 2 ;;
    --python) PYTHON="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "gpu_nodes.sh: unknown argument $1 (training flags go after --)" >&2; usage ;;
  esac
done
TRAIN_ARGS=("$@")
if [[ ${#TRAIN_ARGS[@]} -eq 0 ]]; then
  echo "gpu_nodes.sh: give the training flags after --, e.g. -- --config configs/grpo.py" >&2
  exit 2
fi

# The command line of process $1 of $2 (coordinator $3), as one shell-quoted string.
train_command() {
  local line="JAX_COORDINATOR_ADDRESS=$(quote "$3") JAX_NUM_PROCESSES=$2 JAX_PROCESS_ID=$1"
  line+=" $(quote "$PYTHON") -m jaxalign.train $(quote_all "${TRAIN_ARGS[@]}")"
  echo "$line"
}

case "$MODE" in
  slurm)
    : "${SLURM_PROCID:?--slurm needs SLURM_PROCID: run it under srun, one task per node}"
    : "${SLURM_NTASKS:?--slurm needs SLURM_NTASKS}"
    : "${SLURM_JOB_NODELIST:?--slurm needs SLURM_JOB_NODELIST}"
    if [[ -z "$COORDINATOR" ]]; then  # (no `| head`: under pipefail its SIGPIPE fails the job)
      NODES="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"
      COORDINATOR="${NODES%%$'\n'*}:$PORT"
    fi
    CMD="$(train_command "$SLURM_PROCID" "$SLURM_NTASKS" "$COORDINATOR")"
    if [[ $DRY_RUN == 1 ]]; then echo "$CMD"; else cd "$REMOTE_DIR" && eval "exec env $CMD"; fi
    ;;
  ssh)
    IFS=, read -r -a HOST_LIST <<<"$HOSTS"
    N=${#HOST_LIST[@]}
    [[ -z "$COORDINATOR" ]] && COORDINATOR="${HOST_LIST[0]}:$PORT"
    PIDS=()
    for i in "${!HOST_LIST[@]}"; do
      REMOTE="cd $(quote "$REMOTE_DIR") && $(train_command "$i" "$N" "$COORDINATOR")"
      # -tt: a terminal on the host, so a Ctrl-C here (ssh exits, the terminal hangs up)
      # stops the remote training too instead of leaving it holding the GPUs.
      if [[ $DRY_RUN == 1 ]]; then
        echo "ssh -tt $(quote "${HOST_LIST[$i]}") $(quote "$REMOTE")"
      else
        ssh -tt "${HOST_LIST[$i]}" "$REMOTE" 2>&1 | sed "s/\r\$//; s/^/[${HOST_LIST[$i]}] /" &
        PIDS+=($!)
      fi
    done
    STATUS=0
    for p in "${PIDS[@]}"; do wait "$p" || STATUS=1; done
    exit $STATUS
    ;;
  *)
    if [[ -z "$COORDINATOR" || -z "$NUM" || -z "$PID" ]]; then
      echo "gpu_nodes.sh: use --slurm, --hosts, or all of --coordinator, --num-processes and" \
        "--process-id" >&2
      usage
    fi
    CMD="$(train_command "$PID" "$NUM" "$COORDINATOR")"
    if [[ $DRY_RUN == 1 ]]; then echo "$CMD"; else cd "$REMOTE_DIR" && eval "exec env $CMD"; fi
    ;;
esac

#!/usr/bin/env bash
# Start rollout sidecars, wait until they answer GET /health, print their URLs.
#
#   launch/sidecar.sh --backend vllm|jax --model DIR [--gpus 0,1,2,3] [--hosts h1,h2]
#       [--port 8000] [--bind ADDR] [--log-dir DIR] [--timeout 900] [--python PY]
#       [--vllm-env DIR [--vllm-version V]] [--remote-dir DIR] [--dry-run]
#       [-- extra server flags, e.g. --max-batch 256]
#
# One `python -m jaxalign.rollout.server --backend B --model DIR --host ADDR --port P` per
# entry of --gpus (CUDA_VISIBLE_DEVICES=entry; "0+1" gives one sidecar two GPUs, for
# `-- --tensor-parallel-size 2`; "none" leaves CUDA_VISIBLE_DEVICES alone, e.g. a CPU jax
# sidecar), on this machine or, with --hosts, on every listed host over ssh. Ports count up
# from --port; --port 0 (this machine only) lets each server pick a free port and reads it
# from the line it prints. Sidecars keep running after this script exits: their pids are in
# LOG_DIR/sidecars.pids (this machine; stop them with `kill $(cat LOG_DIR/sidecars.pids)`),
# their output in LOG_DIR/sidecar-<k>.log.
#
# The last line of stdout is the comma-separated URL list, the value for the trainer:
#   URLS=$(launch/sidecar.sh --backend vllm --model /models/m --gpus 0,1 | tail -n 1)
#   python -m jaxalign.train --config configs/grpo.py --config.engine.backend=sidecar \
#       --config.engine.urls="$URLS"
# A bearer token, if any, comes from JAXALIGN_SIDECAR_TOKEN (servers and health checks read
# it; with --hosts it is forwarded on the ssh command line). --dry-run prints the commands.
# vLLM lives in an environment of its own, never the trainer's: --vllm-env DIR creates it
# (or reuses it) with launch/vllm_env.sh (vllm==V, default its DEFAULT_VLLM), here or on
# every --hosts host, and runs the servers with DIR/bin/python. A sidecar whose in-place
# reload failed exits with status 3; restart it with the same command (or let the trainer's
# SidecarEngine(restart_command=...) do it).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"  # header_help, quote, quote_all
usage() { header_help "$0"; exit "${1:-2}"; }

BACKEND="" MODEL="" GPUS=0 HOSTS="" PORT=8000 BIND="" LOG_DIR="" TIMEOUT=900 PYTHON=python
DRY_RUN=0 REMOTE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" VLLM_ENV="" VLLM_VERSION=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --backend) BACKEND="$2"; shift 2 ;;
    --model) MODEL="$2"; shift 2 ;;
    --gpus) GPUS="$2"; shift 2 ;;
    --hosts) HOSTS="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --bind) BIND="$2"; shift 2 ;;
    --log-dir) LOG_DIR="$2"; shift 2 ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    --python) PYTHON="$2"; shift 2 ;;
    --vllm-env) VLLM_ENV="$2"; shift 2 ;;
    --vllm-version) VLLM_VERSION="$2"; shift 2 ;;
    --remote-dir) REMOTE_DIR="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "sidecar.sh: unknown argument $1 (server flags go after --)" >&2; usage ;;
  esac
done
EXTRA=("$@")
if [[ "$BACKEND" != vllm && "$BACKEND" != jax ]]; then
  echo "sidecar.sh: --backend must be vllm or jax" >&2; usage
fi
[[ -z "$MODEL" ]] && { echo "sidecar.sh: --model DIR is required" >&2; usage; }
if [[ -n "$VLLM_ENV" && "$BACKEND" != vllm ]]; then
  echo "sidecar.sh: --vllm-env is for --backend vllm" >&2; exit 2
fi
if [[ -n "$HOSTS" && "$PORT" == 0 ]]; then
  echo "sidecar.sh: --port 0 works on this machine only; give --hosts a fixed --port" >&2
  exit 2
fi
# Loopback for local sidecars; all interfaces for remote ones (the trainer must reach them).
[[ -z "$BIND" ]] && { if [[ -n "$HOSTS" ]]; then BIND=0.0.0.0; else BIND=127.0.0.1; fi; }
LOG_DIR="${LOG_DIR:-${TMPDIR:-/tmp}/jaxalign-sidecars}"

# The server command for GPU entry $1 on port $2, as one shell-quoted string.
server_command() {
  local line=""
  [[ "$1" != none ]] && line+="env CUDA_VISIBLE_DEVICES=${1//+/,} "
  line+="$(quote "$PYTHON") -m jaxalign.rollout.server --backend $BACKEND --model $(quote "$MODEL")"
  line+=" --host $(quote "$BIND") --port $2"
  [[ ${#EXTRA[@]} -gt 0 ]] && line+=" $(quote_all "${EXTRA[@]}")"
  echo "$line"
}
healthy() {  # GET $1/health answers 200
  "$PYTHON" -c '
import os, sys, urllib.request
req = urllib.request.Request(sys.argv[1] + "/health")
token = os.environ.get("JAXALIGN_SIDECAR_TOKEN")
if token:
    req.add_header("Authorization", "Bearer " + token)
try:
    urllib.request.urlopen(req, timeout=5).read()
except Exception:
    sys.exit(1)' "$1"
}

IFS=, read -r -a GPU_LIST <<<"$GPUS"
IFS=, read -r -a HOST_LIST <<<"${HOSTS:-localhost}"
if [[ -n "$VLLM_ENV" ]]; then  # vLLM's own environment: create or reuse, then use it
  env_cmd="launch/vllm_env.sh --env $(quote "$VLLM_ENV")"
  [[ -n "$VLLM_VERSION" ]] && env_cmd+=" --vllm $(quote "$VLLM_VERSION")"
  for host in "${HOST_LIST[@]}"; do
    if [[ -n "$HOSTS" ]]; then
      line="cd $(quote "$REMOTE_DIR") && $env_cmd >&2"
      if [[ $DRY_RUN == 1 ]]; then echo "ssh $(quote "$host") $(quote "$line")"
      else ssh "$host" "$line" || { echo "sidecar.sh: no vLLM environment on $host" >&2; exit 1; }
      fi
    elif [[ $DRY_RUN == 1 ]]; then
      echo "cd $(quote "$REMOTE_DIR") && $env_cmd"
    else
      (cd "$REMOTE_DIR" && eval "$env_cmd" >&2) \
        || { echo "sidecar.sh: no vLLM environment" >&2; exit 1; }
    fi
  done
  PYTHON="$VLLM_ENV/bin/python"
fi
URLS=() LOGS=() PIDS=()
[[ $DRY_RUN == 0 ]] && mkdir -p "$LOG_DIR" && : >"$LOG_DIR/sidecars.pids"
k=0
for host in "${HOST_LIST[@]}"; do
  for gpu in "${GPU_LIST[@]}"; do
    port=$PORT
    [[ "$PORT" != 0 ]] && port=$((PORT + k))
    log="$LOG_DIR/sidecar-$k.log"
    cmd="$(server_command "$gpu" "$port")"
    if [[ -n "$HOSTS" ]]; then
      token=""
      [[ -n "${JAXALIGN_SIDECAR_TOKEN:-}" ]] && token="JAXALIGN_SIDECAR_TOKEN=$(quote "$JAXALIGN_SIDECAR_TOKEN") "
      start="cd $(quote "$REMOTE_DIR") && mkdir -p $(quote "$LOG_DIR") && nohup $cmd"
      start+=" >$(quote "$log") 2>&1 </dev/null &"
      remote="$token$start"
      if [[ $DRY_RUN == 1 ]]; then
        echo "ssh $(quote "$host") $(quote "$start")"  # (the token, if any, not shown)
      else
        ssh "$host" "$remote"
      fi
      URLS+=("http://$host:$port")
    else
      if [[ $DRY_RUN == 1 ]]; then
        echo "cd $(quote "$REMOTE_DIR") && $cmd >$(quote "$log") 2>&1 &"
      else
        (cd "$REMOTE_DIR" && eval "exec $cmd" >"$log" 2>&1 </dev/null) &
        PIDS+=($!)
        echo $! >>"$LOG_DIR/sidecars.pids"
      fi
      if [[ "$PORT" == 0 ]]; then
        URLS+=("")
      else
        local_host="$BIND"
        [[ "$BIND" == 0.0.0.0 ]] && local_host="$(hostname)"
        URLS+=("http://$local_host:$port")
      fi
    fi
    LOGS+=("$log")
    k=$((k + 1))
  done
done

if [[ $DRY_RUN == 1 ]]; then
  for i in "${!URLS[@]}"; do
    [[ -z "${URLS[$i]}" ]] && URLS[$i]="http://$BIND:<port printed in ${LOGS[$i]}>"
    echo "wait for GET ${URLS[$i]}/health"
  done
  (IFS=,; echo "${URLS[*]}")
  exit 0
fi

fail() {  # stop what we started here, show the logs, exit 1
  echo "sidecar.sh: $1" >&2
  for log in "${LOGS[@]}"; do [[ -f "$log" ]] && { echo "--- $log:" >&2; tail -n 20 "$log" >&2; }; done
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do kill "$p" 2>/dev/null || true; done
  exit 1
}
deadline=$((SECONDS + TIMEOUT))
for i in "${!URLS[@]}"; do
  while [[ -z "${URLS[$i]}" ]]; do  # --port 0: the URL is in the server's first line
    line="$(grep -m 1 '^jaxalign-sidecar listening on ' "${LOGS[$i]}" 2>/dev/null || true)"
    [[ -n "$line" ]] && URLS[$i]="${line#jaxalign-sidecar listening on }"
    kill -0 "${PIDS[$i]}" 2>/dev/null || [[ -n "${URLS[$i]}" ]] || fail "sidecar $i exited"
    ((SECONDS < deadline)) || fail "sidecar $i printed no URL within ${TIMEOUT}s"
    sleep 0.2
  done
  until healthy "${URLS[$i]}"; do
    if [[ -z "$HOSTS" ]] && ! kill -0 "${PIDS[$i]}" 2>/dev/null; then fail "sidecar $i exited"; fi
    ((SECONDS < deadline)) || fail "${URLS[$i]} not healthy within ${TIMEOUT}s"
    sleep 0.5
  done
  echo "sidecar.sh: ${URLS[$i]} is up (log ${LOGS[$i]})" >&2
done
(IFS=,; echo "${URLS[*]}")

#!/usr/bin/env bash
# One multi-GPU host (local, or over ssh with HOST=user@machine): install, train, logs, stop.
#
#   CONFIG=configs/qwen25vl_3b.py MODEL=/data/Qwen2.5-VL-3B-Instruct DATA=/data/ViRL39K \
#   WORKDIR=/data/runs/papo_3b launch/gpu.sh train
#
# Commands: install | train | logs | stop. JAX drives every local GPU from one process
# (mesh data=-1 by default); attention uses cuDNN (`model.attention=auto`).
# DRY_RUN=1 prints every command without running it.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CMD="${1:-help}"
CONFIG="${CONFIG:-configs/qwen25vl_3b.py}"
WORKDIR="${WORKDIR:-runs/papo}"
LOG="${LOG:-${WORKDIR}/train.log}"
EXTRA_FLAGS="${EXTRA_FLAGS:-}"
ROOT="${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"

on_host() {
  if [[ -n "${HOST:-}" ]]; then
    run ssh "${HOST}" "$1"
  else
    run bash -c "$1"
  fi
}

case "${CMD}" in
  install)
    on_host "cd ${ROOT} && pip install -q -U pip && pip install -q -e '.[gpu,gcs]'"
    ;;
  train)
    need MODEL "checkpoint directory or gs:// URL"; need DATA "dataset path or gs:// URL"
    # WANDB_API_KEY / HF_TOKEN reach the trainer over ssh too (masked when printed).
    on_host "cd ${ROOT} && mkdir -p ${WORKDIR} && $(forwarded_env)XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.92} nohup python -m papo_jax.train --config=${CONFIG} --workdir=${WORKDIR} --config.model.path=${MODEL} --config.data.path=${DATA} ${EXTRA_FLAGS} > ${LOG} 2>&1 &"
    ;;
  logs)
    on_host "tail -n ${LINES:-40} ${LOG}"
    ;;
  stop)
    on_host "pkill -f '[p]apo_jax.train' || true"    # SIGTERM: the trainer checkpoints and exits
    ;;
  *)
    sed -n '2,10p' "$0"
    [[ "${CMD}" == "help" ]] || { echo "unknown command: ${CMD}" >&2; exit 2; }
    ;;
esac

#!/usr/bin/env bash
# Cloud TPU VM / pod slice: create, install, stage, train on all workers, logs, stop, delete.
#
#   NAME=papo-v5e ZONE=us-west4-a ACCELERATOR=v5litepod-16 VERSION=v2-alpha-tpuv5-lite \
#   CONFIG=configs/qwen25vl_3b.py MODEL=gs://my-bucket/Qwen2.5-VL-3B-Instruct \
#   DATA=gs://my-bucket/ViRL39K WORKDIR=/tmp/papo_run CKPT=gs://my-bucket/runs/papo_3b \
#   launch/tpu.sh up          # create + install + stage + train
#
# Commands: create | install | stage | train | logs | fetch-logs | status | stop | delete | up
# DRY_RUN=1 prints every command without running it.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CMD="${1:-help}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR="${ACCELERATOR:-v4-8}"
VERSION="${VERSION:-tpu-ubuntu2204-base}"
REPO="${REPO:-}"                           # git URL to clone on the workers; empty: ship this checkout
BRANCH="${BRANCH:-main}"
CONFIG="${CONFIG:-configs/qwen25vl_3b.py}"
WORKDIR="${WORKDIR:-/tmp/papo_run}"
REMOTE_DIR="${REMOTE_DIR:-papo_jax}"      # checkout on every worker, relative to $HOME
LOG="${LOG:-papo_train.log}"               # per-worker log file, relative to $HOME
EXTRA_FLAGS="${EXTRA_FLAGS:-}"             # e.g. "--config.train.steps=100"

project_args=()
[[ -n "${PROJECT:-}" ]] && project_args=(--project "${PROJECT}")

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "${NAME}" --zone "${ZONE}" "${project_args[@]}" --worker=all --command "$1"
}

# Where the workers read the model and data: gs:// URLs go straight to the trainer (it copies
# them to a local cache); a local directory is copied to every worker by `stage`.
model_on_workers() { if is_remote "${MODEL}"; then echo "${MODEL}"; else echo "\$HOME/papo_stage/model"; fi; }
data_on_workers() { if is_remote "${DATA}"; then echo "${DATA}"; else echo "\$HOME/papo_stage/data"; fi; }

case "${CMD}" in
  create)
    need NAME "TPU VM name"
    spot=()
    [[ "${SPOT:-0}" == "1" ]] && spot=(--spot)
    run gcloud compute tpus tpu-vm create "${NAME}" --zone "${ZONE}" "${project_args[@]}" \
      --accelerator-type "${ACCELERATOR}" --version "${VERSION}" "${spot[@]}"
    ;;
  install)
    need NAME "TPU VM name"
    if [[ -n "${REPO}" ]]; then
      fetch="if [ -d ${REMOTE_DIR}/.git ]; then git -C ${REMOTE_DIR} fetch -q && git -C ${REMOTE_DIR} checkout -q ${BRANCH} && git -C ${REMOTE_DIR} pull -q; else git clone -q -b ${BRANCH} ${REPO} ${REMOTE_DIR}; fi"
    else
      # This checkout's committed tree, copied to every worker.
      tarball="${TMPDIR:-/tmp}/papo_jax_src.tar.gz"
      run git -C "$(dirname "${BASH_SOURCE[0]}")/.." archive --format=tar.gz -o "${tarball}" HEAD
      run gcloud compute tpus tpu-vm scp "${tarball}" "${NAME}:papo_jax_src.tar.gz" --zone "${ZONE}" "${project_args[@]}" --worker=all
      fetch="mkdir -p ${REMOTE_DIR} && tar -xzf papo_jax_src.tar.gz -C ${REMOTE_DIR}"
    fi
    ssh_all "set -e; ${fetch}; cd ${REMOTE_DIR} && pip install -q -U pip && pip install -q -e '.[tpu,gcs]'"
    ;;
  stage)
    need NAME "TPU VM name"; need MODEL "checkpoint directory or gs:// URL"; need DATA "dataset path or gs:// URL"
    ssh_all "mkdir -p papo_stage"
    for what in MODEL DATA; do
      src="${!what}"
      if is_remote "${src}"; then
        echo "# ${what} ${src}: read by the trainer directly"
      else
        dest="papo_stage/$(echo "${what}" | tr 'A-Z' 'a-z')"
        run gcloud compute tpus tpu-vm scp --recurse "${src}" "${NAME}:${dest}" --zone "${ZONE}" "${project_args[@]}" --worker=all
      fi
    done
    ;;
  train)
    need NAME "TPU VM name"; need MODEL "checkpoint directory or gs:// URL"; need DATA "dataset path or gs:// URL"
    ckpt_flag=""
    [[ -n "${CKPT:-}" ]] && ckpt_flag="--config.checkpoint.dir=${CKPT}"
    # Every worker starts the same command at once; jax.distributed finds its peers (PAPO_DISTRIBUTED).
    ssh_all "cd ${REMOTE_DIR} && PAPO_DISTRIBUTED=1 nohup python -m papo_jax.train --config=${CONFIG} --workdir=${WORKDIR} --config.model.path=$(model_on_workers) --config.data.path=$(data_on_workers) ${ckpt_flag} ${EXTRA_FLAGS} > \$HOME/${LOG} 2>&1 &"
    ;;
  logs)
    need NAME "TPU VM name"
    ssh_all "tail -n ${LINES:-40} \$HOME/${LOG}"
    ;;
  fetch-logs)
    need NAME "TPU VM name"
    run mkdir -p "${LOGS_DIR:-logs}/${NAME}"
    for ((w = 0; w < ${NUM_WORKERS:-1}; w++)); do
      run gcloud compute tpus tpu-vm scp "${NAME}:${LOG}" "${LOGS_DIR:-logs}/${NAME}/worker${w}.log" \
        --zone "${ZONE}" "${project_args[@]}" --worker="${w}"
    done
    ;;
  status)
    need NAME "TPU VM name"
    run gcloud compute tpus tpu-vm describe "${NAME}" --zone "${ZONE}" "${project_args[@]}" --format "value(state,acceleratorType)"
    ;;
  stop)
    need NAME "TPU VM name"
    ssh_all "pkill -f papo_jax.train || true"
    ;;
  delete)
    need NAME "TPU VM name"
    run gcloud compute tpus tpu-vm delete "${NAME}" --zone "${ZONE}" "${project_args[@]}" --quiet
    ;;
  up)
    "$0" create && "$0" install && "$0" stage && "$0" train
    ;;
  *)
    sed -n '2,12p' "$0"
    [[ "${CMD}" == "help" ]] || { echo "unknown command: ${CMD}" >&2; exit 2; }
    ;;
esac

#!/usr/bin/env bash
# Cloud TPU VM / pod slice: create (directly or through a queued resource), install, stage,
# train on all workers, supervise (recreate after a preemption), logs, stop, delete.
#
#   NAME=papo-v5e ZONE=us-west4-a ACCELERATOR=v5litepod-16 VERSION=v2-alpha-tpuv5-lite \
#   CONFIG=configs/qwen25vl_3b.py MODEL=hf://Qwen/Qwen2.5-VL-3B-Instruct \
#   DATA=gs://my-bucket/ViRL39K WORKDIR=gs://my-bucket/runs/papo_3b QUEUED=1 SPOT=1 \
#   launch/tpu.sh up          # create + install + stage + train
#
# Commands: create | qr-create | qr-wait | qr-list | qr-delete | install | stage | train |
#           supervise | up | logs | fetch-logs | status | workers | stop | delete
# DRY_RUN=1 prints every command without running it. See launch/README.md.
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
QUEUED="${QUEUED:-0}"                      # 1: create through a queued resource (QR)
QR="${QR:-${NAME:-}-qr}"                   # queued-resource id
DONE_MARKER="${DONE_MARKER:-${WORKDIR}/DONE}"   # written by the trainer when the run is complete
POLL_S="${POLL_S:-120}"                    # supervise / qr-wait polling interval
MAX_RESTARTS="${MAX_RESTARTS:-20}"         # supervise gives up after this many recoveries

project_args=()
[[ -n "${PROJECT:-}" ]] && project_args=(--project "${PROJECT}")

self() { bash "${BASH_SOURCE[0]}" "$@"; }

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "${NAME}" --zone "${ZONE}" "${project_args[@]}" --worker=all --command "$1"
}

# Hosts (TPU VMs) of a slice, from the accelerator type (Cloud TPU docs, "supported configurations"):
# v5e/v6e count chips and put 4 on a VM of a multi-host slice, with up to 8 on one VM;
# v2/v3/v4/v5p count TensorCores, 8 to a VM (v4/v5p: 4 chips of 2 cores).
workers_for() {
  local acc="$1" n
  n="${acc##*-}"
  [[ "${n}" =~ ^[0-9]+$ ]] || { echo "error: cannot read the size of ACCELERATOR=${acc}; set NUM_WORKERS" >&2; return 2; }
  case "${acc}" in
    v5litepod-*|v5e-*|v6e-*) if ((n <= 8)); then echo 1; else echo $((n / 4)); fi ;;
    v2-*|v3-*|v4-*|v5p-*) if ((n <= 8)); then echo 1; else echo $((n / 8)); fi ;;
    *) echo "error: unknown accelerator family in ACCELERATOR=${acc}; set NUM_WORKERS" >&2; return 2 ;;
  esac
}
NUM_WORKERS="${NUM_WORKERS:-$(workers_for "${ACCELERATOR}" 2>/dev/null || echo "")}"
need_workers() { [[ -n "${NUM_WORKERS}" ]] || { workers_for "${ACCELERATOR}" > /dev/null; exit 2; }; }
TRAINER="[p]apo_jax.train"    # a pattern pgrep/pkill -f cannot match in their own shell's command line

# Where the workers read the model and data: URLs (gs://, hf://) go straight to the trainer (it
# copies or downloads them once per host); a local directory is copied to every worker by `stage`.
model_on_workers() { if is_remote "${MODEL}"; then echo "${MODEL}"; else echo "\$HOME/papo_stage/model"; fi; }
data_on_workers() { if is_remote "${DATA}"; then echo "${DATA}"; else echo "\$HOME/papo_stage/data"; fi; }

vm_state() {        # READY, CREATING, PREEMPTED, ... or "" when there is no such VM
  query "$1" gcloud compute tpus tpu-vm describe "${NAME}" --zone "${ZONE}" "${project_args[@]}" --format "value(state)"
}
qr_state() {        # ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, FAILED, ... or "" when absent
  query "$1" gcloud compute tpus queued-resources describe "${QR}" --zone "${ZONE}" "${project_args[@]}" \
    --format "value(state.state)"
}

# ok | wait | lost (preempted, suspended, failed, deleted) for a VM or queued-resource state.
classify() {
  case "$1" in
    READY|ACTIVE) echo ok ;;
    CREATING|STARTING|RESTARTING|REPAIRING|ACCEPTED|WAITING_FOR_RESOURCES|PROVISIONING|CREATING_RESOURCES) echo wait ;;
    *) echo lost ;;    # "", PREEMPTED, TERMINATED, STOPPED, SUSPENDING, SUSPENDED, FAILED, DELETING, ...
  esac
}

slice_state() {     # the state that decides a recovery: the queued resource's, or the VM's
  if [[ "${QUEUED}" == "1" ]]; then qr_state "$1"; else vm_state "$1"; fi
}

run_finished() {
  if is_remote "${DONE_MARKER}"; then
    probe gcloud storage ls "${DONE_MARKER}"
  else
    probe gcloud compute tpus tpu-vm ssh "${NAME}" --zone "${ZONE}" "${project_args[@]}" --worker=0 \
      --command "test -e ${DONE_MARKER}"
  fi
}

case "${CMD}" in
  workers)
    need_workers
    echo "${NUM_WORKERS}"
    ;;
  create)
    need NAME "TPU VM name"
    if [[ "${QUEUED}" == "1" ]]; then
      self qr-create && self qr-wait
      exit $?
    fi
    vm_state state
    if [[ -n "${state}" ]]; then
      if [[ "$(classify "${state}")" == lost ]]; then
        echo "error: TPU VM ${NAME} exists in state ${state}; run 'delete' first (or 'supervise', which recreates it)" >&2
        exit 1
      fi
      echo "# TPU VM ${NAME} exists (${state}): reusing it"
      exit 0
    fi
    spot=()
    [[ "${SPOT:-0}" == "1" ]] && spot=(--spot)
    run gcloud compute tpus tpu-vm create "${NAME}" --zone "${ZONE}" "${project_args[@]}" \
      --accelerator-type "${ACCELERATOR}" --version "${VERSION}" "${spot[@]}"
    ;;
  qr-create)
    need NAME "TPU VM name"
    qr_state state
    while [[ "${state}" == DELETING ]]; do       # a queued resource being deleted (e.g. by supervise)
      sleep 10
      qr_state state
    done
    if [[ -n "${state}" ]]; then
      if [[ "$(classify "${state}")" == lost ]]; then
        echo "error: queued resource ${QR} exists in state ${state}; run 'qr-delete' first (or 'supervise')" >&2
        exit 1
      fi
      echo "# queued resource ${QR} exists (${state}): reusing it"
      exit 0
    fi
    kind=()
    [[ "${SPOT:-0}" == "1" ]] && kind=(--spot)
    [[ "${RESERVED:-0}" == "1" ]] && kind=(--reserved)
    until=()
    [[ -n "${VALID_UNTIL:-}" ]] && until=(--valid-until-duration "${VALID_UNTIL}")   # e.g. 6h: stop queueing then
    run gcloud compute tpus queued-resources create "${QR}" --node-id "${NAME}" --zone "${ZONE}" \
      "${project_args[@]}" --accelerator-type "${ACCELERATOR}" --runtime-version "${VERSION}" "${kind[@]}" "${until[@]}"
    ;;
  qr-wait)
    need NAME "TPU VM name"
    while true; do
      qr_state state
      [[ "${DRY_RUN}" == "1" ]] && exit 0
      case "$(classify "${state}")" in
        ok) echo "# queued resource ${QR} is ACTIVE"; exit 0 ;;
        wait) echo "# queued resource ${QR}: ${state}; next look in ${POLL_S}s" ;;
        lost) echo "error: queued resource ${QR} is ${state:-absent}" >&2; exit 1 ;;
      esac
      sleep "${POLL_S}"
    done
    ;;
  qr-list)
    run gcloud compute tpus queued-resources list --zone "${ZONE}" "${project_args[@]}"
    ;;
  qr-delete)
    need NAME "TPU VM name"
    # --force also deletes the TPU VM the queued resource created.
    run gcloud compute tpus queued-resources delete "${QR}" --zone "${ZONE}" "${project_args[@]}" --force --quiet
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
    need NAME "TPU VM name"; need MODEL "checkpoint directory, gs:// or hf://ORG/NAME"; need DATA "dataset path or gs:// URL"
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
    need NAME "TPU VM name"; need MODEL "checkpoint directory, gs:// or hf://ORG/NAME"; need DATA "dataset path or gs:// URL"
    ckpt_flag=""
    [[ -n "${CKPT:-}" ]] && ckpt_flag="--config.checkpoint.dir=${CKPT}"
    # Every worker starts the same command at once; jax.distributed finds its peers (PAPO_DISTRIBUTED).
    # Tokens ride in the command's environment (masked when printed), never in a file.
    ssh_all "cd ${REMOTE_DIR} && $(forwarded_env)PAPO_DISTRIBUTED=1 nohup python -m papo_jax.train --config=${CONFIG} --workdir=${WORKDIR} --config.model.path=$(model_on_workers) --config.data.path=$(data_on_workers) ${ckpt_flag} ${EXTRA_FLAGS} > \$HOME/${LOG} 2>&1 &"
    ;;
  supervise)
    # Until the run is finished (DONE_MARKER exists): a slice that is preempted, suspended, failed
    # or gone is deleted, recreated, reinstalled, restaged and restarted (training resumes from its
    # last checkpoint); a healthy slice with no trainer running gets the trainer restarted.
    need NAME "TPU VM name"; need MODEL "checkpoint directory, gs:// or hf://ORG/NAME"; need DATA "dataset path or gs:// URL"
    is_remote "${DONE_MARKER}" || echo "# note: DONE_MARKER ${DONE_MARKER} is on the workers' disks; put WORKDIR on gs:// so the run's records outlive a preempted slice"
    restarts=0
    while true; do
      if run_finished; then
        echo "# run finished (${DONE_MARKER} exists); supervision ends"
        exit 0
      fi
      slice_state state
      what="$(classify "${state}")"
      if [[ "${what}" == ok ]]; then
        if probe gcloud compute tpus tpu-vm ssh "${NAME}" --zone "${ZONE}" "${project_args[@]}" --worker=all \
            --command "pgrep -f '${TRAINER}'"; then
          [[ "${DRY_RUN}" == "1" ]] || { sleep "${POLL_S}"; continue; }
        fi
        echo "# ${NAME} is up but not training on every worker: restarting the trainer"
      elif [[ "${what}" == wait ]]; then
        echo "# ${NAME}: ${state}; next look in ${POLL_S}s"
        [[ "${DRY_RUN}" == "1" ]] || { sleep "${POLL_S}"; continue; }
      else
        echo "# ${NAME} is ${state:-gone}: recreating it"
      fi
      restarts=$((restarts + 1))
      if ((restarts > MAX_RESTARTS)); then
        echo "error: ${MAX_RESTARTS} recoveries already; giving up (set MAX_RESTARTS to allow more)" >&2
        exit 1
      fi
      if [[ "${what}" != ok ]]; then
        if [[ "${QUEUED}" == "1" ]]; then self qr-delete || true; else self delete || true; fi
        self create && self install && self stage && self train
      else
        ssh_all "pkill -f '${TRAINER}' || true"             # a half-dead run: every worker starts again
        self train
      fi
      [[ "${DRY_RUN}" == "1" ]] && exit 0                  # a dry run prints one recovery
      sleep "${POLL_S}"
    done
    ;;
  logs)
    need NAME "TPU VM name"
    ssh_all "tail -n ${LINES:-40} \$HOME/${LOG}"
    ;;
  fetch-logs)
    need NAME "TPU VM name"
    need_workers
    run mkdir -p "${LOGS_DIR:-logs}/${NAME}"
    for ((w = 0; w < NUM_WORKERS; w++)); do
      run gcloud compute tpus tpu-vm scp "${NAME}:${LOG}" "${LOGS_DIR:-logs}/${NAME}/worker${w}.log" \
        --zone "${ZONE}" "${project_args[@]}" --worker="${w}"
    done
    ;;
  status)
    need NAME "TPU VM name"
    [[ "${QUEUED}" == "1" ]] && run gcloud compute tpus queued-resources describe "${QR}" --zone "${ZONE}" \
      "${project_args[@]}" --format "value(state.state)"
    run gcloud compute tpus tpu-vm describe "${NAME}" --zone "${ZONE}" "${project_args[@]}" --format "value(state,acceleratorType)"
    ;;
  stop)
    need NAME "TPU VM name"
    # SIGTERM: the trainer finishes its step, writes a checkpoint and exits.
    ssh_all "pkill -f '${TRAINER}' || true"
    ;;
  delete)
    need NAME "TPU VM name"
    if [[ "${QUEUED}" == "1" ]]; then
      self qr-delete
    else
      run gcloud compute tpus tpu-vm delete "${NAME}" --zone "${ZONE}" "${project_args[@]}" --quiet
    fi
    ;;
  up)
    self create && self install && self stage && self train
    ;;
  *)
    sed -n '2,12p' "$0"
    [[ "${CMD}" == "help" ]] || { echo "unknown command: ${CMD}" >&2; exit 2; }
    ;;
esac

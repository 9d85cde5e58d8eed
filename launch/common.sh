# Shared by the launch scripts: print every command before running it; DRY_RUN=1 only prints.
set -euo pipefail

DRY_RUN="${DRY_RUN:-0}"
# Tokens forwarded to the workers; their values never appear in a printed command.
SECRET_VARS="WANDB_API_KEY HF_TOKEN"
MASK="****"

show() {
  # The command as a line that can be pasted into a shell (quoted), with every token masked.
  local out="+" a v val
  for a in "$@"; do
    for v in ${SECRET_VARS}; do
      val="${!v:-}"
      [[ -n "${val}" ]] && a="${a//"${val}"/${MASK}}"
    done
    out+=" $(printf '%q' "${a}")"
  done
  printf '%s\n' "${out}"
}

run() {
  show "$@"
  if [[ "${DRY_RUN}" != "1" ]]; then
    "$@"
  fi
}

query() {
  # query VAR cmd...: prints the command, runs it and stores its stdout in VAR; a failing
  # command (e.g. describe of something absent) stores "". DRY_RUN=1: prints, stores "".
  local __var="$1"
  shift
  show "$@"
  local __out=""
  if [[ "${DRY_RUN}" != "1" ]]; then
    __out="$("$@" 2>/dev/null)" || __out=""
  fi
  printf -v "${__var}" '%s' "${__out}"
}

probe() {
  # probe cmd...: prints the command, runs it with its output discarded, returns its status.
  # DRY_RUN=1: prints and returns 1 (false).
  show "$@"
  [[ "${DRY_RUN}" == "1" ]] && return 1
  "$@" >/dev/null 2>&1
}

need() {
  # need VAR "what it is": stop with a message naming the variable when it is unset.
  local name="$1" what="$2"
  if [[ -z "${!name:-}" ]]; then
    echo "error: set ${name} (${what})" >&2
    exit 2
  fi
}

is_remote() { [[ "$1" == *://* ]]; }

forwarded_env() {
  # "VAR='value' ..." for each token set here, to prefix a remote command: it reaches the
  # process's environment on the worker and is never written to a file.
  local v val out=""
  for v in ${SECRET_VARS}; do
    val="${!v:-}"
    [[ -z "${val}" ]] && continue
    if [[ "${val}" == *"'"* ]]; then
      echo "error: ${v} contains a single quote" >&2
      exit 2
    fi
    out+="${v}='${val}' "
  done
  printf '%s' "${out}"
}

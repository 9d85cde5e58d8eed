# Shared by the launch scripts: print every command before running it; DRY_RUN=1 only prints.
set -euo pipefail

DRY_RUN="${DRY_RUN:-0}"

run() {
  # Quoted so the printed line can be pasted into a shell as is.
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [[ "${DRY_RUN}" != "1" ]]; then
    "$@"
  fi
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

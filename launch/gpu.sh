#!/usr/bin/env bash
# Run a meg_jax command on one multi-GPU machine (this one, or another over ssh).
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/gpu.sh [options] -- COMMAND [ARGS...]

Installs this checkout with jax[cuda12] in a virtual environment and runs COMMAND with every
GPU of the machine visible to one process: JAX lists them all as devices, and the
("data", "model") mesh of the config spreads over them (no jax.distributed needed on one
machine). GPU memory preallocation is raised to 95% (JAX's default is 75%), the fraction the
memory plan (python -m meg_jax.plan) assumes is usable.

With --host, the committed files of this checkout (git archive HEAD) are copied to HOST over
ssh and this script runs there.

options:
  --host USER@HOST      run on that machine over ssh (default: here)
  --dir DIR             where the project lives on HOST (default: meg_jax, in the home folder)
  --venv PATH           virtual environment (default: .venv-gpu in the project)
  --skip-install        use the environment as it is
  --mem-fraction F      XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.95)
  --dry-run             print what would run instead of running it
  -h, --help            this help

example:
  launch/gpu.sh -- python -m meg_jax.train --config configs/phi2_zsre.py:n=10000
  launch/gpu.sh --host me@gpu-box -- python -m meg_jax.plan --model=llama3_8b --platform=native
USAGE
}

die() { echo "gpu.sh: error: $*" >&2; exit 2; }

HOST="" DIR="meg_jax" VENV="" INSTALL=1 FRACTION="0.95" DRY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --host) HOST="${2:?--host needs a value}"; shift 2 ;;
    --dir) DIR="${2:?--dir needs a value}"; shift 2 ;;
    --venv) VENV="${2:?--venv needs a value}"; shift 2 ;;
    --mem-fraction) FRACTION="${2:?--mem-fraction needs a value}"; shift 2 ;;
    --skip-install) INSTALL=0; shift ;;
    --dry-run) DRY=1; shift ;;
    --) shift; break ;;
    *) usage >&2; die "unknown option '$1' (the command goes after --)" ;;
  esac
done
[[ $# -gt 0 ]] || { usage >&2; die "no command given after --"; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

run() {
  if [[ $DRY -eq 1 ]]; then
    printf '%q ' "$@"; printf '\n'
  else
    "$@"
  fi
}

if [[ -n "$HOST" ]]; then
  command -v ssh >/dev/null 2>&1 || die "ssh not found on PATH"
  # The same script on HOST, without --host, in the copied checkout.
  FORWARD=(--mem-fraction "$FRACTION")
  [[ -n "$VENV" ]] && FORWARD+=(--venv "$VENV")
  [[ $INSTALL -eq 0 ]] && FORWARD+=(--skip-install)
  REMOTE="$(printf '%q ' bash launch/gpu.sh "${FORWARD[@]}" -- "$@")"
  if [[ $INSTALL -eq 1 ]]; then
    if [[ $DRY -eq 1 ]]; then
      echo "git -C $REPO archive --format=tar.gz HEAD | ssh $HOST 'rm -rf $DIR; mkdir -p $DIR; tar xzf - -C $DIR'"
    else
      QDIR="$(printf '%q' "$DIR")"
      # shellcheck disable=SC2029  # expanded here on purpose: the quoted folder name
      git -C "$REPO" archive --format=tar.gz HEAD |
        ssh "$HOST" "rm -rf $QDIR && mkdir -p $QDIR && tar xzf - -C $QDIR"
    fi
  fi
  run ssh "$HOST" "cd $(printf '%q' "$DIR") && $REMOTE"
  exit 0
fi

if ! command -v nvidia-smi >/dev/null 2>&1; then
  die "nvidia-smi not found: this machine has no NVIDIA driver (or it is not on PATH).
  Run on a GPU machine, or pass --host USER@HOST."
fi
if [[ $DRY -eq 0 ]]; then
  GPUS="$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader)" ||
    die "nvidia-smi failed: is the driver loaded?"
  echo "gpu.sh: $(grep -c . <<<"$GPUS") GPU(s):"
  while IFS= read -r line; do echo "  $line"; done <<<"$GPUS"
fi

VENV="${VENV:-$REPO/.venv-gpu}"
if [[ $INSTALL -eq 1 ]]; then
  command -v python3 >/dev/null 2>&1 || die "python3 not found (Python 3.11+ is needed)"
  run python3 -m venv "$VENV"
  run "$VENV/bin/pip" install -q -U pip
  run "$VENV/bin/pip" install -q -e "$REPO" "jax[cuda12]>=0.10,<0.11"
fi
[[ $DRY -eq 1 || -x "$VENV/bin/python" ]] || die "no virtual environment at $VENV (drop --skip-install)"

cd "$REPO"
export XLA_PYTHON_CLIENT_MEM_FRACTION="$FRACTION"
export MEG_DISTRIBUTED=0  # one process drives every GPU of the machine
export PATH="$VENV/bin:$PATH"
run "$@"

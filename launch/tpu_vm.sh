#!/usr/bin/env bash
# Run a meg_jax command on a Cloud TPU VM (every worker of the slice), creating the VM if needed.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/tpu_vm.sh --name NAME --zone ZONE [options] -- COMMAND [ARGS...]

Creates the Cloud TPU VM NAME (or reuses it), copies this checkout (its committed files, via
`git archive HEAD`) to every worker, installs it with jax[tpu] in ~/meg_jax/.venv, and runs
COMMAND in ~/meg_jax on every worker at once. On a slice of several workers (v4-16 and up,
v5e-16 and up) it sets MEG_DISTRIBUTED=auto, so the entry points call
jax.distributed.initialize() (meg_jax/infra/distributed.py); one global mesh then spans them.

options:
  --name NAME           TPU VM name (required)
  --zone ZONE           e.g. us-central2-b for v4, us-west4-a for v5e (required)
  --accelerator TYPE    accelerator type when creating (default v4-8; e.g. v5litepod-8)
  --version VERSION     TPU software version when creating (default tpu-ubuntu2204-base;
                        v5e: v2-alpha-tpuv5-lite)
  --project PROJECT     Google Cloud project (default: gcloud's configured one)
  --spot                create as a Spot VM
  --no-create           fail instead of creating a missing VM
  --copy PATH           also copy PATH (file or folder: data, models) to ~/ on every worker;
                        may be repeated
  --skip-install        do not copy or install the project (already there)
  --dry-run             print the gcloud commands instead of running them
  -h, --help            this help

example:
  launch/tpu_vm.sh --name meg-v4 --zone us-central2-b --copy ~/data -- \
      python -m meg_jax.train --config configs/gptj_zsre.py:n=10000
  launch/tpu_vm.sh --name meg-v4 --zone us-central2-b --skip-install -- \
      python -m meg_jax.plan --model=gptj --mesh=1x4 --platform=native
USAGE
}

die() { echo "tpu_vm.sh: error: $*" >&2; exit 2; }

NAME="" ZONE="" ACCELERATOR="v4-8" VERSION="tpu-ubuntu2204-base" PROJECT="" SPOT=0
CREATE=1 INSTALL=1 DRY=0
COPY=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name) NAME="${2:?--name needs a value}"; shift 2 ;;
    --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
    --accelerator) ACCELERATOR="${2:?--accelerator needs a value}"; shift 2 ;;
    --version) VERSION="${2:?--version needs a value}"; shift 2 ;;
    --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
    --copy) COPY+=("${2:?--copy needs a path}"); shift 2 ;;
    --spot) SPOT=1; shift ;;
    --no-create) CREATE=0; shift ;;
    --skip-install) INSTALL=0; shift ;;
    --dry-run) DRY=1; shift ;;
    --) shift; break ;;
    *) usage >&2; die "unknown option '$1' (the command goes after --)" ;;
  esac
done
[[ -n "$NAME" ]] || { usage >&2; die "--name is required"; }
[[ -n "$ZONE" ]] || { usage >&2; die "--zone is required"; }
[[ $# -gt 0 ]] || { usage >&2; die "no command given after --"; }

if ! command -v gcloud >/dev/null 2>&1; then
  die "gcloud not found on PATH. Install the Google Cloud CLI
  (https://cloud.google.com/sdk/docs/install), then run 'gcloud auth login' and
  'gcloud config set project PROJECT'."
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GC=(gcloud compute tpus tpu-vm)
WHERE=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project "$PROJECT")

run() {
  if [[ $DRY -eq 1 ]]; then
    printf '%q ' "$@"; printf '\n'
  else
    "$@"
  fi
}

# 1. The VM: reuse it if it exists, else create it.
if [[ $DRY -eq 1 ]]; then
  run "${GC[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state)'
  WORKERS=1
elif STATE="$("${GC[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state)' 2>/dev/null)"; then
  echo "tpu_vm.sh: reusing $NAME ($STATE)"
  [[ "$STATE" == "READY" ]] || die "$NAME is $STATE, not READY; start it or pick another name"
else
  [[ $CREATE -eq 1 ]] || die "no TPU VM $NAME in $ZONE (and --no-create was given)"
  echo "tpu_vm.sh: creating $NAME ($ACCELERATOR, $VERSION) in $ZONE"
  CREATE_ARGS=(--accelerator-type "$ACCELERATOR" --version "$VERSION")
  [[ $SPOT -eq 1 ]] && CREATE_ARGS+=(--spot)
  run "${GC[@]}" create "$NAME" "${WHERE[@]}" "${CREATE_ARGS[@]}"
fi
if [[ $DRY -eq 0 ]]; then
  ENDPOINTS="$("${GC[@]}" describe "$NAME" "${WHERE[@]}" \
    --format='value(networkEndpoints[].ipAddress)')"
  WORKERS="$(tr ';,' '\n' <<<"$ENDPOINTS" | grep -c . || true)"
  echo "tpu_vm.sh: $NAME has $WORKERS worker(s)"
fi

# 2. The project on every worker: committed files only, so a run is reproducible from a commit.
if [[ $INSTALL -eq 1 ]]; then
  ARCHIVE="$(mktemp -t meg_jax.XXXXXX.tar.gz)"
  trap 'rm -f "$ARCHIVE"' EXIT
  git -C "$REPO" archive --format=tar.gz -o "$ARCHIVE" HEAD
  run "${GC[@]}" scp "$ARCHIVE" "$NAME:~/meg_jax.tar.gz" "${WHERE[@]}" --worker=all
  run "${GC[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command \
    'set -e; rm -rf ~/meg_jax; mkdir -p ~/meg_jax; tar xzf ~/meg_jax.tar.gz -C ~/meg_jax;
     cd ~/meg_jax; python3 -m venv .venv; . .venv/bin/activate;
     pip install -q -U pip; pip install -q -e . "jax[tpu]>=0.10,<0.11"'
fi
for path in "${COPY[@]}"; do
  run "${GC[@]}" scp --recurse "$path" "$NAME:~/" "${WHERE[@]}" --worker=all
done

# 3. The same command on every worker, at once.
DIST=0
[[ "$WORKERS" -gt 1 ]] && DIST=1
CMD="$(printf '%q ' "$@")"
run "${GC[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command \
  "cd ~/meg_jax && . .venv/bin/activate && MEG_DISTRIBUTED=$DIST $CMD"

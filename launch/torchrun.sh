# Sourced by launch/train.sh and launch/infer.sh: torchrun's rendezvous and restart arguments from
# the environment (documented in launch/train.sh). Sets `launcher` (the torchrun command line up to
# `-m MODULE`), exports what the ranks need and defines `run_launcher`; exits 2 on a multi-node
# job without an endpoint.
# shellcheck shell=bash
# shellcheck disable=SC2034  # `launcher` is read by the script that sources this file
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NNODES="${NNODES:-1}"
NPROC_PER_NODE="${NPROC_PER_NODE:-2}"
NODE_RANK="${NODE_RANK:-0}"
RDZV_ENDPOINT="${RDZV_ENDPOINT:-}"
RDZV_ID="${RDZV_ID:-epruntime}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
read -r -a torchrun <<< "${TORCHRUN:-torchrun}"

if [[ "$NNODES" -gt 1 && -z "$RDZV_ENDPOINT" ]]; then
    echo "launch/$(basename "$0"): error: NNODES=$NNODES needs RDZV_ENDPOINT=host:port" >&2
    exit 2
fi
if [[ "$NNODES" -eq 1 ]]; then
    rdzv=(--standalone)
else
    rdzv=(--node-rank="$NODE_RANK" --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT"
          --rdzv-id="$RDZV_ID")
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
launcher=("${torchrun[@]}" --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" "${rdzv[@]}"
          --max-restarts="$MAX_RESTARTS")

# run_launcher ARGS...: run "${launcher[@]}" ARGS and exit with the project's code (README "Exit
# codes"), not torchrun's 1: every rank that fails leaves its one error line and code under
# $EPRUNTIME_EXIT_DIR (epruntime.cli), and the first one to fail is printed last, as the summary.
run_launcher() {
    local exit_dir code first
    exit_dir="$(mktemp -d "${TMPDIR:-/tmp}/epruntime-exit.XXXXXX")"
    export EPRUNTIME_EXIT_DIR="$exit_dir"
    # Forward a stop request to torchrun, which passes it on to the ranks.
    trap 'kill -TERM "$pid" 2>/dev/null' TERM INT HUP
    "${launcher[@]}" "$@" &
    local pid=$!
    code=0
    wait "$pid" || code=$?
    while kill -0 "$pid" 2>/dev/null; do  # `wait` returns early when a trapped signal arrives
        wait "$pid" || code=$?
    done
    trap - TERM INT HUP
    if [[ "$code" -ne 0 ]]; then
        first="$(python3 - "$exit_dir" <<'PY' 2>/dev/null || true
import json, pathlib, sys
records = []
for path in pathlib.Path(sys.argv[1]).glob("rank*.json"):
    try:
        records.append(json.loads(path.read_text()))
    except (OSError, ValueError):
        pass
if records:
    first = min(records, key=lambda r: r["time"])
    print(first["code"], first["line"])
PY
)"
        if [[ -n "$first" ]]; then
            echo "launch/$(basename "$0"): rank failure: ${first#* }" >&2
            code="${first%% *}"
        fi
    fi
    rm -rf "$exit_dir"
    return "$code"
}

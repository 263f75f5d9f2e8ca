# Sourced by launch/train.sh and launch/infer.sh: torchrun's rendezvous and restart arguments from
# the environment (documented in launch/train.sh). Sets `launcher` (the torchrun command line up to
# `-m MODULE`) and exports what the ranks need; exits 2 on a multi-node job without an endpoint.
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

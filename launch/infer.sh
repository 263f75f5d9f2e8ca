#!/usr/bin/env bash
# Evaluate a checkpoint with expert parallelism under torchrun, on one node or on many.
#
# Usage:
#   CHECKPOINT=runs/tiny-vqa [VAR=value ...] launch/infer.sh [--set KEY=VALUE ...]
#
# Environment (default in brackets):
#   CHECKPOINT      a checkpoint step directory, or a training output_dir (-> its latest) [required]
#   CONFIG          YAML config; empty uses the checkpoint's own config                 []
#   NNODES, NPROC_PER_NODE, NODE_RANK, RDZV_ENDPOINT, RDZV_ID, MAX_RESTARTS, TORCHRUN,
#   TORCH_DISABLE_SHARE_RDZV_TCP_STORE
#                   as in launch/train.sh                        [1, 2, 0, -, epruntime, 0, torchrun, 1]
# Any arguments (e.g. --set parallel.ep_size=4) go to `python -m epruntime.infer`. The EP size may
# differ from the one the checkpoint was trained with.
#
# Examples:
#   CHECKPOINT=runs/tiny-vqa launch/infer.sh --set infer.output_dir=runs/tiny-vqa/infer
#   # two nodes, two ranks each: run on node 0 and on node 1 (host0 = node 0's address)
#   CHECKPOINT=runs/x NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=host0:29400 launch/infer.sh --set parallel.ep_size=4
#   CHECKPOINT=runs/x NNODES=2 NODE_RANK=1 RDZV_ENDPOINT=host0:29400 launch/infer.sh --set parallel.ep_size=4
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHECKPOINT="${CHECKPOINT:-}"
CONFIG="${CONFIG:-}"
NNODES="${NNODES:-1}"
NPROC_PER_NODE="${NPROC_PER_NODE:-2}"
NODE_RANK="${NODE_RANK:-0}"
RDZV_ENDPOINT="${RDZV_ENDPOINT:-}"
RDZV_ID="${RDZV_ID:-epruntime}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
read -r -a torchrun <<< "${TORCHRUN:-torchrun}"

if [[ -z "$CHECKPOINT" ]]; then
    echo "launch/infer.sh: error: set CHECKPOINT to a checkpoint or a training output_dir" >&2
    exit 2
fi
if [[ "$NNODES" -gt 1 && -z "$RDZV_ENDPOINT" ]]; then
    echo "launch/infer.sh: error: NNODES=$NNODES needs RDZV_ENDPOINT=host:port" >&2
    exit 2
fi
if [[ "$NNODES" -eq 1 ]]; then
    rdzv=(--standalone)
else
    rdzv=(--node-rank="$NODE_RANK" --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT"
          --rdzv-id="$RDZV_ID")
fi
config=()
if [[ -n "$CONFIG" ]]; then
    config=(--config "$CONFIG")
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
exec "${torchrun[@]}" --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" "${rdzv[@]}" \
    --max-restarts="$MAX_RESTARTS" -m epruntime.infer --checkpoint "$CHECKPOINT" \
    "${config[@]}" "$@"

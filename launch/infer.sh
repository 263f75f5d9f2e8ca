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

CHECKPOINT="${CHECKPOINT:-}"
CONFIG="${CONFIG:-}"
if [[ -z "$CHECKPOINT" ]]; then
    echo "launch/infer.sh: error: set CHECKPOINT to a checkpoint or a training output_dir" >&2
    exit 2
fi
# shellcheck source=launch/torchrun.sh
source "$(dirname "${BASH_SOURCE[0]}")/torchrun.sh"
config=()
if [[ -n "$CONFIG" ]]; then
    config=(--config "$CONFIG")
fi
run_launcher -m epruntime.infer --checkpoint "$CHECKPOINT" "${config[@]}" "$@"

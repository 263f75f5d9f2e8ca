#!/usr/bin/env bash
# Train epruntime under torchrun, on one node or on many (one torchrun agent per node).
#
# Usage:
#   [VAR=value ...] launch/train.sh [--set KEY=VALUE ...]
#
# Environment (default in brackets):
#   NNODES          nodes in the job, one torchrun agent each                     [1]
#   NPROC_PER_NODE  ranks per node (torchrun's LOCAL_WORLD_SIZE, which is also
#                   epruntime's ranks-per-node for placement and the comm ledger)  [2]
#   NODE_RANK       this node's index, 0..NNODES-1. Passed to torchrun; with the
#                   c10d rendezvous global ranks follow join order instead         [0]
#   RDZV_ENDPOINT   host:port of the c10d rendezvous store, the same on every node
#                   (usually node 0's address); required when NNODES > 1
#   RDZV_ID         job id, the same on every node of one job                     [epruntime]
#   MAX_RESTARTS    times torchrun restarts the worker group after a rank fails;
#                   training resumes from checkpoints/latest (train.resume)       [0]
#   CONFIG          YAML config                        [launch/configs/tiny-vqa.yaml]
#   TORCHRUN        launcher command                                              [torchrun]
#   TORCH_DISABLE_SHARE_RDZV_TCP_STORE  [1] give each restart of the worker group a fresh
#                   TCPStore. torchrun's shared store (0) keeps the previous attempt's keys, and
#                   a restarted gloo group then dials the dead ranks' addresses and fails.
# Any arguments (e.g. --set train.max_steps=100) go to `python -m epruntime.train`.
#
# One node uses `torchrun --standalone` (a private rendezvous on a free port). Examples:
#   launch/train.sh --set train.max_steps=100
#   MAX_RESTARTS=2 launch/train.sh                                 # survive 2 rank failures
#   # two nodes, two ranks each: run on node 0 and on node 1 (host0 = node 0's address)
#   NNODES=2 NPROC_PER_NODE=2 NODE_RANK=0 RDZV_ENDPOINT=host0:29400 launch/train.sh
#   NNODES=2 NPROC_PER_NODE=2 NODE_RANK=1 RDZV_ENDPOINT=host0:29400 launch/train.sh
# On SLURM see launch/slurm/train.sbatch.
set -euo pipefail

# shellcheck source=launch/torchrun.sh
source "$(dirname "${BASH_SOURCE[0]}")/torchrun.sh"
CONFIG="${CONFIG:-$root/launch/configs/tiny-vqa.yaml}"
run_launcher -m epruntime.train --config "$CONFIG" "$@"

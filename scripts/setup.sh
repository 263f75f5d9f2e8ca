#!/usr/bin/env bash
# Create .venv and install epruntime with its test extras.
# On a host without an NVIDIA GPU, torch is installed from its CPU build first, so that the
# pinned torch requirement never pulls the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), "epruntime needs Python 3.11"'
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
TORCH_VERSION=$(sed -n 's/.*"torch==\([0-9.]*\)".*/\1/p' pyproject.toml)
if ! python -c "import torch; assert torch.__version__.split('+')[0] == '$TORCH_VERSION'" 2>/dev/null; then
  # On the project's CPU machines pip resolves this pin to the CPU wheel kept on local disk.
  # Elsewhere, point TORCH_INDEX_URL at the CPU wheel index of your mirror.
  python -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"
fi
if ! (command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1); then
  python - <<'PY'
import torch
if torch.version.cuda is not None:
    print("warning: a CUDA build of torch is installed on a host without a GPU; "
          "set TORCH_INDEX_URL to a CPU wheel index and rerun scripts/setup.sh")
PY
fi
python -m pip install -q -e ".[test]"
# The scenes workload (python -m epruntime.data.scenes) composes real product photos from
# Debian's dataset-fashion-mnist package; as root with apt-get, install it when it is absent.
FASHION_MNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FASHION_MNIST" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
      || true
  fi
  if [ ! -f "$FASHION_MNIST" ]; then
    echo "note: Debian's dataset-fashion-mnist is not installed (needs root and apt-get:" \
         "apt-get install dataset-fashion-mnist); the scenes generator and its tests need it," \
         "and those tests skip without it"
  fi
fi
python -c "import epruntime, torch, megatron.core; print('epruntime', epruntime.__version__, 'torch', torch.__version__, 'megatron-core', megatron.core.__version__)"

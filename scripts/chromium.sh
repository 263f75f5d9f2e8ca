#!/bin/sh
# Headless Chromium for rendering profiler reports (tests/test_comm_report.py).
# Installs Debian's `chromium` only when it is not already on PATH; prints its path.
set -eu
if ! command -v chromium >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >&2
fi
command -v chromium

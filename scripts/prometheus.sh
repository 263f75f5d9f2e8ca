#!/usr/bin/env bash
# Start a throwaway Prometheus that scrapes epruntime ranks on 127.0.0.1, for tests and local looks.
#
#   scripts/prometheus.sh [--ports 9400,9401] [--install-only]
#
# Installs Debian's `prometheus` (apt-get) when it is not on PATH, writes a temp config scraping
# 127.0.0.1:<port> for every port every 1 s, starts Prometheus bound to 127.0.0.1 on a free port
# with a temp storage dir and prints its URL as the first stdout line. Runs in the foreground:
# SIGTERM/SIGINT stop Prometheus and delete the temp dir. Never binds a non-loopback address.
set -euo pipefail

ports="9400,9401"
install_only=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --ports) ports="$2"; shift 2 ;;
    --install-only) install_only=1; shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "prometheus.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

if ! command -v prometheus >/dev/null 2>&1; then
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "prometheus.sh: prometheus is not on PATH and cannot be installed (needs root + apt-get)" >&2
    exit 3
  fi
  echo "prometheus.sh: installing Debian's prometheus..." >&2
  export DEBIAN_FRONTEND=noninteractive
  # --no-install-recommends: no node-exporter etc. Package scripts must not start the service
  # (it would listen on all interfaces): Docker images deny that through policy-rc.d already.
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus; } >&2; then
    echo "prometheus.sh: apt-get install prometheus failed" >&2
    exit 3
  fi
fi
[[ $install_only -eq 1 ]] && exit 0

dir=$(mktemp -d -t epruntime-prometheus.XXXXXX)
pid=""
cleanup() {
  if [[ -n "$pid" ]]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

targets=$(tr ',' '\n' <<<"$ports" | sed '/^$/d; s/.*/"127.0.0.1:&"/' | paste -sd, -)
cat >"$dir/prometheus.yml" <<YAML
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: epruntime
    static_configs:
      - targets: [$targets]
YAML

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
prometheus --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/data" \
  --web.listen-address="127.0.0.1:$port" --log.level=warn >"$dir/prometheus.log" 2>&1 &
pid=$!
for _ in $(seq 100); do
  if curl -fsS "http://127.0.0.1:$port/-/ready" >/dev/null 2>&1; then
    echo "http://127.0.0.1:$port"
    wait "$pid"
    exit $?
  fi
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.1
done
echo "prometheus.sh: Prometheus did not become ready:" >&2
cat "$dir/prometheus.log" >&2
exit 1

#!/usr/bin/env bash
# Starts a local Prometheus (Debian package `prometheus`) that scrapes a
# running `spear serve` cluster with SPEAR's recording and alert rules.
#
#   spear serve --model smollm2-135m --port 0 | tee serve.log &
#   scripts/monitor.sh --serve-log serve.log          # waits for LISTENING
#   scripts/monitor.sh --listening "LISTENING grpc=50051 metrics=9464 worker_metrics=9465,9466"
#   scripts/monitor.sh --router 127.0.0.1:9464 --workers 127.0.0.1:9465,127.0.0.1:9466
#
# Flags: --port N (Prometheus web port; 0 = a free one, the default),
# --dir DIR (config, targets and TSDB; default a new temp dir),
# --background (start, wait until ready, print one line and return:
#   PROMETHEUS url=http://127.0.0.1:PORT pid=PID dir=DIR),
# --retention D (TSDB retention, default 1d).
# Then open the URL, or import monitoring/grafana/spear-overview.json into a
# Grafana whose Prometheus data source is that URL.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
listening="" serve_log="" router="" workers="" port=0 dir="" background=0 retention=1d

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
while (($#)); do
  case $1 in
    --listening) listening=$2; shift 2 ;;
    --serve-log) serve_log=$2; shift 2 ;;
    --router) router=$2; shift 2 ;;
    --workers) workers=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --retention) retention=$2; shift 2 ;;
    --background) background=1; shift ;;
    -h|--help) usage ;;
    *) echo "monitor.sh: unknown flag $1" >&2; usage ;;
  esac
done

PROM=$(command -v prometheus || true)
if [[ -z $PROM ]]; then
  echo "monitor.sh: 'prometheus' not found; scripts/setup.sh installs the Debian package prometheus" >&2
  exit 1
fi

if [[ -n $serve_log ]]; then
  for _ in $(seq 600); do
    listening=$(grep -m1 '^LISTENING ' "$serve_log" 2>/dev/null || true)
    [[ -n $listening ]] && break
    sleep 0.5
  done
  [[ -n $listening ]] || { echo "monitor.sh: no LISTENING line in $serve_log after 300 s" >&2; exit 1; }
fi
if [[ -n $listening ]]; then
  # LISTENING grpc=<port> metrics=<port> [worker_metrics=<p1>,<p2>,...]
  rm_port=$(sed -n 's/.*[[:space:]]metrics=\([0-9]*\).*/\1/p' <<<"$listening")
  wm=$(sed -n 's/.*worker_metrics=\([0-9,]*\).*/\1/p' <<<"$listening")
  [[ -n $rm_port ]] || { echo "monitor.sh: cannot parse '$listening'" >&2; exit 2; }
  router="127.0.0.1:$rm_port"
  workers=""
  IFS=, read -ra wps <<<"$wm"
  for p in "${wps[@]}"; do [[ -n $p ]] && workers+="${workers:+,}127.0.0.1:$p"; done
fi
[[ -n $router || -n $workers ]] || { echo "monitor.sh: give --listening, --serve-log or --router/--workers" >&2; usage; }

dir=${dir:-$(mktemp -d "${TMPDIR:-/tmp}/spear-monitor.XXXXXX")}
mkdir -p "$dir/targets" "$dir/data"
cp "$ROOT/monitoring/prometheus/prometheus.yml" "$ROOT/monitoring/prometheus/recording_rules.yml" \
   "$ROOT/monitoring/prometheus/alert_rules.yml" "$dir/"
targets_json() {  # comma list -> file_sd JSON
  local list=$1 out="" t
  IFS=, read -ra ts <<<"$list"
  for t in "${ts[@]}"; do [[ -n $t ]] && out+="${out:+, }\"$t\""; done
  printf '[{"targets": [%s], "labels": {}}]\n' "$out"
}
targets_json "$router" >"$dir/targets/spear-router.json"
targets_json "$workers" >"$dir/targets/spear-worker.json"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {  # start PORT -> pid in $pid
  "$PROM" --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/data" \
    --storage.tsdb.retention.time="$retention" --web.listen-address="127.0.0.1:$1" \
    --web.enable-lifecycle >"$dir/prometheus.log" 2>&1 &
  pid=$!
}

ready() {  # ready PORT PID: 0 once /-/ready answers, 1 if the process died
  for _ in $(seq 120); do
    kill -0 "$2" 2>/dev/null || return 1
    if python3 - "$1" <<'PY' 2>/dev/null; then return 0; fi
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/-/ready", timeout=1).read()
PY
    sleep 0.5
  done
  return 1
}

echo "monitor.sh: router metrics: ${router:-none}; worker metrics: ${workers:-none}; dir: $dir" >&2
if ((background == 0)); then
  [[ $port == 0 ]] && port=$(free_port)
  echo "monitor.sh: Prometheus on http://127.0.0.1:$port (Ctrl-C stops it)" >&2
  exec "$PROM" --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/data" \
    --storage.tsdb.retention.time="$retention" --web.listen-address="127.0.0.1:$port" --web.enable-lifecycle
fi
# Background: a free port can be taken between choosing and binding; retry.
for _ in 1 2 3; do
  p=$port
  [[ $p == 0 ]] && p=$(free_port)
  start "$p"
  if ready "$p" "$pid"; then
    echo "$pid" >"$dir/prometheus.pid"
    echo "PROMETHEUS url=http://127.0.0.1:$p pid=$pid dir=$dir"
    exit 0
  fi
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  [[ $port == 0 ]] || break
done
echo "monitor.sh: Prometheus did not become ready; log:" >&2
tail -20 "$dir/prometheus.log" >&2
exit 1

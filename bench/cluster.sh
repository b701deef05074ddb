#!/usr/bin/env bash
# Scale-out: the same fleet through one data-plane node and through two, behind one planner and
# a Mosquitto 2 started here, in one sitting: `bash bench/cluster.sh [DEVICES] [IMAGE_KIB] [ROUNDS]`
# (default 2000 devices, 64 KiB images, 2 rounds).
#
# Each round runs `fwgate load --transport mqtt --register` against a fresh planner
# (cluster.role = planner) with 1, then 2 data-plane nodes (cluster.role = dataplane), all
# clients of the broker; devices connect only to the broker. Prints each run's summary, the CPU
# seconds every process used (broker, planner, nodes, the load itself; from /proc/PID/stat),
# each node's share of the blocks and the delay from a planner change (the devices' assignments)
# to the node holding it (p50/p99, from `fwgate nodes`), and per round the ratio of blocks per
# second two nodes / one node. Loopback only; every process started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
devices="${1:-2000}"
kib="${2:-64}"
rounds="${3:-2}"
. bench/broker_common.sh
metric() { curl -s "http://$1/metrics" | awk -v s="$2" '$1 == s {print $2; found=1} END {if (!found) print 0}'; }

# `fwgate serve` in $work/$1 with role $2 and extra environment; sets pid, admin.
start_node() {
  local name="$1" d="$work/$1" role="$2"; shift 2
  mkdir -p "$d"
  env FWGATE_STORE__DATA_DIR="$d/data" FWGATE_ADMIN__TOKEN=bench FWGATE_LOG__LEVEL=warn \
    FWGATE_COAP__ENABLED=false FWGATE_ADMIN__LISTEN=127.0.0.1:0 FWGATE_MQTT__MODE=external \
    FWGATE_MQTT__BROKER_URL="mqtt://127.0.0.1:$port" FWGATE_MQTT__CLIENT_ID="$name" FWGATE_CLUSTER__ROLE="$role" "$@" \
    "$bin" serve --config config/fwgate.toml --ports-file "$d/ports.json" 2>"$d/serve.log" &
  pid=$!; pids+=("$pid")
  for _ in $(seq 300); do [ -s "$d/ports.json" ] && break; sleep 0.1; done
  [ -s "$d/ports.json" ] || { cat "$d/serve.log"; echo "fwgate serve did not start" >&2; exit 1; }
  admin="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["admin"])' "$d/ports.json")"
  for _ in $(seq 100); do [ "$(metric "$admin" 'fwgate_cluster_events_total{event="bus_subscribed"}')" != 0 ] && break; sleep 0.1; done
}

run() {
  local n="$1" name="$round-$1"
  start_mosquitto "$name"
  start_node "planner-$name" planner; planner=$pid; planner_admin=$admin
  nodes=()
  for i in $(seq "$n"); do
    start_node "dp$i-$name" dataplane FWGATE_CLUSTER__PLANNER_URL="http://$planner_admin" \
      FWGATE_CLUSTER__PLANNER_TOKEN=bench FWGATE_DFU__WAIT_POLL_SECS=1
    nodes+=("$pid")
  done
  local report="$work/load-$name.json"
  echo "\$ fwgate load --transport mqtt --devices $devices --register --image-kib $kib   # $n data-plane node(s)"
  declare -A c0
  for p in "$broker" "$planner" "${nodes[@]}"; do c0[$p]="$(cpu "$p")"; done
  local TIMEFORMAT='%U %S'
  { time FWGATE_TOKEN=bench "$bin" load --quiet --transport mqtt --devices "$devices" --register --image-kib "$kib" \
    --seed "$round" --server "http://$planner_admin" --mqtt "127.0.0.1:$port" --report "$report" \
    --connect-rate 2000 >"$work/load-$name.out" 2>"$work/load-$name.err"; } 2>"$work/load-$name.time" || echo "(exit status $?)"
  sed -n "1,4p;6p" "$work/load-$name.out"
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); [print("error:", e) for e in r.get("errors", [])[:5]]' "$report" || true
  local line="cpu s: broker $(awk "BEGIN{print $(cpu "$broker") - ${c0[$broker]}}"), planner $(awk "BEGIN{print $(cpu "$planner") - ${c0[$planner]}}")"
  for i in "${!nodes[@]}"; do
    line="$line, node$((i + 1)) $(awk "BEGIN{print $(cpu "${nodes[$i]}") - ${c0[${nodes[$i]}]}}")"
  done
  echo "$line, load $(awk '{print $1 + $2}' "$work/load-$name.time")"
  sleep 3  # a heartbeat
  FWGATE_TOKEN=bench "$bin" nodes --server "http://$planner_admin"
  bps="$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["blocks_per_sec"] if r["failed"]==0 and r["unfinished"]==0 else 0)' "$report")"
  echo "planner: operations succeeded $(metric "$planner_admin" 'fwgate_operations{state="succeeded"}')"
  stop
}

for round in $(seq "$rounds"); do
  echo; echo "== round $round"
  run 1; one=$bps
  run 2; two=$bps
  python3 -c 'import sys; a,b=map(float,sys.argv[1:]); print(f"blocks/s: one node {a:.0f}, two nodes {b:.0f}, two/one {b/a:.2f}" if a and b else "a run failed: no ratio")' "$one" "$two"
done

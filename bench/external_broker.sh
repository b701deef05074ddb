#!/usr/bin/env bash
# External-broker mode against fwgate's own listener, on the same fleet and machine, in one
# sitting: `bash bench/external_broker.sh [DEVICES] [IMAGE_KIB] [ROUNDS]` (default 1000 devices,
# 64 KiB images, 3 rounds).
#
# Each round runs the same `fwgate load --transport mqtt --register` twice, on fresh data dirs:
#   embedded  devices connect to fwgate's own listener;
#   external  devices connect to a Mosquitto 2 started here on a free loopback port, and fwgate
#             (mqtt.mode = external) is that broker's client, reading Statuses through
#             $share/fwgate/dfu/+/status.
# Prints each run's summary line, the CPU seconds the gateway and the broker used (from
# /proc/PID/stat), and per round the ratio external / embedded of blocks per second. Loopback
# only; every process started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
devices="${1:-1000}"
kib="${2:-64}"
rounds="${3:-3}"
. bench/broker_common.sh

# A fresh gateway in $work/$1 with extra environment ($2…); sets gw, admin, mqtt.
start_gateway() {
  local d="$work/$1"; shift
  mkdir -p "$d"
  env FWGATE_STORE__DATA_DIR="$d/data" FWGATE_ADMIN__TOKEN=bench FWGATE_LOG__LEVEL=warn \
    FWGATE_MQTT__LISTEN=127.0.0.1:0 FWGATE_COAP__ENABLED=false FWGATE_ADMIN__LISTEN=127.0.0.1:0 "$@" \
    "$bin" serve --config config/fwgate.toml --ports-file "$d/ports.json" 2>"$d/serve.log" &
  gw=$!; pids+=("$gw")
  for _ in $(seq 300); do [ -s "$d/ports.json" ] && break; sleep 0.1; done
  [ -s "$d/ports.json" ] || { cat "$d/serve.log"; echo "fwgate serve did not start" >&2; exit 1; }
  read -r admin mqtt < <(python3 -c 'import json,sys; p=json.load(open(sys.argv[1])); print(p["admin"], p["mqtt"])' "$d/ports.json")
}

# One load run against $1 (host:port); prints the summary and CPU use; sets bps.
load() {
  local target="$1" name="$2" report="$work/$2-$round.json"
  local g0 b0=0; g0="$(cpu "$gw")"; [ -n "${broker:-}" ] && b0="$(cpu "$broker")"
  echo "\$ fwgate load --transport mqtt --devices $devices --register --image-kib $kib --mqtt $target   # $name"
  FWGATE_TOKEN=bench "$bin" load --quiet --transport mqtt --devices "$devices" --register \
    --image-kib "$kib" --seed "$round" --server "http://$admin" --mqtt "$target" --report "$report" \
    | sed -n "1,4p;6p" || echo "(exit status $?)"
  local g1 b1=0; g1="$(cpu "$gw")"; [ -n "${broker:-}" ] && b1="$(cpu "$broker")"
  echo "cpu: gateway $(awk "BEGIN{print $g1 - $g0}") s, broker $(awk "BEGIN{print $b1 - $b0}") s"
  bps="$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["blocks_per_sec"] if r["failed"]==0 and r["unfinished"]==0 else 0)' "$report")"
}

for round in $(seq "$rounds"); do
  echo; echo "== round $round"
  broker=""
  start_gateway "embedded-$round"
  load "$mqtt" embedded; embedded=$bps
  stop

  start_mosquitto "$round"
  start_gateway "external-$round" FWGATE_MQTT__MODE=external FWGATE_MQTT__BROKER_URL="mqtt://127.0.0.1:$port"
  for _ in $(seq 100); do curl -s "http://$admin/metrics" | grep -q '^fwgate_broker_events_total{event="subscribed"} 1' && break; sleep 0.1; done
  load "127.0.0.1:$port" external; external=$bps
  stop
  python3 -c 'import sys; e,x=map(float,sys.argv[1:]); print(f"blocks/s: embedded {e:.0f}, external {x:.0f}, external/embedded {x/e:.2f}" if e and x else "a run failed: no ratio")' "$embedded" "$external"
done

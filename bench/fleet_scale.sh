#!/usr/bin/env bash
# The README's "Fleet scale" figures, in one sitting: `bash bench/fleet_scale.sh [all|faults|10k|qos|front]`.
#
# Starts a fresh `fwgate serve` (default config, data in a temp dir, ports picked by the
# kernel and read back from --ports-file) for each part, runs `fwgate load` against it with
# --gateway-pid and --report, prints each command before its summary, and ends with a table
# built from the JSON reports (fields named in the header). Loopback only; every run ends on
# its own (the load tool's time-outs), and the gateway is stopped on exit.
#   faults  the six runs of the transports table (256 KiB image, 512-byte blocks)
#   10k     10,000 MQTT devices connected at once, then downloading a 64 KiB image
#   qos     2 MQTT devices, 256 KiB each, Status at QoS 0 and then at QoS 1
#   front   the MQTT front's memory and scale: 10,000 devices connected idle, then downloading
#           (mtu 1024, window 1); then as many connected devices as descriptors allow (100,000
#           where the limit permits), each answered once (mqtt.echo)
#   all     all four (the default)
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
case "$what" in all|faults|10k|qos|front) ;; *) echo "usage: $0 [all|faults|10k|qos|front]" >&2; exit 2 ;; esac
# 100,000 connections need 100,000 descriptors in the load tool and as many in the gateway;
# root may raise the hard limit (fs.nr_open allows a million), others get what they have.
ulimit -Hn 300000 2>/dev/null || true
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fwgate-target}"
bin="${FWGATE_BIN:-$CARGO_TARGET_DIR/release/fwgate}"
[ -x "$bin" ] || cargo build --release --locked --bin fwgate
work="$(mktemp -d)"
pid=""
stop() { [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; pid=""; }
trap 'stop; rm -rf "$work"' EXIT

# A fresh gateway in $work/$1; sets pid, admin, mqtt, coap.
start() {
  local d="$work/$1"
  mkdir -p "$d"
  FWGATE_STORE__DATA_DIR="$d/data" FWGATE_ADMIN__TOKEN=bench FWGATE_LOG__LEVEL="warn" \
    FWGATE_MQTT__LISTEN=127.0.0.1:0 FWGATE_COAP__LISTEN=127.0.0.1:0 \
    FWGATE_ADMIN__LISTEN=127.0.0.1:0 \
    "$bin" serve --config config/fwgate.toml --ports-file "$d/ports.json" 2>"$d/serve.log" &
  pid=$!
  for _ in $(seq 300); do [ -s "$d/ports.json" ] && break; sleep 0.1; done
  [ -s "$d/ports.json" ] || { cat "$d/serve.log"; echo "fwgate serve did not start" >&2; exit 1; }
  read -r admin mqtt coap < <(python3 -c 'import json,sys; p=json.load(open(sys.argv[1])); print(p["admin"], p["mqtt"], p["coap"])' "$d/ports.json")
}

n=0
reports=()
# One load run: the command as a user would type it, then what it printed.
run() {
  n=$((n + 1))
  local report="$work/run-$n.json"
  echo "$*" >"$report.args"
  echo
  echo "\$ fwgate load $* --gateway-pid PID"
  FWGATE_TOKEN=bench "$bin" load --quiet --server "http://$admin" --mqtt "$mqtt" --coap "$coap" \
    --gateway-pid "$pid" --report "$report" "$@" || echo "(exit status $?)"
  reports+=("$report")
}

if [ "$what" = all ] || [ "$what" = faults ]; then
  start faults
  run --transport mqtt --devices 1000 --register --prefix m-
  run --transport coap --devices 200 --register --prefix c-
  run --transport coap-block2 --devices 200 --register --prefix b-
  run --transport mqtt --devices 1000 --register --prefix mf- --disconnect-at 50 --corrupt 10
  run --transport coap --devices 200 --register --prefix cf- --drop 5 --disconnect-at 50 --corrupt 10
  run --transport coap-block2 --devices 200 --register --prefix bf- --drop 5 --disconnect-at 50
  stop
fi
if [ "$what" = all ] || [ "$what" = qos ]; then
  start qos
  run --transport mqtt --devices 2 --register --prefix q0- --qos 0
  run --transport mqtt --devices 2 --register --prefix q1- --qos 1
  stop
fi
if [ "$what" = all ] || [ "$what" = 10k ]; then
  start big
  run --transport mqtt --devices 10000 --register --sync-start --connect-rate 1000 --image-kib 64 --timeout 60 --prefix k-
  stop
fi

if [ "$what" = all ] || [ "$what" = front ]; then
  start front
  run --transport mqtt --devices 10000 --register --sync-start --connect-rate 2000 --image-kib 64 --mtu 1024 --window 1 --timeout 60 --prefix f-
  stop
  FWGATE_MQTT__ECHO=true FWGATE_MQTT__MAX_CONNECTIONS=110000 start echo
  # Each process may hold at most `ulimit -Hn` descriptors (20,000 on the machines the README's
  # figures come from, and not raisable there): the gateway and the load tool each hold one
  # per device. FWGATE_BENCH_CONNECTIONS overrides the count; --spread 1 keeps every device
  # on 127.0.0.1, where the gateway listens.
  conns="${FWGATE_BENCH_CONNECTIONS:-$(( $(ulimit -Hn) >= 200000 ? 100000 : $(ulimit -Hn) - 1000 ))}"
  run --transport mqtt --echo --image-kib 1 --mtu 1024 --devices "$conns" --spread 1 --sync-start --connect-rate 5000 --timeout 120 --prefix e-
  stop
fi

echo
echo "From the JSON reports: ok/devices, blocks, seconds, blocks_per_sec, completion.p99_ms,"
echo "retries, drops, reconnects, corrupt_sent, and gateway_rss.* (KiB; per device = growth over before_connect_kib / devices)."
python3 - "${reports[@]}" <<'EOF'
import json, sys
print("| command | verified | blocks | time | blocks/s | p99 completion | faults | gateway RSS before / idle / peak / after (per device) |")
print("|---|---|---|---|---|---|---|---|")
for path in sys.argv[1:]:
    r = json.load(open(path))
    cmd = open(path + ".args").read().strip()
    m = r["gateway_rss"] or {}
    n = r["devices"]
    def mib(k):
        return "-" if k is None else f"{k / 1024:.0f} MiB"
    def per(k):
        return "" if k is None else f" ({(k - m['before_connect_kib']) / n:.0f} KiB)"
    rss = " / ".join(mib(m.get(k)) + (per(m.get(k)) if k in ("connected_idle_kib", "peak_downloading_kib") else "")
                     for k in ("before_connect_kib", "connected_idle_kib", "peak_downloading_kib", "after_kib"))
    faults = f'{r["retries"]} retries, {r["drops"]} lost, {r["reconnects"]} reconnects, {r["corrupt_sent"]} garbage'
    print(f'| `{cmd}` | {r["ok"]} / {n} | {r["blocks"]:,} | {r["seconds"]:.1f} s | {r["blocks_per_sec"]:,.0f} '
          f'| {r["completion"]["p99_ms"] / 1000:.2f} s | {faults} | {rss} |')
EOF

# Shared by the scripts that run fwgate behind a Mosquitto 2 on loopback (external_broker.sh,
# cluster.sh); sourced from the project's root. Sets bin, mosquitto, work; every process pushed
# on pids is stopped on exit and the work directory removed.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fwgate-target}"
bin="${FWGATE_BIN:-$CARGO_TARGET_DIR/release/fwgate}"
[ -x "$bin" ] || cargo build --release --locked --bin fwgate
mosquitto="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
work="$(mktemp -d)"
pids=()
stop() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; pids=(); }
trap 'stop; rm -rf "$work"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# user+system seconds a process has used
cpu() { awk -v t="$(getconf CLK_TCK)" '{print ($14+$15)/t}' "/proc/$1/stat"; }

# A Mosquitto on a free loopback port, anonymous, no persistence, logging to $work/mosquitto-$1.log;
# sets port and broker.
start_mosquitto() {
  port="$(free_port)"
  printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n' "$port" >"$work/mosquitto-$1.conf"
  "$mosquitto" -c "$work/mosquitto-$1.conf" 2>"$work/mosquitto-$1.log" &
  broker=$!; pids+=("$broker")
  for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done
}

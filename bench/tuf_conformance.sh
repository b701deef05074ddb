#!/usr/bin/env bash
# Runs the public TUF conformance suite (theupdateframework/tuf-conformance, tag v2.4.0) against
# `fwgate tuf client`, the client the gateway itself uses, and prints the pass count and every
# failure. The suite is not part of this repository: fetch it first, e.g.
#
#   git clone https://github.com/theupdateframework/tuf-conformance /tmp/tuf-conformance
#   bash bench/tuf_conformance.sh /tmp/tuf-conformance [pytest arguments, e.g. -k delegat]
#
# Needs python3 (with venv), faketime and git. The suite's pinned Python dependencies go into a
# virtualenv of their own (~/.cache/fwgate-tuf-conformance-venv); fwgate is built --release
# (or FWGATE_BIN names the binary to test).
# The exit status is pytest's: non-zero when any test failed or the suite could not run.
set -euo pipefail

suite="${1:?usage: bash bench/tuf_conformance.sh PATH-TO-tuf-conformance [pytest args]}"
shift
tag="${TUF_CONFORMANCE_TAG:-v2.4.0}"
here="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fwgate-target}"
venv="${TUF_CONFORMANCE_VENV:-$HOME/.cache/fwgate-tuf-conformance-venv}"

command -v faketime >/dev/null || { echo "faketime is missing (Debian: apt-get install faketime)" >&2; exit 2; }
# The tag's tree, unpacked beside the checkout, so the checkout itself is left as it is.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if git -C "$suite" rev-parse --git-dir >/dev/null 2>&1; then
    git -C "$suite" archive "$tag" | tar -x -C "$work"
elif [ -d "$suite/tuf_conformance" ]; then
    echo "warning: $suite is not a git checkout; running it as it is, not $tag" >&2
    cp -r "$suite/." "$work"
else
    echo "$suite is not a tuf-conformance checkout" >&2
    exit 2
fi

if [ ! -x "$venv/bin/pytest" ] || ! cmp -s "$work/pyproject.toml" "$venv/.suite-pyproject.toml"; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q -e "$work" 2>/dev/null || "$venv/bin/pip" install -q "$work"
    cp "$work/pyproject.toml" "$venv/.suite-pyproject.toml"
fi

bin="${FWGATE_BIN:-}"
if [ -z "$bin" ]; then
    (cd "$here" && cargo build --release --locked --bin fwgate)
    bin="$CARGO_TARGET_DIR/release/fwgate"
fi
entry="$work/fwgate-tuf-client"
printf '#!/bin/sh\nexec "%s" tuf client "$@"\n' "$bin" >"$entry"
chmod +x "$entry"

report="$work/report.json"
set +e
(cd "$work" && "$venv/bin/pytest" tuf_conformance --entrypoint "$entry" -p no:cacheprovider \
    --json-report --json-report-file="$report" -q "$@" >"$work/pytest.log" 2>&1)
status=$?
set -e
if [ ! -s "$report" ]; then
    cat "$work/pytest.log" >&2
    echo "the suite did not run" >&2
    exit 2
fi
"$venv/bin/python3" - "$report" "$tag" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
tests = r["tests"]
passed = [t for t in tests if t["outcome"] == "passed"]
failed = [t for t in tests if t["outcome"] != "passed"]
print(f"tuf-conformance {sys.argv[2]}: {len(passed)} of {len(tests)} passed")
for t in failed:
    msg = (t.get("call") or t.get("setup") or {}).get("crash", {}).get("message", "")
    print(f"  {t['outcome']:8} {t['nodeid'].split('::')[-1]}: {msg.splitlines()[0][:160] if msg else ''}")
EOF
exit $status

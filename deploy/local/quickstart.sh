#!/usr/bin/env bash
# Local quickstart: builds Sigil, starts sigil-server (embedded SQLite, self-signed CA, trust
# domain example.org) on a temp dir, registers the current user's uid as
# spiffe://example.org/quickstart, and shows the trust bundle and the entry.
#
# Status: the node agent and the Workload API (issues 3 and 4) are not built yet, so this script
# stops at the server side; it will start an agent and fetch the SVID once they exist.
#
# Usage: deploy/local/quickstart.sh [--once]   (--once: exit after set-up instead of waiting)
set -euo pipefail

ONCE=0
for arg in "$@"; do
  case "$arg" in
    --once) ONCE=1 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
echo "==> building (cargo build --bins)"
cargo build --quiet --bins
BIN="$ROOT/target/debug"

WORK="$(mktemp -d -t sigil-quickstart-XXXXXX)"
SOCK="$WORK/server/admin.sock"
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  echo "==> stopped; files kept in $WORK"
}
trap cleanup EXIT INT TERM

echo "==> starting sigil-server (logs: $WORK/server.log)"
"$BIN/sigil-server" run --trust-domain example.org --data-dir "$WORK/server/data" \
  --admin-socket "$SOCK" --bind-address 127.0.0.1:0 --health-address 127.0.0.1:0 \
  >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 100); do
  if "$BIN/sigil-server" healthcheck --admin-socket "$SOCK" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then cat "$WORK/server.log" >&2; exit 1; fi
  sleep 0.1
done
"$BIN/sigil-server" healthcheck --admin-socket "$SOCK"

echo "==> registering spiffe://example.org/quickstart for uid $(id -u)"
TOKEN_JSON="$("$BIN/sigil-server" token generate --admin-socket "$SOCK" --spiffe-id spiffe://example.org/quickstart-node --output json)"
"$BIN/sigil-server" entry create --admin-socket "$SOCK" \
  --parent-id spiffe://example.org/quickstart-node \
  --spiffe-id spiffe://example.org/quickstart \
  --selector "unix:uid:$(id -u)"

"$BIN/sigil-server" bundle show --admin-socket "$SOCK" >"$WORK/bundle.pem"
echo "==> trust bundle written to $WORK/bundle.pem"
echo "==> join token for an agent: $(printf '%s' "$TOKEN_JSON" | sed -n 's/.*"token": *"\([^"]*\)".*/\1/p')"
echo "==> admin socket: $SOCK   data: $WORK/server/data"
echo "NOTE: sigil-agent (issue 3) and the Workload API (issue 4) are not implemented yet;"
echo "      the SVID fetch step of this quickstart arrives with them."

if [ "$ONCE" = 1 ]; then exit 0; fi
echo "==> server running; Ctrl-C to stop"
wait "$SERVER_PID"

#!/usr/bin/env bash
# Local quickstart: builds Sigil, starts sigil-server (embedded SQLite, self-signed CA, trust
# domain example.org) on a temp dir, registers the current user's uid as
# spiffe://example.org/quickstart, and shows the trust bundle and the entry.
#
# Then it starts sigil-agent with a join token; the agent attests, syncs the entry and mints the
# workload's SVID, shown with `sigil-agent status`. Status: fetching that SVID through the SPIFFE
# Workload API is issue 4; until then the script shows the agent's cache instead.
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
AGENT_PID=""
cleanup() {
  if [ -n "$AGENT_PID" ] && kill -0 "$AGENT_PID" 2>/dev/null; then
    kill -TERM "$AGENT_PID" 2>/dev/null || true
    wait "$AGENT_PID" 2>/dev/null || true
  fi
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
TOKEN="$(printf '%s' "$TOKEN_JSON" | sed -n 's/.*"token": *"\([^"]*\)".*/\1/p')"
NODE_ADDR="$(sed -n 's/.*node_address=\([0-9.:]*\).*/\1/p' "$WORK/server.log" | tail -n 1)"

echo "==> starting sigil-agent (logs: $WORK/agent.log)"
AGENT_ADMIN="$WORK/agent/admin/admin.sock"
"$BIN/sigil-agent" run --trust-domain example.org --server-address "$NODE_ADDR" \
  --trust-bundle "$WORK/bundle.pem" --join-token "$TOKEN" --data-dir "$WORK/agent/data" \
  --socket-path "$WORK/agent/public/api.sock" --admin-socket "$AGENT_ADMIN" \
  --health-address 127.0.0.1:0 >"$WORK/agent.log" 2>&1 &
AGENT_PID=$!
for _ in $(seq 1 100); do
  if "$BIN/sigil-agent" status --admin-socket "$AGENT_ADMIN" --output json 2>/dev/null \
      | grep -q '"spiffe_id": "spiffe://example.org/quickstart"'; then break; fi
  if ! kill -0 "$AGENT_PID" 2>/dev/null; then cat "$WORK/agent.log" >&2; exit 1; fi
  sleep 0.1
done
"$BIN/sigil-agent" status --admin-socket "$AGENT_ADMIN"
echo "==> admin sockets: server $SOCK, agent $AGENT_ADMIN; data in $WORK"
echo "NOTE: the SPIFFE Workload API (issue 4) is not implemented yet: the SVID above is held by the"
echo "      agent; serving it to the workload over $WORK/agent/public/api.sock comes next."

if [ "$ONCE" = 1 ]; then exit 0; fi
echo "==> server and agent running; Ctrl-C to stop"
wait "$SERVER_PID"

#!/usr/bin/env bash
# Local quickstart: builds Sigil, starts sigil-server (embedded SQLite, self-signed CA, trust
# domain example.org) and sigil-agent (join token) on a temp dir, registers the current user's
# uid as spiffe://example.org/quickstart, then fetches that SVID through the SPIFFE Workload API
# exactly as a workload would (SPIFFE_ENDPOINT_SOCKET) and writes it to files. Then it keeps
# running and prints every rotation until Ctrl-C, which stops both processes.
#
# Usage: deploy/local/quickstart.sh [--once] [--ttl DURATION]
#   --once          exit after the first fetch
#   --ttl 2m        X509-SVID lifetime of the quickstart entry (default 1h: rotates every ~30 min;
#                   at least 1m, the shortest TTL the server accepts)
# Environment: SIGIL_BIN_DIR=DIR uses the binaries in DIR instead of building them.
set -euo pipefail

ONCE=0
TTL=""
while [ $# -gt 0 ]; do
  case "$1" in
    --once) ONCE=1 ;;
    --ttl) TTL="${2:?--ttl needs a duration, e.g. 2m}"; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
if [ -n "${SIGIL_BIN_DIR:-}" ]; then
  # Binaries built elsewhere (a release build, a package, the test harness's).
  BIN="$SIGIL_BIN_DIR"
else
  # The root package is the shared library: the binaries are in the two member packages, and
  # cargo puts them in its target directory, wherever CARGO_TARGET_DIR or .cargo/config say.
  echo "==> building sigil-server and sigil-agent (cargo build -p sigil-server -p sigil-agent)"
  cargo build -p sigil-server -p sigil-agent --bins
  TARGET_DIR="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
  BIN="${TARGET_DIR:-$ROOT/target}/debug"
fi
for b in sigil-server sigil-agent; do
  if [ ! -x "$BIN/$b" ]; then
    echo "quickstart: $BIN/$b is missing; build with: cargo build -p sigil-server -p sigil-agent" >&2
    exit 1
  fi
done

# The daemons refuse socket directories (and directories above them) that group or others can
# write to: with a umask of 002 the directories made below would be group-writable.
umask 077
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
  --selector "unix:uid:$(id -u)" ${TTL:+--x509-svid-ttl "$TTL"}

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
export SPIFFE_ENDPOINT_SOCKET="unix://$WORK/agent/public/api.sock"
for _ in $(seq 1 100); do
  if [ -S "$WORK/agent/public/api.sock" ]; then break; fi
  if ! kill -0 "$AGENT_PID" 2>/dev/null; then cat "$WORK/agent.log" >&2; exit 1; fi
  sleep 0.1
done

echo "==> fetching the SVID through the Workload API (SPIFFE_ENDPOINT_SOCKET=$SPIFFE_ENDPOINT_SOCKET)"
"$BIN/sigil-agent" api fetch x509 --write "$WORK/svid"
echo
echo "    files: $WORK/svid/svid.pem (chain), $WORK/svid/svid.key (key, 0600), $WORK/svid/bundle.pem"
echo "    admin sockets: server $SOCK, agent $AGENT_ADMIN; logs and data in $WORK"
echo "    try: SPIFFE_ENDPOINT_SOCKET=$SPIFFE_ENDPOINT_SOCKET $BIN/sigil-agent api fetch jwt --audience demo"

if [ "$ONCE" = 1 ]; then exit 0; fi
echo "==> watching for rotations (every half TTL); Ctrl-C stops the agent and the server"
"$BIN/sigil-agent" api watch --write "$WORK/svid" || true

#!/usr/bin/env bash
# Builds SPIRE's spire-server and spire-agent into <target>/spire/bin, once: the tests that run
# real SPIRE next to Sigil (sigil-testkit's `spire` module) and bench/vs-spire.sh use them.
#
# A scratch Go module under <target>/spire/mod pins the release (`go get -tool …@VERSION`, so the
# module proxy checks every dependency against go.sum), then `go install` puts both binaries in
# <target>/spire/bin. <target>/spire/bin/VERSION is the stamp: written last, only after both
# binaries built and report the version; when it already names the version this does nothing.
# About 10 minutes on 2 cores the first time (Go modules and compilation), a second after.
#
# Usage: tests/spire/build.sh [TARGET_DIR]   (default: $CARGO_TARGET_DIR, else ./target)
# Prints the bin directory on its last line.
set -euo pipefail

SPIRE_VERSION=v1.13.3
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
TARGET="${1:-${CARGO_TARGET_DIR:-$ROOT/target}}"
BIN="$TARGET/spire/bin"
MOD="$TARGET/spire/mod"
STAMP="$BIN/VERSION"

if [ -x "$BIN/spire-server" ] && [ -x "$BIN/spire-agent" ] &&
  [ "$(cat "$STAMP" 2>/dev/null)" = "$SPIRE_VERSION" ]; then
  echo "==> SPIRE $SPIRE_VERSION up to date in $BIN"
  echo "$BIN"
  exit 0
fi
command -v go >/dev/null || {
  echo "error: building SPIRE $SPIRE_VERSION needs Go (>= 1.24): install it, then run $0" >&2
  exit 1
}
echo "==> building SPIRE $SPIRE_VERSION into $BIN (scratch module $MOD; ~10 minutes the first time)"
start=$SECONDS
rm -f "$STAMP"
mkdir -p "$MOD" "$BIN"
(
  cd "$MOD"
  [ -f go.mod ] || go mod init spirebuild >/dev/null 2>&1
  export GOFLAGS=-mod=mod GOTOOLCHAIN=local
  # One "go: added" line per module (hundreds) says nothing; errors still show.
  go get -tool "github.com/spiffe/spire/cmd/spire-server@$SPIRE_VERSION" \
    "github.com/spiffe/spire/cmd/spire-agent@$SPIRE_VERSION" 2>&1 | { grep -v '^go: added ' || true; }
  GOBIN="$BIN" go install -trimpath github.com/spiffe/spire/cmd/spire-server \
    github.com/spiffe/spire/cmd/spire-agent
)
# Built from the module rather than SPIRE's Makefile, they call themselves 1.13.3-dev-unk.
for b in spire-server spire-agent; do
  got=$("$BIN/$b" --version 2>&1 | tr -d '\r' | tail -1)
  case "$got" in "${SPIRE_VERSION#v}" | "${SPIRE_VERSION#v}"-*) ;; *)
    echo "error: $BIN/$b reports version '$got', expected ${SPIRE_VERSION#v}" >&2
    exit 1
    ;;
  esac
done
echo "$SPIRE_VERSION" >"$STAMP"
echo "==> SPIRE $SPIRE_VERSION built in $((SECONDS - start)) s"
echo "$BIN"

#!/usr/bin/env bash
# Sigil against SPIRE 1.13.3 on this machine, same run, one client (BENCHMARKS.md, "Sigil vs
# SPIRE"). Builds SPIRE into target/spire/bin once (tests/spire/build.sh, which the tests use
# too), builds Sigil's release binaries and the bench,
# runs tests/benches/vs_spire.rs (three runs by default), writes CSV and table.md to
# target/vs-spire/ and PNG plots to bench/plots/.
#
# Usage: bench/vs-spire.sh            full mode (the recorded figures; about an hour)
#        VS_SPIRE_QUICK=1 bench/vs-spire.sh   small sizes, one run (a few minutes)
# Other variables (sizes, rows, runs): see the header of tests/benches/vs_spire.rs.
# Not part of .ci/run.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="${VS_SPIRE_OUT:-$TARGET/vs-spire}"

# SPIRE: built once into $TARGET/spire/bin by the script the tests use (version pinned there).
if [ -n "${VS_SPIRE_BIN:-}" ]; then
  SPIRE_BIN="$VS_SPIRE_BIN"
else
  "$ROOT/tests/spire/build.sh" "$TARGET"
  SPIRE_BIN="$TARGET/spire/bin"
fi

echo "==> building Sigil (release) and the bench"
# One build (release profile) for the binaries and the bench executable; `cargo bench` would
# compile everything a second time in its own profile.
EXE="$(cargo build --release --workspace --bins --bench vs_spire \
  --message-format=json-render-diagnostics |
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "vs_spire" and m.get("executable"):
        print(m["executable"])')"
[ -x "$EXE" ] || { echo "vs-spire: the bench executable was not built" >&2; exit 1; }

echo "==> running (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
mkdir -p "$OUT"
VS_SPIRE_BIN="$SPIRE_BIN" VS_SPIRE_OUT="$OUT" "$EXE" 2> >(tee "$OUT/bench.log" >&2) |
  tee "$OUT/report.md"

echo "==> plots"
VENV="$TARGET/vs-spire-venv"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet matplotlib
fi
"$VENV/bin/python" "$ROOT/bench/vs_spire_plot.py" "$OUT" "${VS_SPIRE_PLOTS:-$ROOT/bench/plots}"

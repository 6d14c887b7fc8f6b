#!/bin/sh
# Start-up cost of the shipped onedir launcher against a onefile build of the same spec,
# the interpreter floor and a Go plugin: hyperfine -N (no shell) on CNI_COMMAND=VERSION.
# Builds the onefile variant first (build/onefile/calico). Needs `make build` for dist/.
#   RUNS (default 30), WARMUP (default 3), CALICO_BIN_DIR (default dist/bin),
#   CALICO_BUNDLE (default: calico-bundle/calico beside the bin dir).
set -eu
cd "$(dirname "$0")/.."
RUNS=${RUNS:-30}
WARMUP=${WARMUP:-3}
BIN_DIR=${CALICO_BIN_DIR:-dist/bin}
BUNDLE=${CALICO_BUNDLE:-$(dirname "$BIN_DIR")/calico-bundle/calico}

for exe in "$BIN_DIR/calico" "$BUNDLE" /usr/lib/cni/ptp; do
  [ -x "$exe" ] || { echo "startup.sh: $exe is missing (run 'make build')" >&2; exit 1; }
done

echo "startup.sh: building the onefile variant (build/onefile/calico)" >&2
CALICO_ONEFILE=1 .venv/bin/pyinstaller --noconfirm --log-level WARN \
  --distpath build/onefile --workpath build/onefile-work build.spec

mkdir -p bench/results
raw=bench/results/startup-hyperfine-$(date +%Y%m%d-%H%M%S).json
# Every command inherits it; python3 -c pass ignores it. hyperfine gives stdin /dev/null.
export CNI_COMMAND=VERSION
hyperfine -N --warmup "$WARMUP" --runs "$RUNS" --export-json "$raw" \
  -n "Go ptp VERSION" /usr/lib/cni/ptp \
  -n "python3 -I -S -c pass" "/usr/bin/python3 -I -S -c pass" \
  -n "calico onedir via launcher (shipped)" "$BIN_DIR/calico" \
  -n "calico onedir bundle, no launcher" "$BUNDLE" \
  -n "calico onefile" build/onefile/calico

# The same summary table and JSON layout as the other benchmarks.
.venv/bin/python - "$raw" <<'EOF'
import json
import sys

sys.path.insert(0, "bench")
from cni_bench import Report, Row, percentile

raw_path = sys.argv[1]
with open(raw_path) as f:
    results = json.load(f)["results"]
keys = "abcdefghij"
columns = {keys[i]: r["command"] for i, r in enumerate(results)}
ms = {keys[i]: [t * 1000 for t in r["times"]] for i, r in enumerate(results)}
cpu = {keys[i]: (r["user"] + r["system"]) * 1000 for i, r in enumerate(results)}
report = Report("start-up, CNI_COMMAND=VERSION", columns, {"hyperfine_json": raw_path})
report.rows = [
    Row("p50", "ms", {k: round(percentile(v, 50), 2) for k, v in ms.items()}),
    Row("p90", "ms", {k: round(percentile(v, 90), 2) for k, v in ms.items()}),
    Row("CPU user+sys mean", "ms", {k: round(v, 2) for k, v in cpu.items()}),
]
report.print()
print(f"\nwritten to {report.write('startup')}")
EOF

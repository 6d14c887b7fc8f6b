#!/bin/sh
# Start-up cost of the shipped onedir executable (a symlink to the bundle) against a
# onefile build of the same spec, the interpreter floor and a Go plugin, standalone and
# handed to a node agent (the client's floor): hyperfine -N on CNI_COMMAND=VERSION.
# Builds the onefile variant first (build/onefile/calico). Needs `make build` for dist/;
# run as root (the agent serves root only).
#   RUNS (default 30), WARMUP (default 3), CALICO_BIN_DIR (default dist/bin).
set -eu
cd "$(dirname "$0")/.."
RUNS=${RUNS:-30}
WARMUP=${WARMUP:-3}
BIN_DIR=${CALICO_BIN_DIR:-dist/bin}

for exe in "$BIN_DIR/calico" /usr/lib/cni/ptp; do
  [ -x "$exe" ] || { echo "startup.sh: $exe is missing (run 'make build')" >&2; exit 1; }
done

echo "startup.sh: building the onefile variant (build/onefile/calico)" >&2
CALICO_ONEFILE=1 .venv/bin/pyinstaller --noconfirm --log-level WARN \
  --distpath build/onefile --workpath build/onefile-work build.spec

mkdir -p bench/results
work=$(mktemp -d /tmp/startup-bench.XXXXXX)
agent_pid=
cleanup() {
  [ -n "$agent_pid" ] && kill "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
# The layout before the symlinks: a two-line sh launcher in front of the bundle.
printf '#!/bin/sh\nexec %s "$@"\n' "$(readlink -f "$BIN_DIR/calico")" > "$work/calico-sh"
chmod 0755 "$work/calico-sh"
mkdir -m 0700 "$work/agent"
CNI_COMMAND= "$BIN_DIR/calico" agent --socket "$work/agent/agent.sock" 2>"$work/agent.log" &
agent_pid=$!
i=0
until [ -S "$work/agent/agent.sock" ]; do
  i=$((i + 1))
  [ "$i" -lt 100 ] || { echo "startup.sh: the agent did not start:" >&2; cat "$work/agent.log" >&2; exit 1; }
  sleep 0.1
done
raw=bench/results/startup-hyperfine-$(date +%Y%m%d-%H%M%S).json
# Every command inherits them; the others ignore them. hyperfine gives stdin /dev/null.
# The standalone rows point the client at a socket that does not exist (through `env`,
# ~1 ms, negligible there); the agent rows exec the client directly.
export CNI_COMMAND=VERSION CALICO_AGENT_SOCKET="$work/agent/agent.sock"
no_agent="env CALICO_AGENT_SOCKET=$work/no-agent.sock"
hyperfine -N --warmup "$WARMUP" --runs "$RUNS" --export-json "$raw" \
  -n "Go ptp VERSION" /usr/lib/cni/ptp \
  -n "python3 -I -S -c pass" "/usr/bin/python3 -I -S -c pass" \
  -n "calico onedir, handed to the agent (shipped link)" "$BIN_DIR/calico" \
  -n "calico onedir, handed to the agent, behind an sh launcher" "$work/calico-sh" \
  -n "calico onedir, standalone (shipped link)" "$no_agent $BIN_DIR/calico" \
  -n "calico onefile, standalone" "$no_agent build/onefile/calico"

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

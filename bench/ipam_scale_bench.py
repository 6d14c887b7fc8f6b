"""IPAM ADD/DEL cost as a node and a cluster grow: real calico-ipam v3.31.7 beside ours.

Two ways a datastore grows, each at several levels:
  - node fill: the measured node already holds N addresses (0, 1,000, 5,000, 20,000: up
    to 313 /26 blocks), so an ADD must find the node's block with room;
  - pool fill: other nodes own B blocks of the pool (1,000, 5,000), and every measured
    ADD is on a node of its own, so it claims a new block.
Columns, all on one etcd and one local SQLite file: real calico-ipam (etcd only), ours
exec'd standalone, ours handed to `calico agent`. Every call is a whole process, timed
from spawn to reap, one call of each column in turn with the order rotating; etcd's own
count of KV requests (Range, Txn; our JSON gateway's included: etcd re-issues each as one
gRPC request) is read before and after each call, outside the timing.

The fill is written by our engine in-process (bulk requests: one allocation attribute per
block); real Calico reads and allocates into it. Each level's first ADD and DEL per column
(the warm-up) are left out of the percentiles; the first ADD after a fill finds the
node's hints outdated, and its cost is shown in its own row.

Run as root after `make build`: .venv/bin/python bench/ipam_scale_bench.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cni_bench import (
    BenchFailure,
    Report,
    Row,
    cni_env,
    create_pool,
    open_datastore,
    percentile,
    publish,
    raise_on_sigterm,
    run_plugin,
    start_bench_etcd,
)

# cni_bench has put the repository on sys.path.
from tests.agent_fixture import AgentProcess
from tests.calicoctl_support import ORACLE
from tests.etcd.cni_support import kv_requests
from tests.etcd_fixture import EtcdCluster
from tests.harness import bin_dir

POOL_CIDR = "10.96.0.0/12"  # 16,384 /26 blocks
MAX_BLOCKS_PER_HOST = 1000  # 20,000 addresses are 313 blocks; Calico's default cap is 20
BLOCKS_PER_OTHER_NODE = 20
BLOCK_ADDRESSES = 64
# IPAM plugins get the pod's netns path but never enter it; this one need not exist.
UNUSED_NETNS = "/var/run/netns/ipam-scale-bench-unused"


@dataclass(frozen=True)
class Column:
    """One implementation on one datastore."""

    key: str
    title: str
    datastore: str  # "etcd" or "local"
    real: bool = False
    agent: bool = False


COLUMNS = [
    Column("a", "real calico-ipam v3.31.7, etcd", "etcd", real=True),
    Column("b", "ours standalone, etcd", "etcd"),
    Column("c", "ours via agent, etcd", "etcd", agent=True),
    Column("d", "ours standalone, local", "local"),
    Column("e", "ours via agent, local", "local", agent=True),
]


@dataclass
class Bed:
    """The running pieces: etcd, the local file, the agent, the binaries."""

    root: Path
    etcd: EtcdCluster | None
    agent: AgentProcess | None
    ours: str  # our calico-ipam
    real: str  # a calico-ipam link to the oracle's binary
    scenario: str = "node"  # each starts from empty datastores and no node hints

    def keys(self, column: Column) -> dict[str, Any]:
        """The netconf keys choosing the column's datastore and its own node lock."""
        lock = {"ipam_lock_file": str(self.root / f"{self.scenario}-{column.key}.lock")}
        if column.datastore == "local":
            path = str(self.root / f"{self.scenario}.db")
            return {"datastore_type": "local", "local_datastore_path": path, **lock}
        assert self.etcd is not None
        return {**self.etcd.netconf(), **lock}

    def netconf(self, column: Column, node: str) -> bytes:
        conf = {
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "type": "calico",
            "nodename": node,
            "nodename_file_optional": True,
            "ipam": {"type": "calico-ipam"},
            **self.keys(column),
        }
        return json.dumps(conf).encode()

    def env(self, column: Column, command: str, container_id: str) -> dict[str, str]:
        env = cni_env(command, container_id, UNUSED_NETNS, os.path.dirname(self.binary(column)))
        if column.agent:
            assert self.agent is not None
            env.update(self.agent.env())
        return env

    def binary(self, column: Column) -> str:
        return self.real if column.real else self.ours

    def datastores(self, columns: list[Column]) -> dict[str, dict[str, Any]]:
        """Netconf keys of each datastore in use (for the in-process setup and fill)."""
        return {c.datastore: self.keys(c) for c in columns}


@dataclass
class Calls:
    """One column's calls at one level."""

    add_ms: list[float] = field(default_factory=list)
    del_ms: list[float] = field(default_factory=list)
    add_rpcs: list[float] = field(default_factory=list)
    del_rpcs: list[float] = field(default_factory=list)
    etcd_cpu_ms: list[float] = field(default_factory=list)  # per ADD
    first_add_ms: float = 0.0
    first_add_rpcs: float | None = None

    def record(self, command: str, done: Call) -> None:
        if command == "ADD":
            self.add_ms.append(done.wall_ms)
            if done.rpcs is not None and done.etcd_cpu_ms is not None:
                self.add_rpcs.append(done.rpcs)
                self.etcd_cpu_ms.append(done.etcd_cpu_ms)
        else:
            self.del_ms.append(done.wall_ms)
            if done.rpcs is not None:
                self.del_rpcs.append(done.rpcs)


def process_cpu_ms(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------ datastore set-up


def seed(keys: dict[str, Any]) -> None:
    """The pool, and strict affinity with room for 313 blocks per node (real calicoctl
    refuses a block limit without strict affinity)."""
    from libcalico.datastore.base import KVPair
    from libcalico.model import IPAMConfig, IPAMConfigKey

    with open_datastore(keys) as store:
        create_pool(store, POOL_CIDR)
        config = IPAMConfig(strict_affinity=True, max_blocks_per_host=MAX_BLOCKS_PER_HOST)
        store.create(KVPair(IPAMConfigKey(), config))


def ensure_nodes(keys: dict[str, Any], nodes: list[str]) -> None:
    from ipam_plugin.engine import IPAM

    with open_datastore(keys) as store:
        engine = IPAM(store)
        for node in nodes:
            engine.ensure_node(node)


def fill(keys: dict[str, Any], wanted: dict[str, int], tag: str) -> float:
    """`wanted[node]` more addresses on each node, one bulk request each; seconds taken."""
    from ipam_plugin.engine import IPAM, AutoAssignRequest

    started = time.monotonic()
    with open_datastore(keys) as store:
        engine = IPAM(store)
        for node, count in wanted.items():
            if count <= 0:
                continue
            engine.ensure_node(node)
            v4, _ = engine.auto_assign(
                AutoAssignRequest(f"fill.{node}.{tag}", node, {"node": node}, num_v4=count)
            )
            if len(v4.ips) != count:
                raise BenchFailure(f"fill: {node} got {len(v4.ips)} of {count}: {v4.msgs}")
    return time.monotonic() - started


# ------------------------------------------------------------------ measuring


@dataclass
class Call:
    """One plugin process and what etcd did for it (None on the local datastore)."""

    wall_ms: float
    rpcs: float | None
    etcd_cpu_ms: float | None


def call(bed: Bed, column: Column, command: str, container_id: str, node: str) -> Call:
    """Run one ADD or DEL; etcd's counters are read around it, outside the timing."""
    member = bed.etcd.members[0] if bed.etcd and column.datastore == "etcd" else None
    pid = member.process.pid if member and member.process else 0
    rpcs, cpu = (kv_requests(member), process_cpu_ms(pid)) if member else (0, 0.0)
    done = run_plugin(
        bed.binary(column), bed.env(column, command, container_id), bed.netconf(column, node)
    )
    if member:
        cpu = process_cpu_ms(pid) - cpu  # before the scrape below, which costs etcd too
        rpcs = kv_requests(member) - rpcs
    if done.code != 0 or (command == "ADD" and not (done.json() or {}).get("ips")):
        raise BenchFailure(f"({column.key}) {command} {container_id}: {done.describe()}")
    return Call(done.wall_ms, rpcs if member else None, cpu if member else None)


def measure_level(
    bed: Bed, columns: list[Column], node_of: Any, n: int, warmup: int
) -> dict[str, Calls]:
    """ADD then DEL, `warmup` + n calls per column, one column at a time in rotation."""
    calls = {c.key: Calls() for c in columns}
    tag = uuid.uuid4().hex[:8]
    for command in ("ADD", "DEL"):
        for i in range(warmup + n):
            shift = i % len(columns)
            for column in columns[shift:] + columns[:shift]:
                rec = calls[column.key]
                done = call(
                    bed, column, command, f"scale-{column.key}-{tag}-{i}", node_of(column, i)
                )
                if command == "ADD" and i == 0:
                    rec.first_add_ms, rec.first_add_rpcs = done.wall_ms, done.rpcs
                if i >= warmup:
                    rec.record(command, done)
    return calls


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def level_rows(label: str, calls: dict[str, Calls], first: bool = True) -> list[Row]:
    def row(metric: str, unit: str, pick: Any) -> Row:
        values = {key: pick(rec) for key, rec in calls.items()}
        kept = {key: round(value, 1) for key, value in values.items() if value is not None}
        return Row(f"{label}: {metric}", unit, kept)

    rows = [
        row("ADD p50", "ms", lambda r: percentile(r.add_ms, 50)),
        row("ADD p90", "ms", lambda r: percentile(r.add_ms, 90)),
        row("DEL p50", "ms", lambda r: percentile(r.del_ms, 50)),
        row("DEL p90", "ms", lambda r: percentile(r.del_ms, 90)),
        row("etcd RPCs per ADD (mean)", "n", lambda r: mean(r.add_rpcs)),
        row("etcd RPCs per ADD (max)", "n", lambda r: max(r.add_rpcs) if r.add_rpcs else None),
        row("etcd RPCs per DEL (mean)", "n", lambda r: mean(r.del_rpcs)),
        row("etcd CPU per ADD", "ms", lambda r: mean(r.etcd_cpu_ms)),
    ]
    if first:
        rows += [
            row("first ADD after the fill", "ms", lambda r: r.first_add_ms),
            row("first ADD after the fill: etcd RPCs", "n", lambda r: r.first_add_rpcs),
        ]
    return rows


# ------------------------------------------------------------------ scenarios


EMPTY = "0"  # the key suffix of a column's twin, measured on an empty node in the same loop


def twin(column: Column) -> Column:
    return dataclasses.replace(column, key=column.key + EMPTY, title=f"{column.title}, empty node")


def node_fill(
    bed: Bed, columns: list[Column], levels: list[int], n: int, warmup: int
) -> dict[int, dict[str, Calls]]:
    """Each column's node holds `level` addresses (cumulative fills). Each column's twin
    runs in the same loop on a node that stays empty, so that a change of the machine's
    load during the run is not taken for the cost of the fill."""
    nodes = {c.key: f"scale-node-{c.key}" for c in columns}
    twins = [twin(c) for c in columns]
    nodes.update({t.key: f"scale-empty-{t.key}" for t in twins})
    results = {}
    filled = 0
    for level in levels:
        for datastore, keys in bed.datastores(columns).items():
            mine = [c for c in columns + twins if c.datastore == datastore]
            ensure_nodes(keys, [nodes[c.key] for c in mine])
            wanted = {nodes[c.key]: level - filled for c in mine if c in columns}
            seconds = fill(keys, wanted, str(level))
            print(f"node fill {level:,}: {datastore} filled in {seconds:.1f} s", file=sys.stderr)
        filled = level
        print(f"node fill {level:,}: measuring", file=sys.stderr, flush=True)
        node_of = lambda c, i: nodes[c.key]  # noqa: E731
        results[level] = measure_level(bed, columns + twins, node_of, n, warmup)
    return results


def free_addresses(keys: dict[str, Any], node: str) -> int:
    """Free addresses in the node's affine blocks."""
    from libcalico.model import BlockAffinityListOptions, BlockKey

    with open_datastore(keys) as store:
        cidrs = [kvp.key.cidr for kvp in store.list(BlockAffinityListOptions(node, 4))]
        blocks = store.read_many([BlockKey(cidr) for cidr in cidrs])
    return sum(len(kvp.value.unallocated) for kvp in blocks if kvp is not None)


def claims_on_a_full_node(bed: Bed, columns: list[Column], n: int) -> dict[str, Calls]:
    """Each column's node (as the node fill left it) has every block full, so each ADD
    claims the next block: before each round, untimed, the fill tops the nodes up again."""
    nodes = {c.key: f"scale-node-{c.key}" for c in columns}
    calls = {c.key: Calls() for c in columns}
    tag = uuid.uuid4().hex[:8]
    for command in ("ADD", "DEL"):
        for i in range(n):
            if command == "ADD":
                for datastore, keys in bed.datastores(columns).items():
                    mine = [nodes[c.key] for c in columns if c.datastore == datastore]
                    fill(keys, {node: free_addresses(keys, node) for node in mine}, f"full{i}")
            shift = i % len(columns)
            for column in columns[shift:] + columns[:shift]:
                cid = f"scale-claim-{column.key}-{tag}-{i}"
                calls[column.key].record(
                    command, call(bed, column, command, cid, nodes[column.key])
                )
    return calls


def pool_fill(
    bed: Bed, columns: list[Column], levels: list[int], n: int, warmup: int
) -> dict[int, dict[str, Calls]]:
    """Other nodes own `level` blocks; every measured call is on a node of its own."""
    results = {}
    owners = 0
    for level in levels:
        wanted_owners = -(-level // BLOCKS_PER_OTHER_NODE)
        for datastore, keys in bed.datastores(columns).items():
            wanted = {
                f"other-{i:04d}": BLOCKS_PER_OTHER_NODE * BLOCK_ADDRESSES
                for i in range(owners, wanted_owners)
            }
            seconds = fill(keys, wanted, "pool")
            print(f"pool fill {level:,}: {datastore} filled in {seconds:.1f} s", file=sys.stderr)
        owners = wanted_owners

        def node_of(column: Column, i: int, level: int = level) -> str:
            return f"scale-new-{column.key}-{level}-{i}"

        for datastore, keys in bed.datastores(columns).items():
            ensure_nodes(
                keys,
                [
                    node_of(c, i)
                    for c in columns
                    if c.datastore == datastore
                    for i in range(warmup + n)
                ],
            )
        print(f"pool fill {level:,}: measuring", file=sys.stderr, flush=True)
        results[level] = measure_level(bed, columns, node_of, n, warmup)
    return results


# ------------------------------------------------------------------ the run


@contextmanager
def testbed(columns: list[Column], bins: Path, root: Path) -> Iterator[Bed]:
    """etcd (if a column uses it), the local file, the agent (if a column uses it), the
    binaries; all stopped and removed when the block ends, however it ends."""
    with ExitStack() as stack:
        etcd = None
        if any(c.datastore == "etcd" for c in columns):
            etcd = start_bench_etcd(root / "etcd")
            stack.callback(etcd.stop)
        real_dir = root / "real-bin"
        real_dir.mkdir()
        real = real_dir / "calico-ipam"  # the oracle's binary takes its role from the name
        if any(c.real for c in columns):
            if not (ORACLE / "calico").is_file():
                raise BenchFailure(f"real Calico is missing: {ORACLE}/calico")
            real.symlink_to(ORACLE / "calico")
        ours = bins.absolute() / "calico-ipam"
        if not ours.exists():
            raise BenchFailure(f"{ours} is missing: run `make build` first")
        agent = None
        if any(c.agent for c in columns):
            agent = AgentProcess.start(str(bins.absolute() / "calico"), directory=root / "agent")
            stack.callback(agent.remove)
        yield Bed(root, etcd, agent, str(ours), str(real))
        if agent is not None:
            status = agent.stop()
            if status != 0 or not agent.served():
                raise BenchFailure(f"agent exited {status}, {len(agent.served())} requests")


def start_scenario(bed: Bed, columns: list[Column], scenario: str) -> None:
    """Empty datastores (etcd wiped, a new SQLite file), seeded."""
    if bed.etcd is not None:
        bed.etcd.wipe()
    bed.scenario = scenario
    for keys in bed.datastores(columns).values():
        seed(keys)


def build_report(
    columns: list[Column],
    node_results: dict[int, dict[str, Calls]],
    claims: dict[str, Calls],
    pool_results: dict[int, dict[str, Calls]],
    settings: dict[str, Any],
) -> Report:
    report = Report("IPAM at scale", {c.key: c.title for c in columns}, settings)
    for level, calls in node_results.items():
        report.rows += level_rows(f"node holds {level:,}", calls)
        empty = {c.key: percentile(calls[c.key + EMPTY].add_ms, 50) for c in columns}
        report.rows.append(
            Row(f"node holds {level:,}: ADD p50, an empty node in the same loop", "ms", empty)
        )
    last = max(node_results)
    report.rows += level_rows(f"node holds {last:,}+, all full: ADD claims", claims, first=False)
    for level, calls in pool_results.items():
        report.rows += level_rows(f"{level:,} other blocks, new node", calls)
    report.notes += targets(columns, node_results, pool_results)
    return report


def targets(
    columns: list[Column],
    node_results: dict[int, dict[str, Calls]],
    pool_results: dict[int, dict[str, Calls]],
) -> list[str]:
    """The issue's targets, read off this run: the agent's worst level, and how much each
    column's ADD on the fullest node costs against the same column on an empty node in
    the same loop (and against the emptiest level, which ran earlier)."""
    notes = []
    everything = [*node_results.values(), *pool_results.values()]
    fullest, emptiest = max(node_results), min(node_results)
    for column in columns:
        recs = [calls[column.key] for calls in everything]
        if column.agent:
            worst = max(percentile(r.add_ms, 50) for r in recs)
            line = f"({column.key}) worst ADD p50 over every level: {worst:.1f} ms"
            if column.datastore == "etcd":
                rpcs = max(mean(r.add_rpcs) or 0.0 for r in recs)
                line += f", worst mean etcd RPCs per ADD {rpcs:.1f}"
            notes.append(line)
        calls = node_results[fullest]
        full = percentile(calls[column.key].add_ms, 50)
        empty = percentile(calls[column.key + EMPTY].add_ms, 50)
        first = percentile(node_results[emptiest][column.key].add_ms, 50)
        notes.append(
            f"({column.key}) ADD p50 with {fullest:,} on the node / on an empty node in the "
            f"same loop: {full / empty:.2f} (/ at {emptiest:,}, earlier: {full / first:.2f})"
        )
    return notes


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=20, help="timed ADDs and DELs per column and level")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first, per level")
    parser.add_argument("--claims-n", type=int, default=10, help="ADDs claiming on a full node")
    parser.add_argument("--node-fills", default="0,1000,5000,20000", help="addresses per node")
    parser.add_argument("--pool-fills", default="1000,5000", help="blocks owned by other nodes")
    parser.add_argument("--columns", default=",".join(c.key for c in COLUMNS))
    parser.add_argument("--bin-dir", type=Path, default=bin_dir(), help="our launchers")
    return parser.parse_args(argv)


def levels(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str]) -> int:
    opts = parse_args(argv)
    if os.geteuid() != 0:
        print("ipam_scale_bench needs root (the node agent's socket)", file=sys.stderr)
        return 2
    by_key = {c.key: c for c in COLUMNS}
    columns = [by_key[key] for key in opts.columns.split(",")]
    raise_on_sigterm()
    settings = {
        "n": opts.n,
        "warmup": opts.warmup,
        "claims_n": opts.claims_n,
        "node_fills": levels(opts.node_fills),
        "pool_fills": levels(opts.pool_fills),
        "pool": POOL_CIDR,
        "max_blocks_per_host": MAX_BLOCKS_PER_HOST,
        "oracle": str(ORACLE),
        "bin_dir": str(opts.bin_dir),
    }

    def run() -> Report:
        with ExitStack() as stack:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ipam-scale-")))
            bed = stack.enter_context(testbed(columns, opts.bin_dir, tmp))
            start_scenario(bed, columns, "node")
            node_results = node_fill(bed, columns, settings["node_fills"], opts.n, opts.warmup)
            print("node full: measuring claims", file=sys.stderr, flush=True)
            claims = claims_on_a_full_node(bed, columns, opts.claims_n)
            start_scenario(bed, columns, "pool")
            pool_results = pool_fill(bed, columns, settings["pool_fills"], opts.n, opts.warmup)
        return build_report(columns, node_results, claims, pool_results, settings)

    return publish("ipam_scale_bench", "ipam-scale", run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

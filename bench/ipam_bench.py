"""IPAM allocation rate at 0 and at 10,000 already-allocated addresses in a /16.

Three ways to allocate, each from the same pre-filled state:
  (a) Go host-local, exec'd per allocation (the reference),
  (b) our calico-ipam executable in pool mode on the local SQLite datastore, exec'd,
  (c) the allocation engine in-process on the same SQLite file (what a warm agent pays).
The Calico fill is spread over FILL_NODES other nodes, as in a cluster (one node may own
at most 20 blocks, i.e. 1,280 addresses); the measured node starts with no block. The
host-local fill is 10,000 files in its dataDir, as 10,000 earlier ADDs leave them.
The two executables are interleaved per allocation. No root needed.

Run after `make build`: .venv/bin/python bench/ipam_bench.py
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cni_bench import (
    BenchFailure,
    Report,
    Row,
    bin_dir,
    calico_ipam_conf,
    cni_bin_dir,
    cni_env,
    create_pool,
    percentile,
    ptp_conf,
    raise_on_sigterm,
    run_plugin,
)

NODE = "bench-node"
POOL_CIDR = "10.82.0.0/16"
# IPAM plugins get the pod's netns path but never enter it; this one need not exist.
UNUSED_NETNS = "/var/run/netns/ipam-bench-unused"


@dataclass
class Fill:
    """One starting state: a Calico datastore and a host-local dataDir, both pre-filled."""

    count: int
    state: Path  # holds calico.db (what calico_ipam_conf points at) and host-local's dirs

    @property
    def db(self) -> Path:
        return self.state / "calico.db"


def prefill_calico(db: Path, count: int, nodes: int) -> None:
    """`count` addresses through the engine, one bulk request per node (seconds, not minutes)."""
    from ipam_plugin.datastore.local import LocalDatastore
    from ipam_plugin.engine import IPAM, AutoAssignRequest

    create_pool(db, POOL_CIDR)
    per_node, extra = divmod(count, nodes)
    with LocalDatastore(str(db)) as store:
        engine = IPAM(store)
        for i in range(nodes):
            wanted = per_node + (i < extra)
            if not wanted:
                continue
            host = f"fill-node-{i:03d}"
            engine.ensure_node(host)
            v4, _ = engine.auto_assign(
                AutoAssignRequest(f"fill.{host}", host, {"node": host}, num_v4=wanted)
            )
            if len(v4.ips) != wanted:
                raise BenchFailure(
                    f"pre-fill: {host} got {len(v4.ips)} of {wanted} addresses "
                    f"({'; '.join(v4.msgs)}); use more --fill-nodes"
                )


def prefill_host_local(conf: dict[str, Any], count: int) -> None:
    """`count` files from the range start on, and last_reserved_ip, as host-local leaves them."""
    from ipam_plugin.ranges import LINE_BREAK, RangeStore

    ipam = conf["ipam"]
    store = RangeStore(ipam["dataDir"], conf["name"])
    first = ipaddress.ip_network(ipam["subnet"]).network_address + 2  # .1 is the gateway
    with store.locked():
        for i in range(count):
            store.reserve(first + i, f"fill-{i}{LINE_BREAK}eth0", 0)


def prepare_fill(root: Path, count: int, nodes: int) -> Fill:
    fill = Fill(count, root / f"fill-{count}")
    fill.state.mkdir()
    prefill_calico(fill.db, count, nodes)
    prefill_host_local(ptp_conf(fill.state), count)
    return fill


def engine_latencies(db: Path, n: int) -> list[float]:
    """Per-allocation wall time (ms) of the engine on one open datastore, one handle each."""
    from ipam_plugin.datastore.local import LocalDatastore
    from ipam_plugin.engine import IPAM, AutoAssignRequest

    times = []
    with LocalDatastore(str(db)) as store:
        engine = IPAM(store)
        engine.ensure_node(NODE)
        for i in range(n):
            start = time.perf_counter_ns()
            v4, _ = engine.auto_assign(
                AutoAssignRequest(f"k8s-pod-network.engine-{i}", NODE, {"node": NODE})
            )
            times.append((time.perf_counter_ns() - start) / 1e6)
            if not v4.ips:
                raise BenchFailure(f"engine allocation {i}: {'; '.join(v4.msgs)}")
    return times


@dataclass(frozen=True)
class Executable:
    """An IPAM plugin exec'd the way a main plugin delegates to it."""

    key: str
    title: str
    plugin: str
    netconf: Callable[[Path], dict[str, Any]]


EXECUTABLES = [
    Executable("a", "Go host-local (exec)", "host-local", ptp_conf),
    Executable("b", "calico-ipam (exec, pool mode)", "calico-ipam", calico_ipam_conf),
]
ENGINE_KEY, ENGINE_TITLE = "c", "engine in-process (local SQLite)"


def exec_latencies(fill: Fill, cni_path: str, n: int) -> dict[str, list[float]]:
    """ADD wall times (ms) per executable, interleaved one allocation at a time."""
    stdin = {e.key: json.dumps(e.netconf(fill.state)).encode() for e in EXECUTABLES}
    times: dict[str, list[float]] = {e.key: [] for e in EXECUTABLES}
    for i in range(n):
        for e in EXECUTABLES:
            env = cni_env("ADD", f"ipam-bench-{i}", UNUSED_NETNS, cni_path)
            done = run_plugin(os.path.join(cni_path, e.plugin), env, stdin[e.key])
            if done.code != 0 or not (done.json() or {}).get("ips"):
                raise BenchFailure(f"({e.key}) ADD {i} at fill {fill.count}: {done.describe()}")
            times[e.key].append(done.wall_ms)
    return times


def measure(fill: Fill, cni_path: str, exec_n: int, engine_n: int) -> dict[str, list[float]]:
    """All three from identical starting states: the engine gets a copy made beforehand."""
    engine_db = fill.state.parent / f"engine-{fill.count}.db"
    shutil.copyfile(fill.db, engine_db)
    times = exec_latencies(fill, cni_path, exec_n)
    times[ENGINE_KEY] = engine_latencies(engine_db, engine_n)
    return times


def rate(times_ms: list[float]) -> float:
    return len(times_ms) / (sum(times_ms) / 1000)


def build_report(results: dict[int, dict[str, list[float]]], settings: dict[str, Any]) -> Report:
    columns = {e.key: e.title for e in EXECUTABLES} | {ENGINE_KEY: ENGINE_TITLE}
    report = Report("IPAM allocations", columns, settings)
    for count, times in results.items():
        report.rows.append(
            Row(
                f"allocations/s at {count:,}",
                "1/s",
                {k: round(rate(t), 1) for k, t in times.items()},
            )
        )
    for count, times in results.items():
        report.rows.append(
            Row(
                f"allocation p50 at {count:,}",
                "ms",
                {k: round(percentile(t, 50), 2) for k, t in times.items()},
            )
        )
    return report


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fills", default="0,10000", help="already-allocated counts")
    parser.add_argument("--fill-nodes", type=int, default=100, help="nodes the fill is spread on")
    parser.add_argument("--exec-n", type=int, default=30, help="ADDs per executable and fill")
    parser.add_argument("--engine-n", type=int, default=500, help="in-process allocations per fill")
    parser.add_argument("--bin-dir", type=Path, default=bin_dir(), help="our launchers")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    opts = parse_args(argv)
    raise_on_sigterm()
    counts = [int(c) for c in opts.fills.split(",")]
    settings = {
        "fills": counts,
        "fill_nodes": opts.fill_nodes,
        "pool": POOL_CIDR,
        "exec_n": opts.exec_n,
        "engine_n": opts.engine_n,
        "bin_dir": str(opts.bin_dir),
    }
    results: dict[int, dict[str, list[float]]] = {}
    try:
        with (
            cni_bin_dir(opts.bin_dir) as cni_path,
            tempfile.TemporaryDirectory(prefix="ipam-bench-") as root,
        ):
            for count in counts:
                print(f"fill {count:,}: pre-filling", file=sys.stderr, flush=True)
                fill = prepare_fill(Path(root), count, opts.fill_nodes)
                print(f"fill {count:,}: measuring", file=sys.stderr, flush=True)
                results[count] = measure(fill, cni_path, opts.exec_n, opts.engine_n)
    except BenchFailure as err:
        print(f"ipam_bench: FAILED: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nipam_bench: interrupted; everything it created is removed", file=sys.stderr)
        return 130
    report = build_report(results, settings)
    report.print()
    print(f"\nwritten to {report.write('ipam')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""IPAM allocation rate at 0 and at 10,000 already-allocated addresses in a /16.

Go host-local, exec'd per allocation, is the reference. Against it, on each datastore
(the local SQLite file, and etcd started here on loopback):
  - our calico-ipam executable in pool mode, exec'd per allocation,
  - the allocation engine in-process on one open connection (what a warm agent pays).
The Calico fill is spread over FILL_NODES other nodes, as in a cluster (one node may own
at most 20 blocks, i.e. 1,280 addresses); each measured node starts with no block. The
host-local fill is 10,000 files in its dataDir, as 10,000 earlier ADDs leave them.
The executables are interleaved per allocation. No root needed.

Run after `make build`: .venv/bin/python bench/ipam_bench.py
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import string
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from cni_bench import (
    BenchFailure,
    Report,
    Row,
    bin_dir,
    calico_conf,
    cni_bin_dir,
    cni_env,
    create_pool,
    local_datastore_keys,
    open_datastore,
    percentile,
    ptp_conf,
    publish,
    raise_on_sigterm,
    run_plugin,
    start_bench_etcd,
)

# cni_bench has put the repository on sys.path.
from tests.etcd_fixture import EtcdCluster

# calico-ipam allocates for cni_bench.NODE_NAME; the engine, measured after it in the same
# datastore, gets a node of its own so that it too starts without a block.
ENGINE_NODE = "bench-engine-node"
POOL_CIDR = "10.82.0.0/16"
# IPAM plugins get the pod's netns path but never enter it; this one need not exist.
UNUSED_NETNS = "/var/run/netns/ipam-bench-unused"


def nothing() -> None:
    """A fresh directory per fill is all the local datastore needs to start empty."""


@dataclass(frozen=True)
class Backend:
    """One datastore the Calico columns run on: its netconf keys for a state directory
    (the fill's, so nothing is shared between fills) and how to empty it between fills."""

    name: str
    title: str
    keys: Callable[[Path], dict[str, str]]
    reset: Callable[[], None] = nothing


LOCAL = Backend("local", "local SQLite", local_datastore_keys)


def etcd_keys(cluster: EtcdCluster, state: Path) -> dict[str, str]:
    return {**cluster.netconf(), "ipam_lock_file": str(state / "ipam.lock")}


@contextmanager
def etcd_backend(directory: Path) -> Iterator[Backend]:
    """One etcd member on loopback ports with its data in `directory`; stopped by its PID
    when the block ends, however it ends (the caller removes the directory)."""
    cluster = start_bench_etcd(directory, hint=" or use --datastores")
    print(f"etcd at {cluster.endpoint}", file=sys.stderr, flush=True)
    try:
        yield Backend("etcd", "etcd", partial(etcd_keys, cluster), cluster.wipe)
    finally:
        cluster.stop()


@dataclass
class Fill:
    """One starting state: every backend's datastore and a host-local dataDir, pre-filled."""

    count: int
    state: Path  # holds host-local's dataDir and one directory per backend

    def backend_state(self, backend: Backend) -> Path:
        return self.state / backend.name


def prefill_calico(keys: dict[str, str], count: int, nodes: int) -> None:
    """The pool and `count` addresses through the engine, one bulk request per node
    (seconds, not minutes, on either datastore)."""
    from ipam_plugin.engine import IPAM, AutoAssignRequest

    per_node, extra = divmod(count, nodes)
    with open_datastore(keys) as store:
        create_pool(store, POOL_CIDR)
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


def prepare_fill(root: Path, count: int, nodes: int, backends: list[Backend]) -> Fill:
    fill = Fill(count, root / f"fill-{count}")
    fill.state.mkdir()
    prefill_host_local(ptp_conf(fill.state), count)
    for backend in backends:
        state = fill.backend_state(backend)
        state.mkdir()
        backend.reset()
        print(f"fill {count:,}: pre-filling {backend.title}", file=sys.stderr, flush=True)
        prefill_calico(backend.keys(state), count, nodes)
    return fill


def engine_latencies(keys: dict[str, str], n: int) -> list[float]:
    """Per-allocation wall time (ms) of the engine on one open datastore, one handle each."""
    from ipam_plugin.engine import IPAM, AutoAssignRequest

    times = []
    with open_datastore(keys) as store:
        engine = IPAM(store)
        engine.ensure_node(ENGINE_NODE)
        for i in range(n):
            start = time.perf_counter_ns()
            v4, _ = engine.auto_assign(
                AutoAssignRequest(f"k8s-pod-network.engine-{i}", ENGINE_NODE, {"node": ENGINE_NODE})
            )
            times.append((time.perf_counter_ns() - start) / 1e6)
            if not v4.ips:
                raise BenchFailure(f"engine allocation {i}: {'; '.join(v4.msgs)}")
    return times


@dataclass(frozen=True)
class Column:
    """One way to allocate: Go host-local (no backend) or calico-ipam on a backend, exec'd
    the way a main plugin delegates to it, or the engine in-process on that backend."""

    key: str
    title: str
    backend: Backend | None = None
    in_process: bool = False

    @property
    def plugin(self) -> str:
        return "calico-ipam" if self.backend else "host-local"

    def keys(self, fill: Fill) -> dict[str, str]:
        assert self.backend is not None
        return self.backend.keys(fill.backend_state(self.backend))

    def netconf(self, fill: Fill) -> dict[str, Any]:
        if self.backend is None:
            return ptp_conf(fill.state)
        return calico_conf({"type": "calico-ipam"}, **self.keys(fill))


def columns_for(backends: list[Backend]) -> list[Column]:
    """The reference first, then an exec and an engine column per backend."""
    columns = [Column("a", "Go host-local (exec)")]
    keys = iter(string.ascii_lowercase[1:])
    for backend in backends:
        columns.append(Column(next(keys), f"calico-ipam exec, {backend.title}", backend))
        columns.append(Column(next(keys), f"engine in-process, {backend.title}", backend, True))
    return columns


def exec_latencies(
    fill: Fill, columns: list[Column], cni_path: str, n: int
) -> dict[str, list[float]]:
    """ADD wall times (ms) per executable, interleaved one allocation at a time."""
    stdin = {c.key: json.dumps(c.netconf(fill)).encode() for c in columns}
    times: dict[str, list[float]] = {c.key: [] for c in columns}
    for i in range(n):
        for c in columns:
            env = cni_env("ADD", f"ipam-bench-{i}", UNUSED_NETNS, cni_path)
            done = run_plugin(os.path.join(cni_path, c.plugin), env, stdin[c.key])
            if done.code != 0 or not (done.json() or {}).get("ips"):
                raise BenchFailure(f"({c.key}) ADD {i} at fill {fill.count}: {done.describe()}")
            times[c.key].append(done.wall_ms)
    return times


def measure(
    fill: Fill, columns: list[Column], cni_path: str, exec_n: int, engine_n: int
) -> dict[str, list[float]]:
    """The executables first, then the engine on its own node in each datastore: every
    measured node starts without a block in a pool holding the fill."""
    execs = [c for c in columns if not c.in_process]
    times = exec_latencies(fill, execs, cni_path, exec_n)
    for c in columns:
        if c.in_process:
            print(f"fill {fill.count:,}: ({c.key}) {c.title}", file=sys.stderr, flush=True)
            times[c.key] = engine_latencies(c.keys(fill), engine_n)
    return times


def rate(times_ms: list[float]) -> float:
    return len(times_ms) / (sum(times_ms) / 1000)


def build_report(
    columns: list[Column], results: dict[int, dict[str, list[float]]], settings: dict[str, Any]
) -> Report:
    report = Report("IPAM allocations", {c.key: c.title for c in columns}, settings)
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
    parser.add_argument(
        "--datastores", default="local,etcd", help="comma-separated: local, etcd, or both"
    )
    parser.add_argument("--bin-dir", type=Path, default=bin_dir(), help="our launchers")
    return parser.parse_args(argv)


@contextmanager
def backends_for(names: list[str], root: Path) -> Iterator[list[Backend]]:
    """The datastores asked for, in the order asked; etcd lives only inside the block."""
    with ExitStack() as stack:
        backends = []
        for name in names:
            if name == "local":
                backends.append(LOCAL)
            elif name == "etcd":
                backends.append(stack.enter_context(etcd_backend(root / "etcd")))
            else:
                raise BenchFailure(f"unknown datastore {name!r}: use local and/or etcd")
        yield backends


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
        "datastores": opts.datastores.split(","),
        "bin_dir": str(opts.bin_dir),
    }

    def run() -> Report:
        results: dict[int, dict[str, list[float]]] = {}
        with ExitStack() as stack:
            cni_path = stack.enter_context(cni_bin_dir(opts.bin_dir))
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ipam-bench-")))
            backends = stack.enter_context(backends_for(settings["datastores"], root))
            columns = columns_for(backends)
            for count in counts:
                fill = prepare_fill(root, count, opts.fill_nodes, backends)
                print(f"fill {count:,}: measuring", file=sys.stderr, flush=True)
                results[count] = measure(fill, columns, cni_path, opts.exec_n, opts.engine_n)
        return build_report(columns, results, settings)

    return publish("ipam_bench", "ipam", run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

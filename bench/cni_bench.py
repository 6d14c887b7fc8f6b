"""Side-by-side CNI benchmark: Go ptp + host-local against our `calico` stacks, one run.

Every variant runs in the same node netns, interleaved per iteration (the order rotates so
no variant always goes first), each ADD on a fresh pod netns created outside the timing.
Timings are wall time of the plugin process from spawn to reap (perf_counter_ns); peak
RSS and CPU come from the child's rusage (os.wait4), which covers the IPAM plugin it
execs too. A resident process a variant starts (the node agent) has its own peak RSS row,
its VmHWM. The bench process itself enters the node netns, so no nsenter exec is timed.

Also home of the helpers the other bench scripts share (plugin exec, percentiles, report).

Run as root after `make build`: .venv/bin/python bench/cni_bench.py [-n 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from libcalico.datastore.base import Datastore
    from tests.etcd_fixture import EtcdCluster

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cni_plugin.dataplane import netns  # noqa: E402
from tests.agent_fixture import AgentProcess  # noqa: E402
from tests.harness import GO_PLUGIN_DIR, Netns, Node, bin_dir, ip_json, sh, unique  # noqa: E402

RESULTS_DIR = REPO / "bench" / "results"
CNI_VERSION = "1.0.0"  # Debian's Go plugins (v1.1.1) speak nothing newer
NODE_NAME = "bench-node"
POD_NAMESPACE = "bench"
# Python ignores SIGPIPE (and SIGXFSZ); a runtime's child starts with the defaults.
_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


class BenchFailure(RuntimeError):
    """A plugin call failed or left something behind: the figures would be meaningless."""


# ------------------------------------------------------------------ plugin exec


@dataclass
class Exec:
    """One plugin process: what it printed and what it cost."""

    code: int
    stdout: str
    stderr: str
    wall_ms: float
    cpu_ms: float
    maxrss_kib: int

    def json(self) -> Any:
        return json.loads(self.stdout) if self.stdout.strip() else None

    def describe(self) -> str:
        return (
            f"exit {self.code}, stdout {self.stdout.strip()!r}, stderr tail {self.stderr[-800:]!r}"
        )


def _memfd_with(data: bytes, name: str) -> int:
    fd = os.memfd_create(name)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _read_fd(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def run_plugin(path: str, env: dict[str, str], stdin: bytes) -> Exec:
    """Exec a plugin as a runtime does (env + stdin) and time it from spawn to reap.

    posix_spawn + wait4 instead of subprocess: wait4 hands back the child's rusage, and
    the child gets its own session so a Ctrl-C reaches only the bench, which then lets
    the in-flight plugin finish before cleaning up.
    """
    fds = [_memfd_with(stdin, "stdin"), os.memfd_create("stdout"), os.memfd_create("stderr")]
    try:
        actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(fds)]
        start = time.perf_counter_ns()
        pid = os.posix_spawn(
            path, [path], env, file_actions=actions, setsid=True, setsigdef=_DEFAULT_SIGNALS
        )
        try:
            _, status, usage = os.wait4(pid, 0)
        except BaseException:
            os.waitpid(pid, 0)  # interrupted: let the plugin finish before cleanup starts
            raise
        wall_ms = (time.perf_counter_ns() - start) / 1e6
        return Exec(
            code=os.waitstatus_to_exitcode(status),
            stdout=_read_fd(fds[1]),
            stderr=_read_fd(fds[2]),
            wall_ms=wall_ms,
            cpu_ms=(usage.ru_utime + usage.ru_stime) * 1e3,
            maxrss_kib=usage.ru_maxrss,
        )
    finally:
        for fd in fds:
            os.close(fd)


def cni_env(command: str, container_id: str, netns: str, cni_path: str, args: str = "") -> dict:
    """The environment a runtime gives a plugin, and nothing else."""
    return {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns,
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": args,
        "CNI_PATH": cni_path,
    }


@contextmanager
def cni_bin_dir(source: Path) -> Iterator[str]:
    """A CNI bin dir laid out as an operator does: our launchers and Go's plugins side by side."""
    with tempfile.TemporaryDirectory(prefix="bench-cni-bin-") as path:
        for name in ("calico", "calico-ipam"):
            target = source.absolute() / name
            if not target.exists():
                raise BenchFailure(f"{target} is missing: run `make build` first")
            os.symlink(target, os.path.join(path, name))
        for name in ("ptp", "host-local"):
            os.symlink(GO_PLUGIN_DIR / name, os.path.join(path, name))
        yield path


# ------------------------------------------------------------------ statistics and report


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass
class Row:
    """One figure for every column (variant), in one unit."""

    metric: str
    unit: str
    values: dict[str, float]


@dataclass
class Report:
    """A table of figures with each column's ratio to the reference (first) column."""

    name: str
    columns: dict[str, str]  # key -> title; the first is the reference
    settings: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # caveats printed under the table

    @property
    def reference(self) -> str:
        return next(iter(self.columns))

    def ratio(self, row: Row, key: str) -> float | None:
        ref = row.values.get(self.reference)
        value = row.values.get(key)
        return None if not ref or value is None else value / ref

    def print(self) -> None:
        ref_title = self.columns[self.reference]
        print(f"\n{self.name}: value (ratio to {ref_title})")
        for key, title in self.columns.items():
            print(f"  ({key}) {title}")
        head = ["metric"] + [f"({key})" for key in self.columns]
        lines = [head]
        for row in self.rows:
            cells = [f"{row.metric} [{row.unit}]"]
            cells += [self._cell(row, key) for key in self.columns]
            lines.append(cells)
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        for line in lines:
            padded = [line[0].ljust(widths[0])]
            padded += [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
            print("  ".join(padded))
        for note in self.notes:
            print(f"note: {note}")

    def _cell(self, row: Row, key: str) -> str:
        value, ratio = row.values.get(key), self.ratio(row, key)
        if value is None:
            return "-"
        return f"{value:,.1f} ({ratio:.2f}x)" if ratio is not None else f"{value:,.1f}"

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": self.name,
            "machine": machine_info(),
            "settings": self.settings,
            "reference": self.reference,
            "variants": self.columns,
            "rows": [
                {
                    "metric": row.metric,
                    "unit": row.unit,
                    "values": row.values,
                    "ratios": {key: self.ratio(row, key) for key in row.values},
                }
                for row in self.rows
            ],
            "notes": self.notes,
        }

    def write(self, prefix: str) -> Path:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path


def publish(name: str, prefix: str, run: Callable[[], Report]) -> int:
    """Run a benchmark, then print its report and write it as JSON; a failure or Ctrl-C
    is one line on stderr (by then everything the run created is removed)."""
    try:
        report = run()
    except BenchFailure as err:
        print(f"{name}: FAILED: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted; everything it created is removed", file=sys.stderr)
        return 130
    report.print()
    print(f"\nwritten to {report.write(prefix)}")
    return 0


def machine_info() -> dict[str, Any]:
    """Enough to tell two result files apart: when, where, which commit."""
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "commit": commit,
    }


def raise_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so cleanup runs either way."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


# ------------------------------------------------------------------ variants


def no_setup(state: Path, bins: Path) -> AbstractContextManager[int | None]:
    return nullcontext()


def no_env(state: Path) -> dict[str, str]:
    return {}


@dataclass(frozen=True)
class Variant:
    """One way of wiring a pod. `setup` runs once before timing (e.g. create a pool, start a
    daemon from our launchers in `bins`) and is torn down after; it yields the PID of the
    resident process serving the variant, if any, whose peak RSS the report then shows.
    `netconf` and `env` (extra plugin environment) come from the variant's own state
    directory so variants never share IPAM state."""

    key: str
    title: str
    plugin: str
    netconf: Callable[[Path], dict[str, Any]]
    setup: Callable[[Path, Path], AbstractContextManager[int | None]] = no_setup
    env: Callable[[Path], dict[str, str]] = no_env


def ptp_conf(state: Path) -> dict[str, Any]:
    return {
        "cniVersion": CNI_VERSION,
        "name": "bench-ptp",
        "type": "ptp",
        "ipMasq": False,
        "ipam": {"type": "host-local", "subnet": "10.80.0.0/16", "dataDir": str(state)},
    }


def calico_conf(ipam: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "cniVersion": CNI_VERSION,
        "name": "k8s-pod-network",
        "type": "calico",
        "nodename": NODE_NAME,
        "mtu": 1400,
        "ipam": ipam,
        **extra,
    }


def calico_host_local_conf(state: Path) -> dict[str, Any]:
    return calico_conf({"type": "host-local", "subnet": "10.81.0.0/16", "dataDir": str(state)})


def local_datastore_keys(state: Path) -> dict[str, str]:
    """Netconf keys that keep the SQLite datastore and the node lock inside `state`."""
    return {
        "datastore_type": "local",
        "local_datastore_path": str(state / "calico.db"),
        "ipam_lock_file": str(state / "ipam.lock"),
    }


def calico_ipam_conf(state: Path) -> dict[str, Any]:
    return calico_conf({"type": "calico-ipam"}, **local_datastore_keys(state))


def open_datastore(keys: dict[str, str]) -> Datastore:
    """The datastore a plugin opens from these netconf keys (the environment ignored)."""
    from libcalico.datastore.config import DatastoreSettings

    return DatastoreSettings.resolve(keys, environ={}).open()


def create_pool(store: Datastore, cidr: str) -> None:
    from libcalico.datastore.base import KVPair
    from libcalico.model import IPPool, IPPoolSpec, ObjectMeta, ResourceKey

    pool = IPPool(ObjectMeta("bench-pool"), IPPoolSpec.from_json({"cidr": cidr}))
    store.create(KVPair(ResourceKey("IPPool", pool.name), pool))


def start_bench_etcd(directory: Path, hint: str = "") -> EtcdCluster:
    """One etcd member on loopback ports with its data in `directory` (the caller stops
    it); a missing binary or a failed start is a BenchFailure, `hint` added to the first."""
    from tests.etcd_fixture import ETCD_BINARY, start_etcd

    if not os.access(ETCD_BINARY, os.X_OK):
        raise BenchFailure(f"{ETCD_BINARY} is missing: install etcd-server{hint}")
    try:
        return start_etcd(directory)
    except RuntimeError as err:
        raise BenchFailure(f"etcd did not start: {err}") from err


def create_local_pool(state: Path, cidr: str) -> None:
    with open_datastore(local_datastore_keys(state)) as store:
        create_pool(store, cidr)


@contextmanager
def calico_pool(state: Path, bins: Path) -> Iterator[None]:
    """An IPPool in the variant's own datastore; it goes with the state directory."""
    create_local_pool(state, "10.82.0.0/16")
    yield


def agent_dir(state: Path) -> Path:
    return state / "agent"


def agent_env(state: Path) -> dict[str, str]:
    return {"CALICO_AGENT_SOCKET": str(agent_dir(state) / "agent.sock")}


@contextmanager
def pool_and_agent(state: Path, bins: Path) -> Iterator[int]:
    """A pool of its own (c's addresses are live in the same node netns), and `calico agent`
    started in this thread's netns (the node's). The launcher execs the agent, so the PID
    Popen reports is the agent's own."""
    create_local_pool(state, "10.83.0.0/16")
    agent = AgentProcess.start(str(bins / "calico"), directory=agent_dir(state))
    assert agent.proc is not None
    try:
        yield agent.proc.pid
    finally:
        status = agent.stop()
    served = len(agent.served())
    if status != 0 or not served:
        raise BenchFailure(f"agent exited {status} after {served} requests:\n{agent.log()}")


VARIANTS = [
    Variant("a", "Go ptp + host-local", "ptp", ptp_conf),
    Variant("b", "calico + Go host-local", "calico", calico_host_local_conf),
    Variant(
        "c",
        "calico + calico-ipam (local SQLite, /16 pool)",
        "calico",
        calico_ipam_conf,
        calico_pool,
    ),
    Variant(
        "d",
        "calico + calico-ipam via the node agent (same datastore setup as c)",
        "calico",
        calico_ipam_conf,
        pool_and_agent,
        agent_env,
    ),
]


# ------------------------------------------------------------------ test bed


@contextmanager
def inside_netns(path: str) -> Iterator[None]:
    """Move this thread (and threads it starts) into a netns, and back afterwards."""
    fd = netns.open_netns(path)
    try:
        with netns.entered(fd):
            yield
    finally:
        os.close(fd)


@dataclass
class Attachment:
    """One pod's interface as the runtime tracks it between ADD and DEL."""

    variant: Variant
    pod: Netns
    container_id: str
    args: str
    result: dict[str, Any] | None = None

    @property
    def host_veth(self) -> str | None:
        interfaces = (self.result or {}).get("interfaces") or []
        return interfaces[0].get("name") if interfaces else None


@dataclass
class Testbed:
    """The node netns, the plugins' state, and every netns and veth the run created."""

    node: Node
    cni_path: str
    state: dict[str, Path]
    confs: dict[str, dict[str, Any]]
    pods: set[str] = field(default_factory=set)
    live: dict[str, Attachment] = field(default_factory=dict)  # container ID -> attachment
    residents: dict[str, int] = field(default_factory=dict)  # variant key -> daemon PID

    def resident_peaks_kib(self) -> dict[str, int]:
        """Each variant's resident process's peak RSS so far, read while it still runs."""
        return {key: peak_rss_kib(pid) for key, pid in self.residents.items()}

    def new_attachment(self, variant: Variant, name: str) -> Attachment:
        pod = Netns(unique("bench-pod"))
        self.pods.add(pod.name)  # before it exists, so an interrupted create is cleaned up too
        sh("ip", "netns", "add", pod.name)
        sh("ip", "-n", pod.name, "link", "set", "lo", "up")
        container_id = f"{name}-{uuid.uuid4().hex[:12]}"
        args = (
            f"IgnoreUnknown=1;K8S_POD_NAMESPACE={POD_NAMESPACE};K8S_POD_NAME={name};"
            f"K8S_POD_INFRA_CONTAINER_ID={container_id}"
        )
        return Attachment(variant, pod, container_id, args)

    def _exec(self, command: str, att: Attachment, conf: dict[str, Any]) -> Exec:
        env = cni_env(command, att.container_id, att.pod.path, self.cni_path, att.args)
        env.update(att.variant.env(self.state[att.variant.key]))
        plugin = os.path.join(self.cni_path, att.variant.plugin)
        return run_plugin(plugin, env, json.dumps(conf).encode())

    def add(self, att: Attachment) -> Exec:
        self.live[att.container_id] = att
        done = self._exec("ADD", att, self.confs[att.variant.key])
        att.result = done.json() if done.code == 0 else None
        if done.code != 0 or not (att.result or {}).get("ips"):
            raise BenchFailure(f"({att.variant.key}) ADD {att.container_id}: {done.describe()}")
        return done

    def delete(self, att: Attachment) -> Exec:
        conf = {**self.confs[att.variant.key], "prevResult": att.result}
        done = self._exec("DEL", att, conf)
        if done.code != 0:
            raise BenchFailure(f"({att.variant.key}) DEL {att.container_id}: {done.describe()}")
        del self.live[att.container_id]
        return done

    def drop_pods(self, attachments: list[Attachment]) -> None:
        for att in attachments:
            att.pod.delete()
            self.pods.discard(att.pod.name)

    def assert_nothing_left(self) -> None:
        """After DEL, the node holds only what the harness made (lo, underlay)."""
        extra = [
            link["ifname"]
            for link in ip_json(self.node.netns.name, "link", "show")
            if link["ifname"] not in ("lo", "underlay")
        ]
        if extra:
            raise BenchFailure(f"interfaces left behind on the node after DEL: {extra}")

    def cleanup(self) -> None:
        """Delete by exact name every veth whose DEL did not run, every pod netns, the node."""
        for att in list(self.live.values()):
            if att.host_veth:
                subprocess.run(
                    ["ip", "-n", self.node.netns.name, "link", "del", att.host_veth],
                    capture_output=True,
                    check=False,
                )
        for name in list(self.pods):
            Netns(name).delete()
        self.pods.clear()
        self.node.destroy()


@contextmanager
def testbed(variants: list[Variant], bins: Path) -> Iterator[Testbed]:
    """Everything the run needs, created before timing and removed even on Ctrl-C."""
    with ExitStack() as stack:
        cni_path = stack.enter_context(cni_bin_dir(bins))
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-state-")))
        state = {v.key: root / v.key for v in variants}
        for path in state.values():
            path.mkdir()
        node = Node.create(cni_path)
        print(f"node netns {node.netns.name}, fabric {node.fabric.name}", file=sys.stderr)
        bed = Testbed(node, cni_path, state, {v.key: v.netconf(state[v.key]) for v in variants})
        stack.callback(bed.cleanup)
        stack.enter_context(inside_netns(node.netns.path))
        for v in variants:  # inside the node netns, where a daemon a variant starts belongs
            pid = stack.enter_context(v.setup(state[v.key], bins))
            if pid is not None:
                bed.residents[v.key] = pid
        yield bed


# ------------------------------------------------------------------ measurements


def peak_rss_kib(pid: int) -> int:
    """VmHWM of a live process. Not ru_maxrss: a spawned child's ru_maxrss starts at the
    spawner's own peak (the kernel folds the parent's mm high-water mark in at exec)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise BenchFailure(f"/proc/{pid}/status has no VmHWM")


@dataclass
class Samples:
    """Per-variant sequential measurements."""

    add_ms: list[float] = field(default_factory=list)
    del_ms: list[float] = field(default_factory=list)
    add_cpu_ms: list[float] = field(default_factory=list)
    maxrss_kib: int = 0

    def record(self, add: Exec, delete: Exec) -> None:
        self.add_ms.append(add.wall_ms)
        self.del_ms.append(delete.wall_ms)
        self.add_cpu_ms.append(add.cpu_ms)
        self.maxrss_kib = max(self.maxrss_kib, add.maxrss_kib, delete.maxrss_kib)


def measure_sequential(
    bed: Testbed, variants: list[Variant], n: int, warmup: int
) -> dict[str, Samples]:
    """ADD then DEL of one pod per variant per iteration, in rotating order."""
    samples = {v.key: Samples() for v in variants}
    for i in range(warmup + n):
        order = variants[i % len(variants) :] + variants[: i % len(variants)]
        attachments = [bed.new_attachment(v, f"seq-{v.key}-{i}") for v in order]
        adds = [bed.add(att) for att in attachments]
        deletes = [bed.delete(att) for att in attachments]
        bed.drop_pods(attachments)
        if i >= warmup:
            for att, add, delete in zip(attachments, adds, deletes, strict=True):
                samples[att.variant.key].record(add, delete)
        print(f"\rsequential: {i + 1}/{warmup + n}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    bed.assert_nothing_left()
    return samples


@dataclass
class Burst:
    """Wall time of N ADDs, then N DELs, through a pool of `concurrency` threads."""

    add_ms: float
    del_ms: float

    @property
    def total_ms(self) -> float:
        return self.add_ms + self.del_ms


def _timed_map(
    pool: ThreadPoolExecutor, fn: Callable[[Attachment], Exec], items: list[Attachment]
) -> float:
    start = time.perf_counter_ns()
    for _ in pool.map(fn, items):
        pass
    return (time.perf_counter_ns() - start) / 1e6


def measure_burst(bed: Testbed, variant: Variant, pods: int, concurrency: int, tag: str) -> Burst:
    attachments = [
        bed.new_attachment(variant, f"burst-{variant.key}-{tag}-{i}") for i in range(pods)
    ]
    pool = ThreadPoolExecutor(max_workers=concurrency)
    try:
        add_ms = _timed_map(pool, bed.add, attachments)
        del_ms = _timed_map(pool, bed.delete, attachments)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    bed.drop_pods(attachments)
    bed.assert_nothing_left()
    return Burst(add_ms, del_ms)


def measure_bursts(
    bed: Testbed, variants: list[Variant], pods: int, concurrency: int, rounds: int
) -> dict[str, list[Burst]]:
    bursts: dict[str, list[Burst]] = {v.key: [] for v in variants}
    for r in range(rounds):
        for v in variants:
            print(f"burst round {r + 1}/{rounds}: ({v.key})", file=sys.stderr, flush=True)
            bursts[v.key].append(measure_burst(bed, v, pods, concurrency, str(r)))
    return bursts


@dataclass
class Measurements:
    """Everything one run measured, per variant key."""

    samples: dict[str, Samples]
    bursts: dict[str, list[Burst]]
    resident_kib_sequential: dict[str, int]  # resident peak RSS after the sequential phase
    resident_kib_total: dict[str, int]  # ... and after the bursts too


def measure(bed: Testbed, variants: list[Variant], opts: argparse.Namespace) -> Measurements:
    samples = measure_sequential(bed, variants, opts.n, opts.warmup)
    after_sequential = bed.resident_peaks_kib()
    bursts = measure_bursts(bed, variants, opts.pods, opts.concurrency, opts.rounds)
    return Measurements(samples, bursts, after_sequential, bed.resident_peaks_kib())


def build_report(variants: list[Variant], m: Measurements, settings: dict[str, Any]) -> Report:
    samples, bursts = m.samples, m.bursts

    def per_variant(fn: Callable[[str], float]) -> dict[str, float]:
        return {v.key: round(fn(v.key), 2) for v in variants}

    def mib(kib: dict[str, int]) -> dict[str, float]:
        return {key: round(value / 1024, 2) for key, value in kib.items()}

    def burst_mean(key: str, part: Callable[[Burst], float]) -> float:
        return sum(part(b) for b in bursts[key]) / len(bursts[key])

    pods = settings["pods"]
    label = f"{pods} pods @{settings['concurrency']}"
    report = Report("CNI ADD/DEL", {v.key: v.title for v in variants}, settings)
    report.rows = [
        Row("ADD p50", "ms", per_variant(lambda k: percentile(samples[k].add_ms, 50))),
        Row("ADD p90", "ms", per_variant(lambda k: percentile(samples[k].add_ms, 90))),
        Row("DEL p50", "ms", per_variant(lambda k: percentile(samples[k].del_ms, 50))),
        Row("DEL p90", "ms", per_variant(lambda k: percentile(samples[k].del_ms, 90))),
        Row("ADD CPU p50", "ms", per_variant(lambda k: percentile(samples[k].add_cpu_ms, 50))),
        Row(f"{label}: ADD phase", "ms", per_variant(lambda k: burst_mean(k, lambda b: b.add_ms))),
        Row(f"{label}: DEL phase", "ms", per_variant(lambda k: burst_mean(k, lambda b: b.del_ms))),
        Row(f"{label}: total", "ms", per_variant(lambda k: burst_mean(k, lambda b: b.total_ms))),
        Row("peak RSS", "MiB", per_variant(lambda k: samples[k].maxrss_kib / 1024)),
    ]
    if m.resident_kib_total:
        report.rows += [
            Row("agent peak RSS: sequential", "MiB", mib(m.resident_kib_sequential)),
            Row("agent peak RSS: whole run", "MiB", mib(m.resident_kib_total)),
        ]
    floor = peak_rss_kib(os.getpid()) / 1024
    report.notes.append(
        f"a peak RSS at or below {floor:.1f} MiB (this bench process's own peak) is only an "
        "upper bound: a spawned child's ru_maxrss starts at its spawner's high-water mark"
    )
    return report


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=20, help="timed sequential iterations")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--pods", type=int, default=100, help="pods per burst")
    parser.add_argument("--concurrency", type=int, default=10, help="threads per burst")
    parser.add_argument("--rounds", type=int, default=1, help="bursts per variant")
    parser.add_argument(
        "--variants",
        default=",".join(v.key for v in VARIANTS),
        help="comma-separated keys; the first is the reference for ratios",
    )
    parser.add_argument("--bin-dir", type=Path, default=bin_dir(), help="our launchers")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    opts = parse_args(argv)
    by_key = {v.key: v for v in VARIANTS}
    variants = [by_key[key] for key in opts.variants.split(",")]
    if os.geteuid() != 0:
        print("cni_bench needs root (network namespaces)", file=sys.stderr)
        return 2
    raise_on_sigterm()
    settings = {
        "cniVersion": CNI_VERSION,
        "n": opts.n,
        "warmup": opts.warmup,
        "pods": opts.pods,
        "concurrency": opts.concurrency,
        "rounds": opts.rounds,
        "bin_dir": str(opts.bin_dir),
    }

    def run() -> Report:
        with testbed(variants, opts.bin_dir) as bed:
            measurements = measure(bed, variants, opts)
        return build_report(variants, measurements, settings)

    return publish("cni_bench", "cni", run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

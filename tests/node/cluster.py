"""A simulated cluster for calico-node: a fabric, nodes, each with its own daemon and BIRD.

The fabric is a netns holding a Linux bridge; every node is a netns with an underlay `eth0`
(first-found autodetection's kind of name) on the bridge, a /24 address, IPv4 forwarding,
and a default route through a gateway nobody answers for (proxy-ARP for 169.254.1.1 needs
a route). Each node runs the built `calico-node` inside its netns through nsenter, with
Calico's paths moved into its own directory (CALICO_RUN_DIR, CALICO_LIB_DIR,
CALICO_CONFD_DIR, CALICO_LOG_DIR): sockets, pid files and BIRD's config never collide.
Pods are netns set up by the `calico` CNI plugin handed to that node's daemon.

Everything is named with `unique()` and removed by exact name or PID; `Cluster.destroy`
checks that no BIRD or daemon of the cluster is left.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from libcalico.datastore.base import Datastore, KVPair
from libcalico.datastore.config import DatastoreSettings
from libcalico.model import BlockAffinityListOptions, IPPool, IPPoolSpec, ObjectMeta, ResourceKey
from tests.etcd.cni_support import LoopbackRelay
from tests.harness import CNIResult, Netns, bin_dir, pod_args, run_plugin, sh, unique, wait_for

CONVERGE_TIMEOUT_S = 120.0
START_TIMEOUT_S = 120.0
RTPROT_BIRD = "bird"


def proc_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def processes_under(path: Path) -> list[str]:
    """Command lines of live processes that name `path` (the cluster's directory)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in argv:
            found.append(f"{pid}: {argv}")
    return found


class Kubelet(Protocol):
    """Registers what kubelet and the scheduler would (the Kubernetes datastore)."""

    def register_node(self, name: str) -> None: ...

    def register_pod(self, name: str, node: str) -> None: ...

    def remove_node(self, name: str) -> None: ...


@dataclass
class Pod:
    name: str
    netns: Netns
    container_id: str
    ip: str
    node: SimNode

    def ping(self, address: str) -> bool:
        return self.netns.ping(address)


@dataclass
class SimNode:
    name: str
    netns: Netns
    ip: str  # underlay address, no prefix
    prefix: int
    home: Path
    cluster: Cluster
    proc: subprocess.Popen[bytes] | None = None
    pods: list[Pod] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)

    def ip_in(self, network: ipaddress.IPv4Network) -> bool:
        return ipaddress.ip_address(self.ip) in network

    # -- paths

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def lib_dir(self) -> Path:
        return self.home / "lib"

    @property
    def confd_dir(self) -> Path:
        return self.home / "confd"

    @property
    def log_dir(self) -> Path:
        return self.home / "log"

    @property
    def log_path(self) -> Path:
        return self.home / "calico-node.log"

    @property
    def bird_socket(self) -> Path:
        return self.run_dir / "bird.ctl"

    @property
    def bird_cfg(self) -> Path:
        return self.confd_dir / "config" / "bird.cfg"

    def env(self) -> dict[str, str]:
        """calico-node's environment on this node (also what calicoctl node status needs)."""
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "NODENAME": self.name,
            "CALICO_RUN_DIR": str(self.run_dir),
            "CALICO_LIB_DIR": str(self.lib_dir),
            "CALICO_CONFD_DIR": str(self.confd_dir),
            "CALICO_LOG_DIR": str(self.log_dir),
            "CALICO_IPV4POOL_CIDR": self.cluster.pool_cidr,
            "CALICO_IPV4POOL_IPIP": "Never",
            **self.cluster.datastore_env,
            **self.extra_env,
        }

    # -- the daemon

    def start(self, wait: bool = True, private_mounts: bool = False) -> None:
        """Run calico-node in the node's netns (with `private_mounts`, also in a mount
        namespace of its own, as in a container: later netns mounts stay invisible to it)."""
        argv = ["nsenter", f"--net={self.netns.path}"]
        if private_mounts:
            argv += ["unshare", "--mount", "--propagation", "private"]
        argv.append(str(bin_dir() / "calico-node"))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env()
            )
        if wait:
            self.wait_started()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def exited(self) -> bool:
        """Whether the daemon process has exited."""
        return self.proc is not None and self.proc.poll() is not None

    def wait_started(self) -> None:
        """Until the daemon registered, serves CNI requests and BIRD answers."""

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"calico-node {self.name} exited {self.proc.returncode}:\n{self.log()[-4000:]}"
                )
            serving = (self.run_dir / "cni-agent.sock").exists()
            return serving and (not self.runs_bird or self.bird_answers())

        wait_for(up, f"calico-node {self.name} to start", START_TIMEOUT_S)

    @property
    def runs_bird(self) -> bool:
        return self.env().get("CALICO_NETWORKING_BACKEND", "bird") == "bird"

    def bird_answers(self) -> bool:
        return self.birdc("show status", check=False).returncode == 0

    def birdc(self, command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("birdc", "-s", str(self.bird_socket), *command.split(), check=check)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        return code

    def kill(self) -> None:
        """kill -9 of calico-node (nsenter execs it, so the PID is the daemon's)."""
        self.stop(signal.SIGKILL)

    def bird_pid(self) -> int | None:
        try:
            text = (self.run_dir / "bird.pid").read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() and proc_alive(int(text)) else None

    def calico_node(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`calico-node <args>` (a probe) in this node's netns and environment."""
        return sh(
            "nsenter", f"--net={self.netns.path}", str(bin_dir() / "calico-node"), *args,
            check=False, env={**self.env(), **(env or {})}, timeout=60,
        )  # fmt: skip

    def calicoctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`calicoctl <args>` as an operator on this node runs it."""
        link = self.cluster.home / "calicoctl"
        if not link.exists():
            link.symlink_to(bin_dir() / "calico")
        return sh(
            "nsenter", f"--net={self.netns.path}", str(link), *args,
            check=False, env=self.env(), timeout=60,
        )  # fmt: skip

    # -- kernel state

    def routes(self) -> list[dict[str, Any]]:
        return json.loads(
            sh("ip", "-j", "-n", self.netns.name, "-4", "route", "show").stdout or "[]"
        )

    def bird_routes(self) -> dict[str, dict[str, Any]]:
        """`proto bird` routes by destination."""
        return {r["dst"]: r for r in self.routes() if r.get("protocol") == RTPROT_BIRD}

    # -- pods

    def add_pod(self, ipam: dict[str, Any] | None = None, name: str = "") -> Pod:
        pod_ns = Netns.create("cnp")
        name = name or unique("pod")
        container_id = unique("ctr")
        if self.cluster.kubelet is not None:
            self.cluster.kubelet.register_pod(name, self.name)
        result = self.cni("ADD", pod_ns.path, container_id, name, ipam)
        if result.code != 0:
            pod_ns.delete()
            raise AssertionError(f"ADD on {self.name} failed: {result!r}")
        ip = result.json["ips"][0]["address"].split("/")[0]
        pod = Pod(name, pod_ns, container_id, ip, self)
        self.pods.append(pod)
        return pod

    def delete_pod(self, pod: Pod) -> None:
        result = self.cni("DEL", pod.netns.path, pod.container_id, pod.name)
        assert result.code == 0, result
        pod.netns.delete()
        self.pods.remove(pod)

    def cni(
        self,
        command: str,
        netns: str,
        container_id: str,
        name: str,
        ipam: dict[str, Any] | None = None,
    ) -> CNIResult:
        conf = {
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "type": "calico",
            "nodename_file": str(self.lib_dir / "nodename"),
            # pod_mtu None: the MTU file calico-node writes decides (Calico's default).
            **({"mtu": self.cluster.pod_mtu} if self.cluster.pod_mtu else {}),
            "mtu_file_path": str(self.lib_dir / "mtu"),
            "log_level": "info",
            "ipam": ipam or {"type": "calico-ipam"},
            "ipam_lock_file": str(self.run_dir / "ipam.lock"),
            **self.cluster.netconf,
        }
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": netns,
            "CNI_IFNAME": "eth0",
            "CNI_ARGS": pod_args(name),
            "CNI_PATH": str(self.cluster.cni_bin),
            "CALICO_RUN_DIR": str(self.run_dir),
        }
        return run_plugin([str(self.cluster.cni_bin / "calico")], env, conf, self.netns.path)

    def destroy(self) -> None:
        for pod in self.pods:
            pod.netns.delete()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        pid = self.bird_pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not proc_alive(pid), f"BIRD {pid} to exit", 30)
        self.netns.delete()


class Cluster:
    """A fabric and its nodes on one datastore (`datastore_env` / `netconf` say which)."""

    def __init__(
        self,
        datastore_env: dict[str, str],
        netconf: dict[str, Any],
        subnet: str = "172.31.200.0/24",
        pool_cidr: str = "10.244.0.0/16",
        home: Path | None = None,
        relay_ports: list[int] | None = None,
        kubelet: Kubelet | None = None,
        operator_env: dict[str, str] | None = None,
        pod_mtu: int | None = 1400,
    ) -> None:
        """`relay_ports`: the host-loopback ports of the datastore's servers, which the
        nodes reach at the same address through a LoopbackRelay; `kubelet`: what stands
        in for Kubernetes on the Kubernetes datastore (Nodes and Pods registered)."""
        self.kubelet = kubelet
        self.operator_env = operator_env or datastore_env
        self.relay = LoopbackRelay(relay_ports, []).__enter__() if relay_ports else None
        self.datastore_env = datastore_env
        self.netconf = netconf
        self.pod_mtu = pod_mtu
        self.subnet = ipaddress.ip_network(subnet)
        self.pool_cidr = pool_cidr
        self.home = home or Path(tempfile.mkdtemp(prefix="cnode-", dir="/tmp"))
        self.fabric = Netns.create("cnf")
        self.bridge = "br0"
        sh("ip", "-n", self.fabric.name, "link", "add", self.bridge, "type", "bridge")
        sh("ip", "-n", self.fabric.name, "link", "set", self.bridge, "up")
        self.subnets = [(self.subnet, self.bridge)]
        self.nodes: list[SimNode] = []
        self.cni_bin = self.home / "cni-bin"
        self.cni_bin.mkdir()
        for name in ("calico", "calico-ipam"):
            (self.cni_bin / name).symlink_to(bin_dir() / name)

    @classmethod
    def local(cls, **kw: Any) -> Cluster:
        """The nodes share one local datastore file (the embedded default)."""
        home = Path(tempfile.mkdtemp(prefix="cnode-", dir="/tmp"))
        db = str(home / "calico.db")
        return cls(
            {"DATASTORE_TYPE": "local", "LOCAL_DATASTORE_PATH": db},
            {"datastore_type": "local", "local_datastore_path": db},
            home=home,
            **kw,
        )

    def add_subnet(self, cidr: str) -> int:
        """Another subnet on a bridge of its own, and the fabric netns made the router
        between the subnets (each bridge gets the subnet's gateway address, the nodes'
        default route): what CrossSubnet needs. Returns the index `add_node` takes."""
        self._route_on(*self.subnets[0])  # the first subnet's gateway too
        network, bridge = ipaddress.ip_network(cidr), f"br{len(self.subnets)}"
        sh("ip", "-n", self.fabric.name, "link", "add", bridge, "type", "bridge")
        sh("ip", "-n", self.fabric.name, "link", "set", bridge, "up")
        self._route_on(network, bridge)
        self.fabric.exec("sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.subnets.append((network, bridge))
        return len(self.subnets) - 1

    def _route_on(self, network: ipaddress.IPv4Network, bridge: str) -> None:
        gateway = f"{network.broadcast_address - 1}/{network.prefixlen}"
        sh("ip", "-n", self.fabric.name, "addr", "replace", gateway, "dev", bridge)

    def add_node(
        self, name: str = "", start: bool = True, subnet: int = 0, **extra_env: str
    ) -> SimNode:
        index = len(self.nodes) + 1
        name = name or f"node{index}"
        netns = Netns.create("cnn")
        if self.relay is not None:
            self.relay.add_netns(netns.path)
        network, bridge = self.subnets[subnet]
        ip = str(network.network_address + 1 + sum(n.ip_in(network) for n in self.nodes))
        port = f"p{index}-{netns.name[-8:]}"[:15]
        sh(
            "ip",
            "-n",
            self.fabric.name,
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns.name,
        )
        sh("ip", "-n", self.fabric.name, "link", "set", port, "master", bridge, "up")
        sh("ip", "-n", netns.name, "addr", "add", f"{ip}/{network.prefixlen}", "dev", "eth0")
        sh("ip", "-n", netns.name, "link", "set", "eth0", "up")
        gateway = str(network.broadcast_address - 1)
        sh("ip", "-n", netns.name, "route", "add", "default", "via", gateway)
        netns.exec("sysctl", "-qw", "net.ipv4.ip_forward=1")
        home = self.home / name
        home.mkdir()
        if self.kubelet is not None:
            self.kubelet.register_node(name)
        node = SimNode(name, netns, ip, network.prefixlen, home, self, extra_env=dict(extra_env))
        self.nodes.append(node)
        if start:
            node.start()
        return node

    def store(self) -> Datastore:
        """A client of the cluster's datastore, as an operator's tool would open it."""
        return DatastoreSettings.resolve({}, self.operator_env).connect()

    def add_pool(self, name: str, cidr: str, **spec: object) -> None:
        pool = IPPool(ObjectMeta(name), IPPoolSpec.from_json({"cidr": cidr, **spec}))
        with self.store() as store:
            store.create(KVPair(ResourceKey("IPPool", name), pool))

    def affine_blocks(self) -> dict[str, list[str]]:
        """Confirmed blocks by node name."""
        blocks: dict[str, list[str]] = {}
        with self.store() as store:
            for kvp in store.list(BlockAffinityListOptions()):
                if kvp.value.is_confirmed():
                    blocks.setdefault(kvp.key.host, []).append(str(kvp.key.cidr))
        return blocks

    def routing_problems(
        self, nodes: list[SimNode] | None = None, borrowed: dict[str, SimNode] | None = None
    ) -> list[str]:
        """How the nodes' `proto bird` routes differ from one route per other node's block
        via that node, a blackhole per own block, and a /32 via the borrower for each
        `borrowed` address (empty when converged): nothing else, no other /32."""
        nodes = self.nodes if nodes is None else nodes
        blocks = self.affine_blocks()
        problems = []
        for node in nodes:
            routes = node.bird_routes()
            wanted: dict[str, tuple[str, str]] = {}
            for other in nodes:
                for cidr in blocks.get(other.name, []):
                    if other is node:
                        wanted[cidr] = ("blackhole", "")
                    else:
                        wanted[cidr] = ("unicast", other.ip)
            for ip, borrower in (borrowed or {}).items():
                if borrower is not node:
                    wanted[ip] = ("unicast", borrower.ip)
            for cidr, (kind, via) in wanted.items():
                route = routes.get(cidr)
                if route is None:
                    problems.append(f"{node.name}: no route to {cidr}")
                elif route.get("type", "unicast") != kind or route.get("gateway", "") != via:
                    problems.append(f"{node.name}: {cidr} is {route}, wanted {kind} {via}")
                elif kind == "unicast" and route.get("dev") != "eth0":
                    problems.append(f"{node.name}: {cidr} via {route.get('dev')}")
            for dst in routes:
                if dst not in wanted:
                    problems.append(f"{node.name}: unexpected route {routes[dst]}")
        return problems

    def node(self, name: str) -> SimNode:
        return next(n for n in self.nodes if n.name == name)

    def wait(
        self, condition: Callable[[], bool], what: str, timeout: float = CONVERGE_TIMEOUT_S
    ) -> None:
        wait_for(condition, what, timeout)

    def established(self, node: SimNode) -> list[str]:
        """Peer protocol names of `node` in state Established."""
        out = node.birdc("show protocols", check=False).stdout
        return [
            line.split()[0]
            for line in out.splitlines()
            if " BGP " in line and "Established" in line
        ]

    def destroy(self) -> None:
        try:
            for node in self.nodes:
                node.destroy()
        finally:
            if self.relay is not None:
                self.relay.__exit__(None, None, None)
            self.fabric.delete()
            shutil.rmtree(self.home, ignore_errors=True)

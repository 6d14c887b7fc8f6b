"""Test harness: simulated nodes and pods in network namespaces, and plugin invocation.

A node is a netns with an underlay veth to its own "fabric" netns and a default route
through it (proxy-ARP for 169.254.1.1 only answers when the node has a route to it).
The plugin runs inside the node netns via nsenter, so the real host is never touched.
Everything is created under unique names and deleted by exact name.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import agent_fixture

REPO = Path(__file__).resolve().parent.parent
ALL_VERSIONS = ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
GO_PLUGIN_DIR = Path("/usr/lib/cni")
NETNS_DIR = Path("/var/run/netns")


def bin_dir() -> Path:
    """The plugin executables under test: dist/bin (built by `make build`) or CALICO_BIN_DIR."""
    return Path(os.environ.get("CALICO_BIN_DIR", REPO / "dist" / "bin")).absolute()


def sh(*cmd: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


def ip_json(netns: str, *args: str) -> Any:
    out = sh("ip", "-j", "-n", netns, *args).stdout
    return json.loads(out) if out.strip() else []


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


@dataclass
class Netns:
    name: str

    @property
    def path(self) -> str:
        return str(NETNS_DIR / self.name)

    @classmethod
    def create(cls, prefix: str) -> Netns:
        ns = cls(unique(prefix))
        sh("ip", "netns", "add", ns.name)
        sh("ip", "-n", ns.name, "link", "set", "lo", "up")
        return ns

    def delete(self) -> None:
        sh("ip", "netns", "del", self.name, check=False)

    def exec(self, *cmd: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
        return sh("nsenter", f"--net={self.path}", *cmd, check=check, **kw)

    def links(self) -> list[dict[str, Any]]:
        return ip_json(self.name, "link", "show")

    def link(self, name: str) -> dict[str, Any] | None:
        return next((link for link in self.links() if link["ifname"] == name), None)

    def addrs(self, ifname: str) -> list[str]:
        out = ip_json(self.name, "addr", "show", "dev", ifname)
        return [
            f"{a['local']}/{a['prefixlen']}" for a in out[0]["addr_info"] if a["scope"] != "link"
        ]

    def routes(self, family: int = 4) -> list[dict[str, Any]]:
        return ip_json(self.name, f"-{family}", "route", "show")

    def sysctl(self, name: str) -> str:
        return self.exec("cat", "/proc/sys/" + name.replace(".", "/")).stdout.strip()

    def sysctl_if(self, family: str, ifname: str, key: str) -> str:
        return self.exec("cat", f"/proc/sys/net/{family}/conf/{ifname}/{key}").stdout.strip()

    def ping(self, address: str, source: str | None = None) -> bool:
        cmd = ["ping", "-c", "1", "-W", "3"]
        if ":" in address:
            cmd.append("-6")
        if source:
            cmd += ["-I", source]
        return self.exec(*cmd, address, check=False).returncode == 0


@dataclass
class CNIResult:
    code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout) if self.stdout.strip() else None

    def __repr__(self) -> str:
        return (
            f"CNIResult(code={self.code}, stdout={self.stdout!r}, stderr={self.stderr[-2000:]!r})"
        )


@dataclass
class Node:
    """A simulated Kubernetes node: its netns, fabric peer, and a CNI_PATH for its plugins."""

    netns: Netns
    fabric: Netns
    cni_path: str
    underlay_ip: str = "172.31.254.2"
    pods: list[Netns] = field(default_factory=list)

    @classmethod
    def create(cls, cni_path: str) -> Node:
        node, fabric = Netns.create("cnt-node"), Netns.create("cnt-fab")
        sh(
            "ip",
            "-n",
            node.name,
            "link",
            "add",
            "underlay",
            "type",
            "veth",
            "peer",
            "name",
            "fabric0",
            "netns",
            fabric.name,
        )
        sh("ip", "-n", node.name, "addr", "add", "172.31.254.2/24", "dev", "underlay")
        sh("ip", "-n", node.name, "link", "set", "underlay", "up")
        sh("ip", "-n", fabric.name, "addr", "add", "172.31.254.1/24", "dev", "fabric0")
        sh("ip", "-n", fabric.name, "link", "set", "fabric0", "up")
        sh("ip", "-n", node.name, "route", "add", "default", "via", "172.31.254.1")
        sh("ip", "-n", node.name, "-6", "addr", "add", "fd00:fab::2/64", "dev", "underlay", "nodad")
        sh(
            "ip",
            "-n",
            fabric.name,
            "-6",
            "addr",
            "add",
            "fd00:fab::1/64",
            "dev",
            "fabric0",
            "nodad",
        )
        sh("ip", "-n", node.name, "-6", "route", "add", "default", "via", "fd00:fab::1")
        # IPv6 routes between interfaces only with the global switch; on a real node
        # calico/node (Felix) sets it. IPv4 forwarding is per interface and the CNI sets it.
        node.exec("sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/all/forwarding")
        # Under CALICO_TEST_VIA_AGENT=1, plugin runs in this netns go through an agent.
        agent_fixture.start_for(os.path.join(cni_path.split(":")[0], "calico"), node.path)
        return cls(netns=node, fabric=fabric, cni_path=cni_path)

    def new_pod(self) -> Netns:
        pod = Netns.create("cnt-pod")
        self.pods.append(pod)
        return pod

    def destroy(self) -> None:
        agent_fixture.stop_for(self.netns.path)
        for pod in self.pods:
            pod.delete()
        self.netns.delete()
        self.fabric.delete()

    def run(
        self,
        command: str,
        conf: dict[str, Any] | bytes | str,
        container_id: str = "",
        netns: str = "",
        ifname: str = "eth0",
        args: str = "",
        env: dict[str, str] | None = None,
        binary: str = "calico",
        timeout: float = 120,
    ) -> CNIResult:
        """Exec a plugin from this node's CNI_PATH inside the node netns."""
        full_env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": netns,
            "CNI_IFNAME": ifname,
            "CNI_ARGS": args,
            "CNI_PATH": self.cni_path,
            **(env or {}),
        }
        plugin = os.path.join(self.cni_path.split(":")[0], binary)
        return run_plugin([plugin], full_env, conf, self.netns.path, timeout)

    def host_veths(self) -> list[str]:
        return [link["ifname"] for link in self.netns.links() if link["ifname"].startswith("cali")]


def run_plugin(
    argv: list[str],
    env: dict[str, str],
    conf: dict[str, Any] | bytes | str | None,
    netns_path: str | None = None,
    timeout: float = 120,
) -> CNIResult:
    """Run a plugin with exactly `env` (plus PATH) and `conf` on stdin, as a runtime does."""
    if conf is None:
        stdin = b""
    elif isinstance(conf, bytes):
        stdin = conf
    else:
        stdin = (conf if isinstance(conf, str) else json.dumps(conf)).encode()
    full_env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        **agent_fixture.env_for(netns_path, env),
        **env,
    }
    if netns_path:
        argv = ["nsenter", f"--net={netns_path}", *argv]
    proc = subprocess.run(
        argv, input=stdin, capture_output=True, env=full_env, timeout=timeout, check=False
    )
    return CNIResult(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def calico_cli(
    *argv: str, env: dict[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`calico <argv>` (the admin CLI) as an operator runs it: this environment, without
    CNI_COMMAND (DATASTORE_TYPE too: callers say which datastore), plus `env`."""
    full = {k: v for k, v in os.environ.items() if k not in ("CNI_COMMAND", "DATASTORE_TYPE")}
    return subprocess.run(
        [str(bin_dir() / "calico"), *argv],
        input=stdin,
        env={**full, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    """Poll until `condition` holds: for state that settles asynchronously (a process's
    log, the kernel's teardown of a deleted netns). Not a speed check: the bound only
    keeps a test that would never pass from hanging."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def pod_args(pod: str, namespace: str = "default") -> str:
    """CNI_ARGS as kubelet's runtime sends them for a pod."""
    return f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod}"


def calico_conf(version: str, ipam: dict[str, Any], **extra: Any) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "cniVersion": version,
        "name": "k8s-pod-network",
        "type": "calico",
        "nodename": "node1",
        "nodename_file_optional": True,
        "mtu": 1400,
        "log_level": "debug",
        "ipam": ipam,
    }
    conf.update(extra)
    return conf


def with_prev(conf: dict[str, Any], prev: Any) -> dict[str, Any]:
    out = dict(conf)
    out["prevResult"] = prev
    return out


def result_ips(result: dict[str, Any], version: str) -> list[str]:
    """Addresses in a result of any version."""
    if version_tuple(version) < (0, 3, 0):
        return [result[k]["ip"] for k in ("ip4", "ip6") if k in result]
    return [ip["address"] for ip in result.get("ips", [])]

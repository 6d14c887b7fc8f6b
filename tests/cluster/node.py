"""A simulated Kubernetes node: a machine of its own in namespaces of this one.

Each node is a network namespace on a shared fabric (a bridge in its own netns, which is
every node's default gateway), plus a mount and a UTS namespace held open by one
`sleep` process. Inside, the node has its own hostname (the node name), `/run` (tmpfs),
`/opt`, `/var/lib` and `/var/log` (bind mounts of directories under the node's test
directory) and an `/etc` overlay whose changes land there too. So containerd, kubelet,
kube-proxy and the CNI plugin run with their default paths — `/etc/cni/net.d`,
`/opt/cni/bin`, `/run/containerd`, `/var/lib/kubelet`, `/var/log/pods` — and Calico is
installed exactly as the README tells an operator, while the host's own directories are
never written.

What namespaces cannot separate is shielded or given a per-node name: kubelet writes six
global kernel tunables (cri-probe.md), each covered inside the node by a bind-mounted
file holding the host's value; pod cgroups live under a per-node `cgroupRoot`.

Everything is stopped by PID: the daemons, then whatever still runs in the node's mount
namespace (container shims and their processes, found by that namespace's identity), then
the holder, which takes every mount with it; the per-node cgroups and netns follow.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.etcd_fixture import log_tail, stop_process
from tests.harness import Netns, sh, unique, wait_for

# Kernel tunables kubelet sets when protectKernelDefaults is off (pkg/kubelet/cm): global,
# not per netns, so each node covers them with a file.
KUBELET_TUNABLES = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)
PRIVATE_DIRS = ("opt", "var/lib", "var/log")  # bind mounts of the node's own directories
CGROUP_ROOT = Path("/sys/fs/cgroup")
STOP_TIMEOUT = 20.0
FABRIC_PREFIX = "192.168.200"


@dataclass
class Fabric:
    """The nodes' shared L2 segment: a bridge in its own netns, the gateway .1."""

    netns: Netns
    gateway: str = f"{FABRIC_PREFIX}.1"

    @classmethod
    def create(cls) -> Fabric:
        fabric = cls(Netns.create("kc-fab"))
        fabric.netns.exec("ip", "link", "add", "br0", "type", "bridge")
        fabric.netns.exec("ip", "addr", "add", f"{fabric.gateway}/24", "dev", "br0")
        fabric.netns.exec("ip", "link", "set", "br0", "up")
        return fabric

    def attach(self, node_netns: Netns, address: str) -> None:
        """A veth from the node (`eth0`, `address`/24, default route via .1) to br0."""
        port = unique("kcp")[:15]
        sh("ip", "-n", node_netns.name, "link", "add", "eth0", "type", "veth", "peer", "name", port)
        sh("ip", "-n", node_netns.name, "link", "set", port, "netns", self.netns.name)
        self.netns.exec("ip", "link", "set", port, "master", "br0", "up")
        node_netns.exec("ip", "addr", "add", f"{address}/24", "dev", "eth0")
        node_netns.exec("ip", "link", "set", "eth0", "up")
        node_netns.exec("ip", "route", "add", "default", "via", self.gateway)
        # What kubeadm's preflight demands of a node: pods' traffic is routed through it.
        node_netns.exec("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")

    def destroy(self) -> None:
        self.netns.delete()


@dataclass
class KubeNode:
    """One node: its namespaces, directory and daemons (containerd, kubelet, kube-proxy)."""

    name: str
    address: str
    directory: Path
    netns: Netns
    cgroup_root: str
    crictl_path: Path
    holder: subprocess.Popen[bytes] | None = None
    host_tunables: dict[str, str] = field(default_factory=dict)  # as they were at creation
    daemons: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @classmethod
    def create(
        cls, name: str, address: str, directory: Path, fabric: Fabric, crictl: Path
    ) -> KubeNode:
        directory.mkdir(parents=True)
        cgroup_root = "/" + unique("kc-pods")
        node = cls(name, address, directory, Netns.create("kc-node"), cgroup_root, crictl)
        try:
            fabric.attach(node.netns, address)
            node._enter_namespaces()
            node._make_cgroup_root()
        except BaseException:
            node.destroy()
            raise
        return node

    # ------------------------------------------------------------ namespaces

    def _enter_namespaces(self) -> None:
        self.holder = subprocess.Popen(
            ["nsenter", f"--net={self.netns.path}", "unshare", "--mount", "--uts", "sleep", "inf"],
            stdin=subprocess.DEVNULL,
        )
        own = os.readlink("/proc/self/ns/mnt")
        wait_for(
            lambda: _mount_ns(self.holder.pid) not in (own, None), "the node's mount namespace", 30
        )
        tunables = self.directory / "tunables"
        tunables.mkdir()
        script = [f"hostname {self.name}", "mount -t tmpfs -o mode=0755 tmpfs /run"]
        for name in PRIVATE_DIRS:
            private = self.directory / "root" / name
            private.mkdir(parents=True)
            script.append(f"mount --bind {private} /{name}")
        upper, work = self.directory / "root" / "etc", self.directory / "etc-work"
        upper.mkdir()
        work.mkdir()
        script.append(
            f"mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={work} /etc"
        )
        for tunable in KUBELET_TUNABLES:
            cover = tunables / tunable.replace("/", ".")
            self.host_tunables[tunable] = Path("/proc/sys", tunable).read_text().strip()
            cover.write_text(self.host_tunables[tunable] + "\n")
            script.append(f"mount --bind {cover} /proc/sys/{tunable}")
        self.run("sh", "-ec", "\n".join(script))

    def path(self, inside: str) -> Path:
        """Where a path of the node's private directories lies on the host."""
        relative = inside.lstrip("/")
        if relative.startswith("proc/sys/"):
            return (
                self.directory / "tunables" / relative.removeprefix("proc/sys/").replace("/", ".")
            )
        if relative.startswith("run/"):
            raise ValueError("the node's /run is a tmpfs only the node sees")
        return self.directory / "root" / relative

    def _nsenter(self) -> list[str]:
        assert self.holder is not None
        return ["nsenter", "-t", str(self.holder.pid), "-m", "-u", "-n", "--"]

    def run(
        self, *argv: str, check: bool = True, timeout: float = 120, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run a command on the node (its namespaces, its filesystem view)."""
        return subprocess.run(
            [*self._nsenter(), *argv],
            check=check,
            capture_output=True,
            text=True,
            timeout=timeout,
            **kw,
        )

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        """Start a daemon on the node; its output goes to <directory>/<name>.log."""
        log = self.directory / f"{name}.log"
        with open(log, "ab") as out:
            self.daemons[name] = subprocess.Popen(
                [*self._nsenter(), *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={
                    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    **(env or {}),
                },
            )

    def crictl(
        self, *argv: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """crictl on the node, against its containerd (the streaming server of `exec`
        listens on the node's loopback, so it runs in the node's netns)."""
        endpoint = "unix:///run/containerd/containerd.sock"
        return self.run(
            str(self.crictl_path),
            f"--runtime-endpoint={endpoint}",
            f"--image-endpoint={endpoint}",
            *argv,
            check=check,
            timeout=timeout,
        )

    def pod_exec(
        self, pod: str, *argv: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """A command in the pod's (only) running container, through crictl."""
        label = f"io.kubernetes.pod.name={pod}"
        container = self.crictl("ps", "-q", "--label", label).stdout.split()[0]
        return self.crictl("exec", container, *argv, check=check)

    def log(self, name: str, lines: int = 40) -> str:
        return log_tail(self.directory / f"{name}.log", lines)

    def alive(self, name: str) -> None:
        process = self.daemons[name]
        assert process.poll() is None, f"{name} on {self.name} exited:\n{self.log(name)}"

    # --------------------------------------------------------------- cgroups

    def _hierarchies(self) -> list[Path]:
        return [p for p in CGROUP_ROOT.iterdir() if p.is_dir() and not p.is_symlink()]

    def _make_cgroup_root(self) -> None:
        """kubelet requires its cgroupRoot in every hierarchy; cpuset needs cpus/mems."""
        for hierarchy in self._hierarchies():
            own = hierarchy / self.cgroup_root.lstrip("/")
            own.mkdir(exist_ok=True)
            for key in ("cpuset.cpus", "cpuset.mems"):
                if (own / key).exists():
                    (own / key).write_text((hierarchy / key).read_text())

    def _remove_cgroups(self) -> None:
        for hierarchy in self._hierarchies():
            own = hierarchy / self.cgroup_root.lstrip("/")
            if not own.exists():
                continue
            for path in sorted(
                (p for p in own.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
            ):
                _rmdir_when_empty(path)
            _rmdir_when_empty(own)

    def footprint(self) -> list[str]:
        """The host paths this node makes: its netns and its cgroup in each hierarchy."""
        cgroups = [str(h / self.cgroup_root.lstrip("/")) for h in self._hierarchies()]
        return [self.netns.path, *cgroups]

    # ----------------------------------------------------------------- stop

    def processes(self) -> list[int]:
        """PIDs of everything running in this node's mount namespace but the holder."""
        if self.holder is None or self.holder.poll() is not None:
            return []
        mine = _mount_ns(self.holder.pid)
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != self.holder.pid and _mount_ns(int(entry)) == mine:
                found.append(int(entry))
        return found

    def stop_daemon(self, name: str) -> None:
        process = self.daemons.pop(name, None)
        if process is not None:
            stop_process(process, STOP_TIMEOUT)

    def destroy(self) -> None:
        """Stop everything this node runs, by PID, and remove what it made."""
        for name in ("kube-proxy", "kubelet"):
            self.stop_daemon(name)
        if "containerd" in self.daemons:
            self._remove_sandboxes()
        for name in ("calico-node", *self.daemons):
            self.stop_daemon(name)
        for pid in self.processes():  # container shims and whatever they still run
            _kill(pid)
        if self.holder is not None:
            stop_process(self.holder, STOP_TIMEOUT, signal.SIGKILL)
        self._remove_cgroups()
        self.netns.delete()

    def _remove_sandboxes(self) -> None:
        """containerd tears down each pod sandbox (CNI DEL) before it stops."""
        listed = self.crictl("pods", "-q", check=False, timeout=60)
        for sandbox in listed.stdout.split():
            self.crictl("stopp", sandbox, check=False)
            self.crictl("rmp", "-f", sandbox, check=False)


def _mount_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _rmdir_when_empty(path: Path, timeout: float = 10.0) -> None:
    """A cgroup can be removed once its last process has gone, which takes a moment."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def kubeconfig_text(server: str, ca_pem: bytes, user: str, token: str) -> str:
    """A kubeconfig like the ones kubeadm writes, for one user's token."""
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "local",
                    "cluster": {
                        "server": server,
                        "certificate-authority-data": base64.b64encode(ca_pem).decode(),
                    },
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "default", "context": {"cluster": "local", "user": user}}],
            "current-context": "default",
        },
        sort_keys=False,
    )


def write_private(path: Path, text: str, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def poll(condition: Callable[[], Any], what: str, timeout: float = 180.0) -> Any:
    """Like harness.wait_for, but returns the condition's truthy value; polls every 0.5 s
    (the things waited for here are kubelet's and the controllers' syncs)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.5)


__all__ = ["Fabric", "KubeNode", "kubeconfig_text", "poll", "write_private"]

"""A real Kubernetes cluster on simulated nodes, with Calico installed as the README says.

The control plane runs on this machine's loopback: etcd and kube-apiserver
(tests/k8s/fixture.py), kube-controller-manager, kube-scheduler and
calico-kube-controllers. Each node (node.py) runs containerd, kubelet and kube-proxy in
its own namespaces and reaches the API server on its own 127.0.0.1:<port> through a
relay, so every kubeconfig names the same server. Binaries are built from Go modules at
the API server's version and cached (tests/k8s/kube-build.sh); the pause and busybox
images are built locally (images.sh), since no registry is reachable.

    with kube_cluster(tmp_path, nodes=2) as cluster:
        cluster.kubectl("create", "deployment", "web", "--image", cluster.busybox, ...)

Identities are the cluster's own: each kubelet is `system:node:<name>` in `system:nodes`
(the Node authorizer's), kube-proxy `system:kube-proxy`, the scheduler
`system:kube-scheduler`, calico-kube-controllers and the CNI plugin their service
accounts with the roles in conf/; the controller manager runs as admin (without
service-account credentials its own role does not cover the controllers).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.cluster.node import FABRIC_PREFIX, Fabric, KubeNode, kubeconfig_text, poll, write_private
from tests.etcd.cni_support import LoopbackRelay
from tests.etcd_fixture import stop_process
from tests.harness import REPO, bin_dir, calico_cli
from tests.k8s.fixture import (
    CALICO_NODE_USER,
    CNI_USER,
    KUBE_CONTROLLERS_USER,
    KubeCluster,
    User,
    kube_apiserver,
    kube_binaries,
)
from tests.k8s.k8s_support import objects

IMAGES = Path(__file__).with_name("images.sh")
COMMANDS = (
    "kubelet",
    "kube-controller-manager",
    "kube-scheduler",
    "kube-proxy",
    "kubectl",
    "crictl",
)
CALICO_NODE_ENV = REPO / "conf" / "calico-node.env"
POD_POOL = "10.244.0.0/16"  # conf/ippool-default.yaml
LEAK_GRACE = "5s"
STOP_TIMEOUT = 20.0
NODE_READY_TIMEOUT = 180.0


def ensure_images() -> tuple[list[Path], str]:
    """The image archives to import and their tag."""
    built = subprocess.run([IMAGES, "build"], check=True, stdout=subprocess.PIPE, text=True)
    tag = subprocess.run([IMAGES, "tag"], check=True, stdout=subprocess.PIPE, text=True)
    return [Path(line) for line in built.stdout.split()], tag.stdout.strip()


@dataclass
class Cluster:
    """The running cluster and the ways a test reaches it."""

    kube: KubeCluster
    directory: Path
    binaries: dict[str, Path]
    image_archives: list[Path]
    image_tag: str
    fabric: Fabric
    nodes: dict[str, KubeNode] = field(default_factory=dict)
    control: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    made: list[str] = field(default_factory=list)  # host paths of every node ever added
    _stack: ExitStack = field(default_factory=ExitStack)

    @property
    def busybox(self) -> str:
        return f"localhost/busybox:{self.image_tag}"

    @property
    def pause(self) -> str:
        return f"localhost/pause:{self.image_tag}"

    @property
    def port(self) -> int:
        return int(self.kube.server.rsplit(":", 1)[1])

    # ------------------------------------------------------------ operators

    def kubectl(
        self, *argv: str, check: bool = True, stdin: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """kubectl as the cluster's admin."""
        out = subprocess.run(
            [str(self.binaries["kubectl"]), "--kubeconfig", str(self.kube.admin_kubeconfig), *argv],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and out.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(argv)} failed: {out.stderr}{out.stdout}")
        return out

    def get(self, *argv: str) -> Any:
        """`kubectl get ... -o json`, decoded."""
        return json.loads(self.kubectl("get", *argv, "-o", "json").stdout)

    def calico(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """`calico <argv>` (calicoctl) as the operator runs it against this cluster."""
        env = {"DATASTORE_TYPE": "kubernetes", "KUBECONFIG": str(self.kube.admin_kubeconfig)}
        return calico_cli(*argv, env=env)

    def pod(self, name: str, namespace: str = "default") -> dict[str, Any]:
        return self.get("pod", "-n", namespace, name)

    def wait_running(self, name: str, namespace: str = "default", timeout: float = 180) -> dict:
        def running() -> dict | None:
            pod = self.pod(name, namespace)
            ready = [c for c in pod["status"].get("conditions", []) if c["type"] == "Ready"]
            return pod if ready and ready[0]["status"] == "True" else None

        try:
            return poll(running, f"pod {namespace}/{name} running", timeout)
        except AssertionError as err:
            events = self.kubectl(
                "get", "events", "-n", namespace, "--field-selector",
                f"involvedObject.name={name}", check=False,
            )  # fmt: skip
            raise AssertionError(f"{err}\n{events.stdout[-3000:]}") from None

    def ipam_objects(self, plural: str) -> dict[str, dict[str, Any]]:
        return objects(self.kube, plural)

    def allocations(self) -> dict[str, dict[str, str]]:
        """Every allocated address -> its attributes (handle_id and the secondary ones)."""
        import ipaddress

        found = {}
        for block in self.ipam_objects("ipamblocks").values():
            spec = block["spec"]
            network = ipaddress.ip_network(spec["cidr"])
            for ordinal, index in enumerate(spec["allocations"]):
                if index is not None:
                    attribute = spec["attributes"][index]
                    found[str(network[ordinal])] = {
                        "handle_id": attribute["handle_id"],
                        **(attribute.get("secondary") or {}),
                    }
        return found

    # ---------------------------------------------------------------- nodes

    def add_node(self, name: str) -> KubeNode:
        """Create a node, install Calico on it the operator's way, start its daemons, and
        wait until it is a Ready Node."""
        address = f"{FABRIC_PREFIX}.{10 + len(self.nodes)}"
        node = KubeNode.create(
            name, address, self.directory / name, self.fabric, self.binaries["crictl"]
        )
        self.nodes[name] = node
        self.made += node.footprint()
        relay = LoopbackRelay([self.port], [node.netns.path])
        relay.__enter__()
        self._stack.callback(relay.__exit__, None, None, None)
        self.install_calico(node)
        self._start_containerd(node)
        self._start_kubelet(node)
        self._start_kube_proxy(node)
        self.wait_node_ready(name)
        self._start_calico_node(node)
        return node

    def install_calico(self, node: KubeNode) -> None:
        """README "On a Kubernetes node": the plugins, the kubeconfig, the conflist."""
        node.run("make", "-C", str(REPO), "--no-print-directory", "install")
        for plugin in ("loopback", "portmap"):  # Debian's; containerd sets lo up with loopback
            node.run("ln", "-sf", f"/usr/lib/cni/{plugin}", f"/opt/cni/bin/{plugin}")
        template = (REPO / "conf" / "calico-kubeconfig.template").read_text()
        kubeconfig = (
            template.replace("__KUBERNETES_SERVICE_HOST__", "127.0.0.1")
            .replace("__KUBERNETES_SERVICE_PORT__", str(self.port))
            .replace(
                "__CA_DATA_BASE64__", base64.b64encode(self.kube.ca_path.read_bytes()).decode()
            )
            .replace("__SERVICEACCOUNT_TOKEN__", self.kube.tokens[CNI_USER])
        )
        staged = node.directory / "calico-kubeconfig"
        write_private(staged, kubeconfig)
        node.run("install", "-D", "-m", "0600", str(staged), "/etc/cni/net.d/calico-kubeconfig")
        conflist = REPO / "conf" / "10-calico-k8s.conflist"
        node.run("cp", str(conflist), "/etc/cni/net.d/10-calico.conflist")

    def set_conflist(self, node: KubeNode, text: str) -> None:
        """Replace the node's conflist (containerd picks changes up by itself)."""
        staged = node.directory / "conflist.new"
        staged.write_text(text)
        node.run("cp", str(staged), "/etc/cni/net.d/10-calico.conflist")

    def _write_kubeconfig(self, node: KubeNode, user: str, inside: str) -> None:
        staged = node.directory / Path(inside).name
        write_private(
            staged,
            kubeconfig_text(
                self.kube.server, self.kube.ca_path.read_bytes(), user, self.kube.tokens[user]
            ),
        )
        node.run("install", "-D", "-m", "0600", str(staged), inside)

    def _start_containerd(self, node: KubeNode) -> None:
        config = node.directory / "containerd.toml"
        config.write_text(
            CONTAINERD_CONFIG.format(root=node.directory / "containerd", pause=self.pause)
        )
        node.spawn("containerd", ["containerd", "--config", str(config)])
        poll(
            lambda: node.alive("containerd") or node.crictl("info", check=False).returncode == 0,
            f"containerd on {node.name}",
            60,
        )
        for archive in self.image_archives:
            node.run("ctr", "-n", "k8s.io", "images", "import", str(archive))

    def _start_kubelet(self, node: KubeNode) -> None:
        self._write_kubeconfig(node, f"system:node:{node.name}", "/etc/kubernetes/kubelet.conf")
        config = node.directory / "kubelet.yaml"
        config.write_text(yaml.safe_dump(kubelet_config(node), sort_keys=False))
        node.spawn(
            "kubelet",
            [
                str(self.binaries["kubelet"]),
                f"--config={config}",
                "--kubeconfig=/etc/kubernetes/kubelet.conf",
                f"--node-ip={node.address}",
                "--v=2",
            ],
        )

    def _start_kube_proxy(self, node: KubeNode) -> None:
        self._write_kubeconfig(node, "system:kube-proxy", "/etc/kubernetes/kube-proxy.conf")
        config = node.directory / "kube-proxy.yaml"
        config.write_text(yaml.safe_dump(kube_proxy_config(node), sort_keys=False))
        node.spawn("kube-proxy", [str(self.binaries["kube-proxy"]), f"--config={config}", "--v=2"])

    def _start_calico_node(self, node: KubeNode) -> None:
        """README: calico-node's kubeconfig, conf/calico-node.env and its unit's command,
        once kubelet has registered the Node it runs for; ready when BIRD is."""
        self._write_kubeconfig(node, CALICO_NODE_USER, "/etc/calico/calico-node.kubeconfig")
        node.run("install", "-D", "-m", "0644", str(CALICO_NODE_ENV), "/etc/calico/calico-node.env")
        env = environment_file(CALICO_NODE_ENV)
        node.spawn("calico-node", ["/opt/cni/bin/calico-node"], env)

        def ready() -> bool:
            node.alive("calico-node")
            probe = node.run(
                "env",
                *(f"{k}={v}" for k, v in env.items()),
                "/opt/cni/bin/calico-node",
                "-bird-ready",
                check=False,
            )
            return probe.returncode == 0

        try:
            poll(ready, f"calico-node on {node.name} ready", NODE_READY_TIMEOUT)
        except AssertionError as err:
            raise AssertionError(f"{err}\n{node.log('calico-node', 40)}") from None

    def wait_node_ready(self, name: str) -> None:
        node = self.nodes[name]

        def ready() -> bool:
            for daemon in ("containerd", "kubelet", "kube-proxy"):
                node.alive(daemon)
            out = self.kubectl("get", "node", name, "-o", "json", check=False)
            if out.returncode != 0:
                return False
            conditions = json.loads(out.stdout)["status"].get("conditions", [])
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

        try:
            poll(ready, f"node {name} Ready", NODE_READY_TIMEOUT)
        except AssertionError as err:
            raise AssertionError(f"{err}\n--- kubelet:\n{node.log('kubelet', 60)}") from None

    def remove_node(self, name: str) -> None:
        """Stop a node's daemons and namespaces (the machine goes away)."""
        node = self.nodes.pop(name)
        node.destroy()

    # -------------------------------------------------------- control plane

    def start_control_plane(self) -> None:
        kube = self.kube
        manager_conf = kube.kubeconfig("admin", self.directory / "controller-manager.conf")
        scheduler_conf = kube.kubeconfig("system:kube-scheduler", self.directory / "scheduler.conf")
        self._spawn(
            "kube-controller-manager",
            [
                str(self.binaries["kube-controller-manager"]),
                f"--kubeconfig={manager_conf}",
                "--secure-port=0",
                "--leader-elect=false",
                "--allocate-node-cidrs=false",
                "--controllers=*",
                f"--service-account-private-key-file={kube.service_account_key}",
                f"--root-ca-file={kube.ca_path}",
                "--node-monitor-grace-period=20s",
                # Its default, /usr/libexec/kubernetes/..., is created on the host it runs on.
                f"--flex-volume-plugin-dir={self.directory / 'flex-volume'}",
                "--v=1",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                str(self.binaries["kube-scheduler"]),
                f"--kubeconfig={scheduler_conf}",
                f"--authentication-kubeconfig={scheduler_conf}",
                f"--authorization-kubeconfig={scheduler_conf}",
                "--secure-port=0",
                "--leader-elect=false",
                "--v=1",
            ],
        )
        # The seed's pool. The nodes share one subnet and this kernel has no ipip module
        # (DESIGN.md), so the operator routes it natively: ipipMode Never.
        pool = self.directory / "ippool.yaml"
        pool.write_text(
            (REPO / "conf" / "ippool-default.yaml")
            .read_text()
            .replace("ipipMode: CrossSubnet", "ipipMode: Never")
        )
        applied = self.calico("ctl", "apply", "-f", str(pool))
        assert applied.returncode == 0, applied.stderr
        self.kubectl(
            "apply",
            "-f",
            "-",
            stdin=yaml.safe_dump(
                {
                    "apiVersion": "crd.projectcalico.org/v1",
                    "kind": "KubeControllersConfiguration",
                    "metadata": {"name": "default"},
                    "spec": {"controllers": {"node": {"leakGracePeriod": LEAK_GRACE}}},
                }
            ),
        )
        controllers_conf = kube.kubeconfig(KUBE_CONTROLLERS_USER, self.directory / "kc.conf")
        self._spawn(
            "calico-kube-controllers",
            [str(bin_dir() / "calico-kube-controllers")],
            {"DATASTORE_TYPE": "kubernetes", "KUBECONFIG": str(controllers_conf)},
        )

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        with open(self.directory / f"{name}.log", "wb") as out:
            self.control[name] = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})},
            )

    def footprint(self) -> list[str]:
        """Every host path the cluster made (netns, cgroups): gone once it stopped."""
        return [self.fabric.netns.path, *self.made]

    def stop(self) -> None:
        """Delete every pod first, so each sandbox's CNI DEL runs while kubelet and
        containerd are still there, then stop nodes and the control plane by PID."""
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            self.kubectl(
                "delete",
                "deployments,services,pods",
                "--all",
                "--all-namespaces",
                "--grace-period=1",
                "--wait=true",
                timeout=180,
            )
        for name in list(self.nodes):
            self.remove_node(name)
        for process in self.control.values():
            stop_process(process, STOP_TIMEOUT)
        self._stack.close()
        self.fabric.destroy()


@contextmanager
def kube_cluster(directory: Path, nodes: int = 1) -> Iterator[Cluster]:
    """A control plane and `nodes` Ready nodes; everything stopped and removed on exit."""
    binaries = kube_binaries(*COMMANDS)
    archives, tag = ensure_images()
    names = [f"node{i + 1}" for i in range(nodes)]
    users = [User(f"system:node:{n}", ("system:nodes",)) for n in names]
    users += [User("system:kube-proxy"), User("system:kube-scheduler")]
    with kube_apiserver(directory / "control-plane", users) as kube:
        cluster = Cluster(kube, directory, binaries, archives, tag, Fabric.create())
        try:
            cluster.start_control_plane()
            for name in names:
                cluster.add_node(name)
            yield cluster
        finally:
            cluster.stop()


def environment_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as systemd's EnvironmentFile= reads them (comments skipped)."""
    pairs = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def kubelet_config(node: KubeNode) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": node.cgroup_root,
        "failCgroupV1": False,
        "failSwapOn": False,
        "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "address": node.address,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "resolvConf": "",
        "volumePluginDir": "/var/lib/kubelet/volume-plugins",
        "evictionHard": {
            "memory.available": "50Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "imageGCHighThresholdPercent": 99,
        "imageGCLowThresholdPercent": 98,
        "syncFrequency": "10s",
        "nodeStatusUpdateFrequency": "5s",
        "maxPods": 30,
        "protectKernelDefaults": False,
    }


def kube_proxy_config(node: KubeNode) -> dict[str, Any]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": "/etc/kubernetes/kube-proxy.conf"},
        "mode": "iptables",
        "hostnameOverride": node.name,
        "clusterCIDR": POD_POOL,
        "bindAddress": node.address,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        # The conntrack table size and timeouts are not this node's to change.
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
    }


# containerd's defaults (/run/containerd, /etc/cni/net.d, /opt/cni/bin) are the node's
# own; its root (images and snapshots) is the node's directory too, named here only so
# that a test can find it.
CONTAINERD_CONFIG = """\
version = 2
root = "{root}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  enable_selinux = false
  disable_apparmor = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
"""

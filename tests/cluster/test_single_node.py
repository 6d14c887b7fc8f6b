"""One node of a real cluster: kubelet and containerd create pods through the shipped
conflist, as a user runs them with kubectl.

What a user notices is asserted: pod status and annotations, the node's veth and route,
pings, `calico ipam show|check`, and that `kubectl delete pod` leaves nothing (CNI DEL ran:
no veth, route, pod netns, address or handle). The 1.1.0 conflist that containerd 1.6
cannot read shows how a sandbox failed after a successful ADD is cleaned up.
"""

from __future__ import annotations

import ipaddress
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.cluster import POD_POOL, Cluster
from tests.cluster.conftest import checked_cluster
from tests.cluster.node import KUBELET_TUNABLES, KubeNode, poll
from tests.harness import REPO

SHIPPED = REPO / "conf" / "10-calico-k8s.conflist"
CONTAINER_ID = "cni.projectcalico.org/containerID"
KUBELET_WANTS = {
    "vm/overcommit_memory": "1",
    "vm/panic_on_oom": "0",
    "kernel/panic": "10",
    "kernel/panic_on_oops": "1",
    "kernel/keys/root_maxkeys": "1000000",
    "kernel/keys/root_maxbytes": "25000000",
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with checked_cluster(tmp_path_factory.mktemp("one-node"), nodes=1) as running:
        yield running


@pytest.fixture
def node(cluster: Cluster) -> KubeNode:
    return cluster.nodes["node1"]


def run_pod(cluster: Cluster, command: str = "sleep 3600") -> tuple[str, dict]:
    """`kubectl run` a busybox pod (it exits at once on TERM) and wait until it runs."""
    name = f"p-{uuid.uuid4().hex[:6]}"
    cluster.kubectl(
        "run",
        name,
        f"--image={cluster.busybox}",
        "--image-pull-policy=Never",
        "--",
        "sh",
        "-c",
        f"trap 'exit 0' TERM; {command} & wait",
    )
    return name, cluster.wait_running(name)


def host_routes(node: KubeNode) -> dict[str, str]:
    """Pod /32 routes in the node's netns: destination -> device."""
    routes = json.loads(node.run("ip", "-j", "-4", "route", "show").stdout)
    return {r["dst"]: r["dev"] for r in routes if r.get("dev", "").startswith("cali")}


def pod_netns(node: KubeNode) -> list[str]:
    """containerd's pod netns files (on the node's own /run)."""
    out = node.run("ls", "/run/netns", check=False)
    return [n for n in out.stdout.split() if n.startswith("cni-")]


def test_the_shipped_conflist_is_installed_unchanged_and_containerd_loads_it(
    cluster: Cluster, node: KubeNode
) -> None:
    installed = node.path("/etc/cni/net.d/10-calico.conflist").read_bytes()
    assert installed == SHIPPED.read_bytes()
    assert json.loads(installed)["cniVersion"] == "1.0.0"
    info = json.loads(node.crictl("info").stdout)
    conditions = {c["type"]: c["status"] for c in info["status"]["conditions"]}
    assert conditions == {"RuntimeReady": True, "NetworkReady": True}
    loaded = info["cniconfig"]["Networks"][-1]["Config"]
    assert loaded["Name"] == "k8s-pod-network" and loaded["CNIVersion"] == "1.0.0"
    assert [p["Network"]["type"] for p in loaded["Plugins"]] == ["calico", "portmap"]


def test_a_pod_gets_its_calico_address_and_annotations(cluster: Cluster, node: KubeNode) -> None:
    name, pod = run_pod(cluster)
    ip = pod["status"]["podIP"]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(POD_POOL)
    assert pod["status"]["podIPs"] == [{"ip": ip}]
    annotations = pod["metadata"]["annotations"]
    sandbox = node.crictl("pods", "-q", "--name", name).stdout.split()
    assert annotations == {
        "cni.projectcalico.org/podIP": f"{ip}/32",
        "cni.projectcalico.org/podIPs": f"{ip}/32",
        CONTAINER_ID: sandbox[0],
    }
    allocation = cluster.allocations()[ip]
    assert allocation["handle_id"] == f"k8s-pod-network.{sandbox[0]}"
    assert (allocation["namespace"], allocation["pod"], allocation["node"]) == (
        "default",
        name,
        "node1",
    )
    veth = host_routes(node)[ip]
    link = json.loads(node.run("ip", "-j", "link", "show", veth).stdout)[0]
    assert link["address"] == "ee:ee:ee:ee:ee:ee"
    inside = node.pod_exec(name, "ip", "-4", "addr", "show", "eth0").stdout
    assert f"inet {ip}/32" in inside
    assert "default via 169.254.1.1" in node.pod_exec(name, "ip", "route").stdout
    assert node.pod_exec(name, "ping", "-c", "1", "-W", "5", node.address).returncode == 0
    assert node.run("ping", "-c", "1", "-W", "5", ip).returncode == 0
    show = cluster.calico("ipam", "show", "--show-blocks")
    assert show.returncode == 0 and POD_POOL in show.stdout, show
    cluster.kubectl("delete", "pod", name, "--grace-period=1", "--wait=true")


def test_kubectl_delete_pod_leaves_nothing_behind(cluster: Cluster, node: KubeNode) -> None:
    netns_before, veths_before = set(pod_netns(node)), set(host_routes(node).values())
    name, pod = run_pod(cluster)
    ip, sandbox = pod["status"]["podIP"], pod["metadata"]["annotations"][CONTAINER_ID]
    assert len(set(pod_netns(node)) - netns_before) == 1
    assert host_routes(node)[ip] not in veths_before

    cluster.kubectl("delete", "pod", name, "--grace-period=1", "--wait=true")
    poll(lambda: ip not in host_routes(node), "the pod's route and veth removed", 60)
    assert set(host_routes(node).values()) == veths_before
    assert set(pod_netns(node)) == netns_before
    assert ip not in cluster.allocations()
    assert f"k8s-pod-network.{sandbox}" not in cluster.ipam_objects("ipamhandles")
    # kubelet removes the stopped sandbox at its next garbage collection; stopped it is.
    states = json.loads(node.crictl("pods", "--name", name, "-o", "json").stdout)["items"]
    assert [s["state"] for s in states] in ([], ["SANDBOX_NOTREADY"])
    check = cluster.calico("ipam", "check")
    assert check.returncode == 0 and "found 0 problems" in check.stdout, check.stdout


def test_kubelets_global_tunables_never_reach_the_host(node: KubeNode) -> None:
    """kubelet set its values (the node sees them through its covers); the host kept its."""
    seen = {t: node.run("cat", f"/proc/sys/{t}").stdout.strip() for t in KUBELET_TUNABLES}
    assert seen == KUBELET_WANTS
    host = {t: Path("/proc/sys", t).read_text().strip() for t in KUBELET_TUNABLES}
    assert host == node.host_tunables


def test_a_sandbox_failed_after_its_add_leaves_nothing_for_long(
    cluster: Cluster, node: KubeNode
) -> None:
    """The 1.1.0 conflist this project used to ship: calico's ADD succeeds, containerd 1.6
    cannot read the result and fails the sandbox, and its cleanup stops at portmap's DEL,
    so the address, veth and netns stay (cri-probe.md). The user force-deletes the stuck
    pod: calico-kube-controllers releases the address (no DEL ever will); once the
    conflist is fixed, kubelet's sandbox cleanup runs the DEL that removes the rest."""
    netns_before, veths_before = set(pod_netns(node)), set(host_routes(node).values())
    stale = json.loads(SHIPPED.read_text())
    stale["cniVersion"] = "1.1.0"
    cluster.set_conflist(node, json.dumps(stale, indent=2))
    try:
        name = f"stuck-{uuid.uuid4().hex[:6]}"
        cluster.kubectl(
            "run", name, f"--image={cluster.busybox}", "--image-pull-policy=Never",
            "--", "sleep", "3600",
        )  # fmt: skip

        def leaked() -> list[str]:
            return [ip for ip, a in cluster.allocations().items() if a.get("pod") == name]

        ips = poll(leaked, "the failed sandbox's address", 120)
        events = cluster.kubectl("get", "events", "--field-selector", f"involvedObject.name={name}")
        assert 'unsupported CNI result version "1.1.0"' in events.stdout
        assert cluster.pod(name)["status"]["phase"] == "Pending"
        assert len(set(host_routes(node).values()) - veths_before) == 1  # left behind

        cluster.kubectl("delete", "pod", name, "--force", "--grace-period=0")
        poll(lambda: not leaked(), "calico-kube-controllers to release the address", 120)
        log = (cluster.directory / "calico-kube-controllers.log").read_text()
        assert "Garbage collecting leaked IP address" in log
        assert f'ip="{ips[0]}"' in log and f'pod="default/{name}"' in log
    finally:
        cluster.set_conflist(node, SHIPPED.read_text())
    poll(
        lambda: (
            set(host_routes(node).values()) == veths_before and set(pod_netns(node)) == netns_before
        ),
        "kubelet's sandbox cleanup to remove the veth and netns",
        180,
    )
    check = cluster.calico("ipam", "check")
    assert check.returncode == 0 and "found 0 problems" in check.stdout, check.stdout

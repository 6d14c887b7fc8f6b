"""calico-kube-controllers' IPAM garbage collection against a real kube-apiserver.

The built `calico-kube-controllers` runs as its own process with its service account's
kubeconfig, as an operator runs it; addresses are allocated by the IPAM engine with the
attributes the CNI plugin records, pods and nodes are real API objects. What a user
notices is asserted: which allocations and handles remain, block affinities, the
controller's log, `calico ipam check`, exit codes. (The cluster suites in tests/cluster
show the same collector freeing what a failed containerd sandbox left.)
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ipam_plugin.engine import IPAM, AutoAssignRequest
from tests.etcd_fixture import log_tail, stop_process
from tests.harness import bin_dir, wait_for
from tests.k8s.fixture import KUBE_CONTROLLERS_USER, STRATEGIC_MERGE_PATCH, ApiError, KubeCluster
from tests.k8s.k8s_support import (
    CRD_V1,
    add_pool,
    allocations,
    cluster,
    cni_store,
    ctl,
    delete_pods,
    needs_apiserver,
    objects,
    wipe_calico,
)

__all__ = ["cluster"]
pytestmark = needs_apiserver
POOL = "10.77.0.0/16"
CONFIG = f"{CRD_V1}/kubecontrollersconfigurations"


@dataclass
class Controllers:
    """A running calico-kube-controllers and its log."""

    process: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_logged(self, needle: str, timeout: float = 60) -> None:
        wait_for(lambda: needle in self.text(), f"{needle!r} in the log", timeout)
        assert self.process.poll() is None, log_tail(self.log, 30)


@pytest.fixture
def kube(cluster: KubeCluster) -> Iterator[KubeCluster]:
    """The module's API server with no pods left by earlier tests and no Calico data."""
    delete_pods(cluster)
    wipe_calico(cluster)
    delete_config(cluster)
    add_pool(cluster, "gc-pool", POOL, blockSize=26)
    yield cluster
    delete_config(cluster)


def delete_config(cluster: KubeCluster) -> None:
    try:
        cluster.admin.request("DELETE", f"{CONFIG}/default")
    except ApiError as err:
        if err.status != 404:
            raise


def set_leak_grace(cluster: KubeCluster, grace: str, **node: str) -> None:
    """The operator's `kubectl apply` of KubeControllersConfiguration `default`."""
    delete_config(cluster)
    cluster.admin.create(
        CONFIG,
        {
            "apiVersion": "crd.projectcalico.org/v1",
            "kind": "KubeControllersConfiguration",
            "metadata": {"name": "default"},
            "spec": {"controllers": {"node": {"leakGracePeriod": grace, **node}}},
        },
    )


@pytest.fixture
def start_controllers(kube: KubeCluster, tmp_path: Path) -> Iterator:
    started: list[subprocess.Popen[bytes]] = []
    kubeconfig = kube.kubeconfig(KUBE_CONTROLLERS_USER, tmp_path / "controllers.kubeconfig")

    def start(**env: str) -> Controllers:
        log = tmp_path / f"controllers-{len(started)}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [str(bin_dir() / "calico-kube-controllers")],
                env={
                    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    "DATASTORE_TYPE": "kubernetes",
                    "KUBECONFIG": str(kubeconfig),
                    **env,
                },
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        started.append(process)
        return Controllers(process, log)

    yield start
    for process in started:
        stop_process(process, 15)


def namespace(kube: KubeCluster) -> str:
    name = f"gc-{uuid.uuid4().hex[:8]}"
    kube.create_namespace(name)
    return name


def allocate(kube: KubeCluster, ns: str, pod: str, node: str) -> tuple[str, str]:
    """What calico-ipam ADD writes for a pod: returns its address and handle."""
    handle = f"k8s-pod-network.{uuid.uuid4().hex}"
    with cni_store(kube) as store:
        v4, _ = IPAM(store).auto_assign(
            AutoAssignRequest(
                handle_id=handle,
                hostname=node,
                attrs={"node": node, "namespace": ns, "pod": pod, "timestamp": "now"},
            )
        )
    return str(v4.ips[0].ip), handle


def report_ip(kube: KubeCluster, ns: str, pod: str, ip: str) -> None:
    """What kubelet writes once the sandbox is up: the pod's status IPs."""
    kube.admin.request(
        "PATCH",
        f"/api/v1/namespaces/{ns}/pods/{pod}/status",
        {"status": {"podIP": ip, "podIPs": [{"ip": ip}]}},
        STRATEGIC_MERGE_PATCH,
    )


def delete_pod(kube: KubeCluster, ns: str, pod: str) -> None:
    kube.admin.request("DELETE", f"/api/v1/namespaces/{ns}/pods/{pod}", {"gracePeriodSeconds": 0})


def ensure_node(kube: KubeCluster, name: str) -> None:
    try:
        kube.create_node(name)
    except ApiError as err:
        if err.status != 409:
            raise


def handles(kube: KubeCluster) -> set[str]:
    return set(objects(kube, "ipamhandles"))


def leaked_address(kube: KubeCluster) -> tuple[str, str]:
    """An address whose pod was deleted without a CNI DEL: its IP and handle."""
    ensure_node(kube, "gc-node1")
    ns = namespace(kube)
    kube.create_pod(ns, "gone", "gc-node1")
    leaked = allocate(kube, ns, "gone", "gc-node1")
    delete_pod(kube, ns, "gone")
    return leaked


def test_address_of_a_deleted_pod_is_released_after_the_grace_period(
    kube: KubeCluster, start_controllers
) -> None:
    gone_ip, gone_handle = leaked_address(kube)
    ns = namespace(kube)
    kube.create_pod(ns, "live", "gc-node1")
    live_ip, live_handle = allocate(kube, ns, "live", "gc-node1")
    report_ip(kube, ns, "live", live_ip)

    check = ctl(kube, "ipam", "check", "--show-problem-ips")
    assert check.returncode == 1, check
    assert "Found 1 IPs that are allocated in IPAM but not actually in use." in check.stdout
    assert f"  {gone_ip} leaked" in check.stdout

    set_leak_grace(kube, "3s")
    controllers = start_controllers()
    controllers.wait_logged("Candidate IP leak")
    assert gone_handle in handles(kube), "released before the grace period"
    wait_for(lambda: gone_handle not in handles(kube), "the leak released", 60)
    assert allocations(kube) == {live_ip: live_handle}
    text = controllers.text()
    assert "Garbage collecting leaked IP address" in text and f'ip="{gone_ip}"' in text
    assert f'ip="{live_ip}"' not in text
    check = ctl(kube, "ipam", "check")
    assert check.returncode == 0 and "found 0 problems" in check.stdout, check.stdout


def test_addresses_of_live_pods_are_never_released(kube: KubeCluster, start_controllers) -> None:
    """A pod that has not reported an address yet (ADD in flight) and a running pod keep
    theirs across many scans; so does an allocation without pod attributes."""
    ensure_node(kube, "gc-node1")
    ns = namespace(kube)
    kube.create_pod(ns, "starting", "gc-node1")
    kube.create_pod(ns, "running", "gc-node1")
    starting = allocate(kube, ns, "starting", "gc-node1")
    running = allocate(kube, ns, "running", "gc-node1")
    report_ip(kube, ns, "running", running[0])
    with cni_store(kube) as store:
        v4, _ = IPAM(store).auto_assign(
            AutoAssignRequest(handle_id="no-owner", hostname="gc-node1", attrs={})
        )
    before = allocations(kube)
    assert len(before) == 3 and before[str(v4.ips[0].ip)] == "no-owner"

    set_leak_grace(kube, "1s")
    controllers = start_controllers(LOG_LEVEL="debug")
    for _ in range(3):  # three full passes: each logs its end at debug level
        seen = controllers.text().count("IPAM garbage collection pass done")
        controllers.wait_logged("IPAM garbage collection pass done")
        wait_for(
            lambda seen=seen: controllers.text().count("IPAM garbage collection pass done") > seen,
            "another pass",
        )
    assert allocations(kube) == before
    assert "Candidate IP leak" not in controllers.text()
    assert {starting[1], running[1]} <= handles(kube)


def test_a_sandbox_that_failed_after_its_add_is_collected(
    kube: KubeCluster, start_controllers
) -> None:
    """The pod runs with the address of its second sandbox; the first sandbox's address
    (ADD done, runtime failed, no DEL) is released, the pod's own is kept."""
    ensure_node(kube, "gc-node1")
    ns = namespace(kube)
    kube.create_pod(ns, "web", "gc-node1")
    lost_ip, lost_handle = allocate(kube, ns, "web", "gc-node1")
    assert lost_ip in allocations(kube)
    kept_ip, kept_handle = allocate(kube, ns, "web", "gc-node1")
    report_ip(kube, ns, "web", kept_ip)
    set_leak_grace(kube, "2s")
    controllers = start_controllers()
    wait_for(lambda: lost_handle not in handles(kube), "the failed sandbox's address released")
    assert allocations(kube) == {kept_ip: kept_handle}
    assert "holds other addresses" in controllers.text()


def test_a_deleted_nodes_addresses_and_blocks_are_released_at_once(
    kube: KubeCluster, start_controllers
) -> None:
    """Two nodes leave: one crashed with a pod on it (its address is released without
    waiting for the grace period, an hour here), one was drained first (its pods' DELs
    ran, its empty block stays affine to it until the collector gives it up)."""
    ensure_node(kube, "gc-node1")
    kube.create_node("gc-crashed")
    kube.create_node("gc-drained")
    ns = namespace(kube)
    kube.create_pod(ns, "orphan", "gc-crashed")
    kube.create_pod(ns, "stays", "gc-node1")
    allocate(kube, ns, "orphan", "gc-crashed")
    stays_ip, stays_handle = allocate(kube, ns, "stays", "gc-node1")
    _, drained_handle = allocate(kube, ns, "evicted", "gc-drained")
    with cni_store(kube) as store:
        IPAM(store).release_by_handle(drained_handle)  # the eviction's CNI DEL
    report_ip(kube, ns, "stays", stays_ip)
    affine = {b["spec"]["affinity"] for b in objects(kube, "ipamblocks").values()}
    assert affine == {"host:gc-node1", "host:gc-crashed", "host:gc-drained"}
    delete_pod(kube, ns, "orphan")
    kube.admin.request("DELETE", "/api/v1/nodes/gc-crashed")
    kube.admin.request("DELETE", "/api/v1/nodes/gc-drained")

    set_leak_grace(kube, "1h")
    controllers = start_controllers()
    wait_for(
        lambda: all(
            b["spec"]["affinity"] == "host:gc-node1" for b in objects(kube, "ipamblocks").values()
        ),
        "the deleted nodes' blocks released",
    )
    assert allocations(kube) == {stays_ip: stays_handle}
    assert [a["spec"]["node"] for a in objects(kube, "blockaffinities").values()] == ["gc-node1"]
    controllers.wait_logged("Released the blocks of a node that no longer exists")
    assert 'node="gc-drained"' in controllers.text()
    assert "pod " + ns + "/orphan no longer exists" in controllers.text()
    check = ctl(kube, "ipam", "check")
    assert check.returncode == 0 and "found 0 problems" in check.stdout, check.stdout


def test_grace_period_zero_keeps_leaks_on_live_nodes(kube: KubeCluster, start_controllers) -> None:
    _, handle = leaked_address(kube)
    set_leak_grace(kube, "0", reconcilerPeriod="1s")
    controllers = start_controllers(LOG_LEVEL="debug")
    controllers.wait_logged("Candidate IP leak")
    seen = controllers.text().count("IPAM garbage collection pass done")
    wait_for(
        lambda: controllers.text().count("IPAM garbage collection pass done") > seen + 1,
        "two more passes",
    )
    assert handle in handles(kube)
    assert "Garbage collecting" not in controllers.text()


def test_creates_the_default_configuration_and_stops_on_sigterm(
    kube: KubeCluster, start_controllers
) -> None:
    controllers = start_controllers()
    wait_for(lambda: "default" in objects(kube, "kubecontrollersconfigurations"), "default config")
    spec = objects(kube, "kubecontrollersconfigurations")["default"]["spec"]
    assert spec["controllers"]["node"]["leakGracePeriod"] == "30s"
    assert spec["logSeverityScreen"] == "Info"
    controllers.wait_logged("Starting the Calico controllers")
    stop_process(controllers.process, 15)
    assert controllers.process.returncode == 0
    assert "Stopped the Calico controllers" in controllers.text()


def test_a_bad_grace_period_is_reported_and_nothing_released(
    kube: KubeCluster, start_controllers
) -> None:
    _, handle = leaked_address(kube)
    set_leak_grace(kube, "soon")
    controllers = start_controllers()
    controllers.wait_logged('controllers.node.leakGracePeriod: "soon" is not a duration')
    assert handle in handles(kube)
    assert "Traceback" not in controllers.text()


def test_only_the_kubernetes_datastore_is_supported(tmp_path: Path) -> None:
    out = subprocess.run(
        [str(bin_dir() / "calico-kube-controllers")],
        env={"DATASTORE_TYPE": "etcdv3", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "calico-kube-controllers: only DATASTORE_TYPE=kubernetes is supported (got 'etcdv3')"
    ]

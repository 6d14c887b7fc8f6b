"""`calico` + `calico-ipam` on a real etcd, on simulated nodes: the lifecycle for every
cniVersion (plain and TLS) with Calico's etcd layout read back, the container-ID mismatch
rule, ClusterInformation readiness, three nodes sharing one etcd, and etcd failures."""

from __future__ import annotations

import ipaddress
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import pytest

from tests.etcd.cni_support import (
    HANDLES,
    NETWORK,
    RESOURCES,
    EtcdCalico,
    endpoint_key,
    kv_requests,
    reachable_from,
)
from tests.etcd_fixture import EtcdCluster
from tests.harness import (
    ALL_VERSIONS,
    CNIResult,
    Netns,
    Node,
    calico_conf,
    pod_args,
    result_ips,
    version_tuple,
)
from tests.ipam_support import LocalStore
from tests.root.checks import (
    assert_pod_gone,
    assert_pod_networking,
    assert_quiet_success,
    assert_result_shape,
    expected_host_veth,
    prev_result_runner,
)

# A failing ADD must come back while kubelet is still waiting for it: bounded by the
# client's connect/request timeouts, never by a hang. Exceeding it fails the test.
FAULT_BOUND = 20.0
# 180 plugin processes starting at once on this shared 2-core VM take minutes, and a
# node's 30 IPAM calls queue on its lock meanwhile: this bounds a hang, not speed.
BURST_BOUND = 900.0
KUBELET_DEL_TRIES = 3
NOT_READY = "Calico is currently not ready to process requests"


def seeded(cluster: EtcdCluster, lock_dir: Path) -> EtcdCalico:
    """The seed's default pool, as an operator applies it before the first pod."""
    calico = EtcdCalico(cluster, lock_dir)
    calico.add_pool(
        "default-ipv4-ippool",
        "10.244.0.0/16",
        blockSize=26,
        ipipMode="CrossSubnet",
        natOutgoing=True,
        nodeSelector="all()",
        vxlanMode="Never",
    )
    return calico


def seeded_for(node: Node, cluster: EtcdCluster, lock_dir: Path) -> Iterator[EtcdCalico]:
    with reachable_from(cluster, node.netns):
        yield seeded(cluster, lock_dir)


@pytest.fixture(params=["plain", "tls"])
def any_etcd(request: pytest.FixtureRequest, node: Node, tmp_path: Path) -> Iterator[EtcdCalico]:
    cluster = request.getfixturevalue("clean_etcd" if request.param == "plain" else "etcd_tls")
    yield from seeded_for(node, cluster, tmp_path)


@pytest.fixture
def calico_etcd(node: Node, clean_etcd: EtcdCluster, tmp_path: Path) -> Iterator[EtcdCalico]:
    yield from seeded_for(node, clean_etcd, tmp_path)


@pytest.fixture
def own_etcd(node: Node, etcd: EtcdCluster, tmp_path: Path) -> Iterator[EtcdCalico]:
    """A member of this test's own, for tests that stop it."""
    yield from seeded_for(node, etcd, tmp_path)


def run_pod(
    node: Node, command: str, conf: dict[str, Any], pod: Netns, name: str, **kw: Any
) -> CNIResult:
    """CNI `command` for pod `name` in namespace default, container `ctr-<name>`."""
    return node.run(command, conf, f"ctr-{name}", pod.path, args=pod_args(name), **kw)


def add_pod(node: Node, conf: dict[str, Any], pod: Netns, name: str, **kw: Any) -> CNIResult:
    return run_pod(node, "ADD", conf, pod, name, **kw)


def del_pod(node: Node, conf: dict[str, Any], pod: Netns, name: str, **kw: Any) -> CNIResult:
    return run_pod(node, "DEL", conf, pod, name, **kw)


def first_ip(result: CNIResult, version: str = "1.0.0") -> str:
    return str(ipaddress.ip_interface(result_ips(result.json, version)[0]).ip)


def block_segment(block: str) -> str:
    return block.replace("/", "-")


def assert_calico_layout(
    calico: EtcdCalico, node: str, pod: str, host_if: str, mac: str, ips: list[str]
) -> None:
    """What real Calico would find in etcd for this pod (calico-behaviour.md §3.4, §4.7)."""
    rows = calico.rows()
    handle = f"{NETWORK}.ctr-{pod}"
    [address] = [ipaddress.ip_interface(a).ip for a in ips]
    [block] = [
        row for key, row in rows.items()
        if "/assignment/ipv4/block/" in key and address in ipaddress.ip_network(row["cidr"])
    ]  # fmt: skip
    cidr = ipaddress.ip_network(block["cidr"])
    assert cidr.prefixlen == 26
    assert f"/calico/ipam/v2/assignment/ipv4/block/{block_segment(block['cidr'])}" in rows
    assert block["affinity"] == f"host:{node}"
    attribute = block["attributes"][block["allocations"][int(address) - int(cidr[0])]]
    assert attribute["handle_id"] == handle
    assert attribute["secondary"]["node"] == node
    assert attribute["secondary"]["pod"] == pod
    assert rows[f"/calico/ipam/v2/host/{node}/ipv4/block/{block_segment(block['cidr'])}"] == {
        "state": "confirmed",
        "deleted": False,
    }
    assert rows[HANDLES + handle] == {"block": {block["cidr"]: 1}, "deleted": False}

    endpoint = rows[endpoint_key(node, pod)]
    assert endpoint["kind"] == "WorkloadEndpoint"
    assert endpoint["apiVersion"] == "projectcalico.org/v3"
    assert endpoint["metadata"]["name"] == f"{node}-k8s-{pod.replace('-', '--')}-eth0"
    assert endpoint["metadata"]["namespace"] == "default"
    assert endpoint["metadata"]["labels"] == {
        "projectcalico.org/namespace": "default",
        "projectcalico.org/orchestrator": "k8s",
    }
    assert {
        "orchestrator": "k8s",
        "node": node,
        "pod": pod,
        "endpoint": "eth0",
        "containerID": f"ctr-{pod}",
        "interfaceName": host_if,
        "mac": mac,
        "ipNetworks": [f"{address}/32"],
        "profiles": [NETWORK],
    }.items() <= endpoint["spec"].items()

    profile = rows[f"{RESOURCES}/profiles/{NETWORK}"]
    assert (profile["kind"], profile["metadata"]["name"]) == ("Profile", NETWORK)
    assert profile["spec"] == {
        "ingress": [{"action": "Allow"}],
        "egress": [{"action": "Allow"}],
        "labelsToApply": {NETWORK: ""},
    }
    calico_node = rows[f"{RESOURCES}/nodes/{node}"]
    assert (calico_node["kind"], calico_node["metadata"]["name"]) == ("Node", node)


def assert_pod_released(calico: EtcdCalico, node: str, pod: str) -> None:
    handle = f"{NETWORK}.ctr-{pod}"
    assert handle not in calico.handles()
    assert handle not in calico.allocations().values()
    assert endpoint_key(node, pod) not in calico.endpoints()


# ------------------------------------------------------------------ lifecycle


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_lifecycle(node: Node, any_etcd: EtcdCalico, version: str) -> None:
    conf = any_etcd.conf(version)
    pod_a, pod_b = node.new_pod(), node.new_pod()
    host_a = expected_host_veth("default", "pod-a")

    add_a = add_pod(node, conf, pod_a, "pod-a")
    assert add_a.code == 0, add_a
    ips_a = assert_result_shape(add_a.json, version, pod_a, host_a, [4])
    mac_a = pod_a.link("eth0")["address"]
    if version_tuple(version) >= (0, 3, 0):
        assert add_a.json["interfaces"][1]["mac"] == mac_a
    assert_pod_networking(node, pod_a, host_a, ips_a, pod_mac=mac_a)
    assert_calico_layout(any_etcd, "node1", "pod-a", host_a, mac_a, ips_a)

    add_b = add_pod(node, conf, pod_b, "pod-b")
    assert add_b.code == 0, add_b
    ip_a, ip_b = first_ip(add_a, version), first_ip(add_b, version)
    assert node.netns.ping(ip_a)
    assert pod_a.ping(ip_b)

    again = prev_result_runner(node, conf, add_a, "ctr-pod-a", pod_a, pod_args("pod-a"))
    if version_tuple(version) >= (0, 4, 0):
        assert_quiet_success(again("CHECK"))
    for _ in range(2):  # DEL is idempotent
        assert_quiet_success(again("DEL"))
    assert_pod_gone(node, pod_a, host_a, ips_a)
    assert_pod_released(any_etcd, "node1", "pod-a")
    assert ip_a not in any_etcd.allocations()
    assert sorted(any_etcd.allocations().values()) == [f"{NETWORK}.ctr-pod-b"]

    assert del_pod(node, conf, pod_b, "pod-b").code == 0
    any_etcd.assert_nothing_allocated()
    any_etcd.assert_ipam_consistent()
    assert node.host_veths() == []


# ------------------------------------------------------- the mismatch rule


def test_late_del_of_an_old_sandbox_keeps_the_live_pods_endpoint(
    node: Node, calico_etcd: EtcdCalico
) -> None:
    """calico#1117: kubelet's DEL for a pod's previous sandbox arrives after the new
    sandbox's ADD; it must release only its own handle, not the live endpoint."""
    conf = calico_etcd.conf()
    old, new = node.new_pod(), node.new_pod()
    host_if = expected_host_veth("default", "web")
    old_add = node.run("ADD", conf, "ctr-old", old.path, args=pod_args("web"))
    assert old_add.code == 0, old_add
    new_add = node.run("ADD", conf, "ctr-new", new.path, args=pod_args("web"))
    assert new_add.code == 0, new_add
    key = endpoint_key("node1", "web")
    assert calico_etcd.endpoints()[key]["spec"]["containerID"] == "ctr-new"

    late = node.run("DEL", conf, "ctr-old", old.path, args=pod_args("web"))
    assert (late.code, late.stdout) == (0, ""), late
    endpoint = calico_etcd.endpoints()[key]
    assert endpoint["spec"]["containerID"] == "ctr-new"
    assert calico_etcd.handles() == [f"{NETWORK}.ctr-new"]
    assert sorted(calico_etcd.allocations()) == [first_ip(new_add)]
    assert endpoint["spec"]["ipNetworks"] == [f"{first_ip(new_add)}/32"]
    new_ips = [a["address"] for a in new_add.json["ips"]]
    assert_pod_networking(node, new, host_if, new_ips)
    assert node.netns.ping(first_ip(new_add))

    current = node.run("DEL", conf, "ctr-new", new.path, args=pod_args("web"))
    assert (current.code, current.stdout) == (0, ""), current
    calico_etcd.assert_nothing_allocated()
    calico_etcd.assert_ipam_consistent()
    assert node.host_veths() == []


# ---------------------------------------------------- ClusterInformation


def test_add_is_refused_while_the_datastore_is_not_ready(
    node: Node, calico_etcd: EtcdCalico
) -> None:
    calico_etcd.set_datastore_ready(False)
    before = calico_etcd.rows()
    conf = calico_etcd.conf()
    pod = node.new_pod()
    refused = add_pod(node, conf, pod, "early")
    assert refused.code != 0, refused
    assert (refused.json["code"], refused.json["msg"]) == (11, NOT_READY), refused
    assert calico_etcd.rows() == before
    assert pod.link("eth0") is None and node.host_veths() == []

    calico_etcd.set_datastore_ready(True)
    accepted = add_pod(node, conf, pod, "early")
    assert accepted.code == 0, accepted
    assert endpoint_key("node1", "early") in calico_etcd.endpoints()
    assert del_pod(node, conf, pod, "early").code == 0
    calico_etcd.assert_nothing_allocated()
    calico_etcd.assert_ipam_consistent()


READY = """\
apiVersion: projectcalico.org/v3
kind: ClusterInformation
metadata:
  name: default
spec:
  datastoreReady: true
"""


def test_ctl_apply_marks_the_datastore_ready(node: Node, calico_etcd: EtcdCalico) -> None:
    calico_etcd.set_datastore_ready(False)
    applied = calico_etcd.ctl("ctl", "apply", "-f", "-", stdin=READY)
    assert applied.returncode == 0, applied.stderr
    conf = calico_etcd.conf()
    pod = node.new_pod()
    assert add_pod(node, conf, pod, "after-upgrade").code == 0
    assert del_pod(node, conf, pod, "after-upgrade").code == 0


# ------------------------------------------------ three nodes, one etcd


@pytest.fixture
def three_nodes(cni_path: str) -> Iterator[dict[str, Node]]:
    nodes = {name: Node.create(cni_path) for name in ("node-a", "node-b", "node-c")}
    try:
        yield nodes
    finally:
        for n in nodes.values():
            n.destroy()


def test_three_nodes_thirty_pods_each(
    etcd: EtcdCluster, tmp_path: Path, three_nodes: dict[str, Node]
) -> None:
    """A /25 in blocks of 64 has two blocks for three nodes: two nodes claim one each and
    keep to it, the third must borrow, and all 90 pods still fit."""
    calico = EtcdCalico(etcd, tmp_path)
    calico.add_pool("small", "10.45.0.0/25", blockSize=26)
    jobs = [(name, i) for name in three_nodes for i in range(30)]
    pods = {job: three_nodes[job[0]].new_pod() for job in jobs}

    retried: list[CNIResult] = []

    def run(command: str) -> Callable[[tuple[str, int]], CNIResult]:
        def one(job: tuple[str, int]) -> CNIResult:
            name, i = job
            conf = calico.conf("1.0.0", node=name, ipam_lock_timeout_seconds=BURST_BOUND)
            # kubelet repeats a DEL answered with 11; an ADD must work the first time
            for _ in range(KUBELET_DEL_TRIES if command == "DEL" else 1):
                result = run_pod(
                    three_nodes[name], command, conf, pods[job], f"{name}-{i}", timeout=BURST_BOUND
                )
                if not (result.code and result.json["code"] == 11):
                    break
                retried.append(result)
            return result

        return one

    with reachable_from(etcd, *(n.netns for n in three_nodes.values())):
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = dict(zip(jobs, pool.map(run("ADD"), jobs), strict=True))
        failed = [r for r in results.values() if r.code]
        assert not failed, failed[:1]
        ips = {job: first_ip(r) for job, r in results.items()}
        assert len(set(ips.values())) == 90

        owners = calico.block_affinities()
        assert len(owners) == 2 and len(set(owners.values())) == 2
        [borrower] = [n for n in three_nodes if f"host:{n}" not in owners.values()]
        for (name, _), ip in ips.items():
            [block] = [b for b in owners if ipaddress.ip_address(ip) in ipaddress.ip_network(b)]
            if name == borrower:
                assert owners[block] != f"host:{name}"
            else:
                assert owners[block] == f"host:{name}", f"{name} left its own block for {ip}"
        assert not any(f"/ipam/v2/host/{borrower}/" in key for key in calico.rows())
        assert len(calico.endpoints()) == 90
        calico.assert_ipam_consistent()

        with ThreadPoolExecutor(len(jobs)) as pool:
            deleted = list(pool.map(run("DEL"), jobs))
    assert all(r.code == 0 for r in deleted), [r for r in deleted if r.code][:1]
    print(f"\ncalls answered 11 and repeated: {[r.json['msg'] for r in retried]}")
    calico.assert_nothing_allocated()
    calico.assert_ipam_consistent()
    assert all(n.host_veths() == [] for n in three_nodes.values())


# -------------------------------------------------------------------- faults


def assert_try_again_later(result: CNIResult, endpoint: str) -> None:
    assert result.code != 0, result
    assert result.json["code"] == 11, result
    assert result.json["msg"].startswith("datastore unavailable: no etcd endpoint reachable")
    assert endpoint in result.json["msg"], result


def test_adds_while_etcd_is_down_fail_cleanly_and_succeed_after_it_returns(
    node: Node, own_etcd: EtcdCalico
) -> None:
    """etcd is stopped after the burst has begun: ADDs in flight may go either way, every
    ADD started after the stop fails with 11 and leaves nothing; kubelet's DEL + ADD retry
    after etcd returns brings every pod up on one address."""
    cluster = own_etcd.cluster
    member = cluster.members[0]
    conf = own_etcd.conf()
    names = [f"burst-{i}" for i in range(12)]
    pods = {name: node.new_pod() for name in names}
    stopped = threading.Event()
    started_after_stop: set[str] = set()

    def attempt(name: str) -> CNIResult:
        if stopped.is_set():
            started_after_stop.add(name)
        return add_pod(node, conf, pods[name], name, timeout=FAULT_BOUND)

    with ThreadPoolExecutor(3) as pool:
        futures = {pool.submit(attempt, name): name for name in names}
        wait(futures, return_when=FIRST_COMPLETED)
        member.stop()
        stopped.set()
    results = {futures[f]: f.result() for f in futures}
    failed = sorted(name for name, r in results.items() if r.code)
    assert started_after_stop and started_after_stop <= set(failed)
    for name in started_after_stop:
        assert_try_again_later(results[name], member.endpoint)
    for name in failed:  # in flight at the stop, etcd may have said something else first
        assert results[name].json["code"] == 11, results[name]
        assert pods[name].link("eth0") is None
        assert node.netns.link(expected_host_veth("default", name)) is None

    member.restart()
    for name in started_after_stop:
        assert_pod_released(own_etcd, "node1", name)
    for name in failed:  # what kubelet does after a failed ADD
        assert del_pod(node, conf, pods[name], name).code == 0
        retried = add_pod(node, conf, pods[name], name)
        assert retried.code == 0, retried
    owners = own_etcd.allocations()
    assert sorted(owners.values()) == sorted(f"{NETWORK}.ctr-{name}" for name in names)
    assert len(own_etcd.endpoints()) == len(names)
    own_etcd.assert_ipam_consistent()
    for name in names:
        assert del_pod(node, conf, pods[name], name).code == 0
    own_etcd.assert_nothing_allocated()
    assert node.host_veths() == []


def test_del_while_etcd_is_down_fails_so_kubelet_retries(node: Node, own_etcd: EtcdCalico) -> None:
    cluster = own_etcd.cluster
    member = cluster.members[0]
    conf = own_etcd.conf()
    pod = node.new_pod()
    host_if = expected_host_veth("default", "stays")
    added = add_pod(node, conf, pod, "stays")
    assert added.code == 0, added

    member.stop()
    refused = del_pod(node, conf, pod, "stays", timeout=FAULT_BOUND)
    assert_try_again_later(refused, member.endpoint)

    member.restart()
    assert f"{NETWORK}.ctr-stays" in own_etcd.handles()  # nothing was half-deleted
    retried = del_pod(node, conf, pod, "stays")
    assert (retried.code, retried.stdout) == (0, ""), retried
    assert_pod_gone(node, pod, host_if, [a["address"] for a in added.json["ips"]])
    own_etcd.assert_nothing_allocated()
    own_etcd.assert_ipam_consistent()


def test_add_survives_a_killed_cluster_member(
    node: Node, etcd_cluster: EtcdCluster, tmp_path: Path
) -> None:
    calico = seeded(etcd_cluster, tmp_path)
    conf = calico.conf()
    first, second = node.new_pod(), node.new_pod()
    with reachable_from(etcd_cluster, node.netns):
        before = add_pod(node, conf, first, "before")
        assert before.code == 0, before
        etcd_cluster.members[0].stop(signal.SIGKILL)  # the first endpoint the plugin tries
        added = add_pod(node, conf, second, "after", timeout=FAULT_BOUND)
        assert added.code == 0, added
        assert endpoint_key("node1", "after") in calico.endpoints()
        assert first_ip(added) != first_ip(before)
        assert second.ping(first_ip(before))
        for pod, name in ((second, "after"), (first, "before")):
            deleted = del_pod(node, conf, pod, name, timeout=FAULT_BOUND)
            assert (deleted.code, deleted.stdout) == (0, ""), deleted
    calico.assert_nothing_allocated()
    calico.assert_ipam_consistent()


# ------------------------------------------------------------- measurement


def test_report_add_cost_and_round_trips(
    node: Node, calico_etcd: EtcdCalico, tmp_path: Path
) -> None:
    """Measured, not asserted: ADD p50 on etcd and on the local datastore, and etcd's own
    count of KV requests (Range/Txn) per ADD and per DEL. Run with -s to see it."""
    local = LocalStore(str(tmp_path / "calico.db"))
    local.add_pool("local-pool", "10.246.0.0/16")  # beside etcd's on the same node
    confs = {
        "etcd": calico_etcd.conf(),
        "local": calico_conf(
            "1.0.0",
            {"type": "calico-ipam"},
            local_datastore_path=local.path,
            ipam_lock_file=str(tmp_path / "local.lock"),
        ),
    }
    member = calico_etcd.cluster.members[0]
    count = 20
    pods = {(store, i): node.new_pod() for store in confs for i in range(count)}
    seconds: dict[str, list[float]] = {store: [] for store in confs}
    trips: dict[str, list[int]] = {"ADD": [], "DEL": []}

    def counted(command: str, store: str, i: int) -> None:
        before = kv_requests(member)
        started = time.monotonic()
        result = run_pod(node, command, confs[store], pods[store, i], f"{store}-{i}")
        elapsed = time.monotonic() - started
        assert result.code == 0, result
        if command == "ADD":
            seconds[store].append(elapsed)
        if store == "etcd":
            trips[command].append(kv_requests(member) - before)

    for command in ("ADD", "DEL"):
        for i in range(count):  # interleaved, so background load hits both alike
            for store in confs:
                counted(command, store, i)

    p50 = {store: statistics.median(s) * 1000 for store, s in seconds.items()}
    print(
        f"\nADD p50 over {count}: etcd {p50['etcd']:.0f} ms, local {p50['local']:.0f} ms"
        f" (ratio {p50['etcd'] / p50['local']:.2f})"
        f"\netcd KV requests per ADD: {trips['ADD']}\netcd KV requests per DEL: {trips['DEL']}"
    )
    assert min(trips["ADD"]) > 0 and min(trips["DEL"]) > 0
    calico_etcd.assert_nothing_allocated()
    assert local.handles() == []

"""`calico` + `calico-ipam` on the local datastore: the lifecycle for every cniVersion,
with the kernel and the datastore read back after each step."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from tests.harness import (
    ALL_VERSIONS,
    Node,
    calico_conf,
    pod_args,
    result_ips,
    version_tuple,
    with_prev,
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

STACKS = {
    "ipv4": ({}, [4]),
    "ipv6": ({"assign_ipv4": "false", "assign_ipv6": "true"}, [6]),
    "dual": ({"assign_ipv6": "true"}, [4, 6]),
}


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    s = LocalStore(str(tmp_path / "calico.db"))
    s.add_pool(
        "default-ipv4-ippool",
        "10.244.0.0/16",
        blockSize=26,
        ipipMode="CrossSubnet",
        natOutgoing=True,
        nodeSelector="all()",
        vxlanMode="Never",
    )
    s.add_pool("default-ipv6-ippool", "fd00:244::/48")
    return s


def ipam_conf(
    version: str, store: LocalStore, tmp_path: Path, ipam_extra: dict | None = None, **extra
) -> dict:
    return calico_conf(
        version,
        {"type": "calico-ipam", **(ipam_extra or {})},
        local_datastore_path=store.path,
        ipam_lock_file=str(tmp_path / "ipam.lock"),
        **extra,
    )


@pytest.mark.parametrize("stack", list(STACKS))
@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_lifecycle(node: Node, store: LocalStore, tmp_path: Path, version: str, stack: str) -> None:
    ipam_extra, families = STACKS[stack]
    conf = ipam_conf(version, store, tmp_path, ipam_extra)
    pod_a, pod_b = node.new_pod(), node.new_pod()
    host_a = expected_host_veth("default", "pod-a")

    if version == "1.1.0":
        status = node.run("STATUS", conf)
        assert (status.code, status.stdout) == (0, ""), status

    add_a = node.run("ADD", conf, "ctr-a", pod_a.path, args=pod_args("pod-a"))
    assert add_a.code == 0, add_a
    ips_a = assert_result_shape(add_a.json, version, pod_a, host_a, families)
    mac_a = add_a.json["interfaces"][1]["mac"] if "interfaces" in add_a.json else None
    assert_pod_networking(node, pod_a, host_a, ips_a, pod_mac=mac_a)
    handle = "k8s-pod-network.ctr-a"
    assert store.ips_of(handle) == sorted(str(ipaddress.ip_interface(a).ip) for a in ips_a)
    for address in ips_a:  # the first address of a fresh block is the block's .0
        assert ipaddress.ip_interface(address).ip in ipaddress.ip_network(
            "10.244.0.0/16" if ":" not in address else "fd00:244::/48"
        )

    add_b = node.run("ADD", conf, "ctr-b", pod_b.path, args=pod_args("pod-b"))
    assert add_b.code == 0, add_b
    ips_b = result_ips(add_b.json, version)
    for address_a, address_b in zip(sorted(ips_a), sorted(ips_b), strict=True):
        ip_a, ip_b = (str(ipaddress.ip_interface(a).ip) for a in (address_a, address_b))
        assert node.netns.ping(ip_a)
        assert pod_a.ping(ip_b)

    again = prev_result_runner(node, conf, add_a, "ctr-a", pod_a, pod_args("pod-a"))
    if version_tuple(version) >= (0, 4, 0):
        assert_quiet_success(again("CHECK"))
    for _ in range(2):  # DEL is idempotent
        assert_quiet_success(again("DEL"))
    assert_pod_gone(node, pod_a, host_a, ips_a)
    assert store.ips_of(handle) == []
    assert node.run("DEL", conf, "ctr-b", pod_b.path, args=pod_args("pod-b")).code == 0
    assert store.handles() == [] and store.in_use() == 0
    assert store.consistency().ok
    assert node.host_veths() == []


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0", "1.1.0"])
def test_check_fails_when_ipam_lost_the_address(
    node: Node, store: LocalStore, tmp_path: Path, version: str
) -> None:
    conf = ipam_conf(version, store, tmp_path)
    pod = node.new_pod()
    add = node.run("ADD", conf, "ctr", pod.path, args=pod_args("p"))
    assert add.code == 0, add
    ip = add.json["ips"][0]["address"].split("/")[0]
    store.release(ip)
    check = node.run("CHECK", with_prev(conf, add.json), "ctr", pod.path, args=pod_args("p"))
    assert check.code != 0 and "k8s-pod-network.ctr" in check.json["msg"], check
    assert node.run("DEL", conf, "ctr", pod.path, args=pod_args("p")).code == 0


def test_status_without_a_usable_pool(node: Node, tmp_path: Path) -> None:
    empty = LocalStore(str(tmp_path / "empty.db"))
    conf = ipam_conf("1.1.0", empty, tmp_path)
    for binary in ("calico", "calico-ipam"):
        status = node.run("STATUS", conf, binary=binary)
        assert status.code != 0 and status.json["code"] == 50, status
        assert "no enabled IPv4 pool" in status.json["msg"]


def test_gc_releases_exactly_the_stale_handles(
    node: Node, store: LocalStore, tmp_path: Path
) -> None:
    conf = ipam_conf("1.1.0", store, tmp_path)
    pods = {name: node.new_pod() for name in ("keep", "stale")}
    for name, pod in pods.items():
        assert node.run("ADD", conf, f"ctr-{name}", pod.path, args=pod_args(name)).code == 0
    other_network = dict(conf, name="other-net")
    other_pod = node.new_pod()
    assert node.run("ADD", other_network, "ctr-other", other_pod.path, args=pod_args("o")).code == 0
    gc_conf = dict(
        conf, **{"cni.dev/valid-attachments": [{"containerID": "ctr-keep", "ifname": "eth0"}]}
    )
    result = node.run("GC", gc_conf)
    assert (result.code, result.stdout) == (0, ""), result
    assert sorted(store.handles()) == ["k8s-pod-network.ctr-keep", "other-net.ctr-other"]
    assert store.consistency().ok
    for name, pod in pods.items():
        assert node.run("DEL", conf, f"ctr-{name}", pod.path, args=pod_args(name)).code == 0
    assert node.run("DEL", other_network, "ctr-other", other_pod.path).code == 0

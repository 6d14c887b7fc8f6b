"""`calico` + Go host-local: the whole lifecycle for every cniVersion, read back from the kernel."""

from __future__ import annotations

import ipaddress
import os

import pytest

from tests.harness import ALL_VERSIONS, Node, calico_conf, pod_args, version_tuple, wait_for
from tests.root.checks import (
    assert_pod_gone,
    assert_pod_networking,
    assert_quiet_success,
    assert_result_shape,
    expected_host_veth,
    prev_result_runner,
)

STACKS = {
    "ipv4": [[{"subnet": "10.77.0.0/24"}]],
    "ipv6": [[{"subnet": "fd00:77::/64"}]],
    "dual": [[{"subnet": "10.77.0.0/24"}], [{"subnet": "fd00:77::/64"}]],
}
# Debian's host-local is plugins v1.1.1: it speaks CNI up to 1.0.0 and refuses 1.1.0.
HOST_LOCAL_VERSIONS = [v for v in ALL_VERSIONS if v != "1.1.0"]


def host_local(ipam_dir: str, stack: str) -> dict:
    return {"type": "host-local", "ranges": STACKS[stack], "dataDir": ipam_dir}


def families_of(stack: str) -> list[int]:
    return {"ipv4": [4], "ipv6": [6], "dual": [4, 6]}[stack]


@pytest.mark.parametrize("stack", list(STACKS))
@pytest.mark.parametrize("version", HOST_LOCAL_VERSIONS)
def test_lifecycle(node: Node, ipam_dir: str, version: str, stack: str) -> None:
    conf = calico_conf(version, host_local(ipam_dir, stack))
    pod_a, pod_b = node.new_pod(), node.new_pod()
    host_a, host_b = expected_host_veth("default", "pod-a"), expected_host_veth("default", "pod-b")

    add_a = node.run("ADD", conf, "ctr-a", pod_a.path, args=pod_args("pod-a"))
    assert add_a.code == 0, add_a
    ips_a = assert_result_shape(add_a.json, version, pod_a, host_a, families_of(stack))
    mac_a = add_a.json["interfaces"][1]["mac"] if "interfaces" in add_a.json else None
    assert_pod_networking(node, pod_a, host_a, ips_a, pod_mac=mac_a)

    add_b = node.run("ADD", conf, "ctr-b", pod_b.path, args=pod_args("pod-b"))
    assert add_b.code == 0, add_b
    ips_b = assert_result_shape(add_b.json, version, pod_b, host_b, families_of(stack))
    assert set(ips_a).isdisjoint(ips_b)

    for address_a, address_b in zip(sorted(ips_a), sorted(ips_b), strict=True):
        ip_a, ip_b = (str(ipaddress.ip_interface(a).ip) for a in (address_a, address_b))
        assert node.netns.ping(ip_a), f"node cannot reach pod at {ip_a}"
        assert pod_a.ping(ip_b), f"pod a cannot reach pod b at {ip_b}"

    again = prev_result_runner(node, conf, add_a, "ctr-a", pod_a, pod_args("pod-a"))
    if version_tuple(version) >= (0, 4, 0):
        assert_quiet_success(again("CHECK"))
        family = "-6" if stack == "ipv6" else "-4"
        pod_a.exec("ip", family, "route", "del", "default")
        broken = again("CHECK")
        assert broken.code != 0
        assert "default" in broken.json["msg"] or "/0" in broken.json["msg"], broken

    for _ in range(2):  # DEL is idempotent
        assert_quiet_success(again("DEL"))
    assert_pod_gone(node, pod_a, host_a, ips_a)
    assert node.run("DEL", conf, "ctr-b", pod_b.path, args=pod_args("pod-b")).code == 0
    assert_pod_gone(node, pod_b, host_b, ips_b)
    leftover = sorted(os.listdir(os.path.join(ipam_dir, "k8s-pod-network")))
    assert all(f == "lock" or f.startswith("last_reserved_ip") for f in leftover), leftover
    assert node.host_veths() == []


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_del_of_never_added_container(node: Node, ipam_dir: str, version: str) -> None:
    pod = node.new_pod()
    conf = calico_conf(version, host_local(ipam_dir, "ipv4"))
    if version == "1.1.0":
        conf["ipam"] = {"type": "host-local", "subnet": "10.77.0.0/24", "dataDir": ipam_dir}
    result = node.run("DEL", conf, "never-added", pod.path, args=pod_args("ghost"))
    if version == "1.1.0":  # the Go host-local's own refusal passes through unchanged
        assert result.code != 0 and result.json["msg"] == "incompatible CNI versions"
        return
    assert (result.code, result.stdout) == (0, ""), result


@pytest.mark.parametrize("version", HOST_LOCAL_VERSIONS)
def test_del_without_netns_releases_ipam(node: Node, ipam_dir: str, version: str) -> None:
    """Runtimes send DEL with an empty or vanished CNI_NETNS after a reboot (cri#948)."""
    pod = node.new_pod()
    conf = calico_conf(version, host_local(ipam_dir, "ipv4"))
    add = node.run("ADD", conf, "ctr-gone", pod.path, args=pod_args("gone"))
    assert add.code == 0, add
    pod.delete()
    # The kernel destroys the netns, and the veth pair with it, asynchronously.
    wait_for(lambda: node.host_veths() == [], "the kernel to destroy the deleted netns's veth")
    for netns in ("", pod.path):
        result = node.run("DEL", conf, "ctr-gone", netns, args=pod_args("gone"))
        assert (result.code, result.stdout) == (0, ""), result
    files = os.listdir(os.path.join(ipam_dir, "k8s-pod-network"))
    assert not [f for f in files if f[0].isdigit()], files
    assert node.host_veths() == []


def test_host_local_refusal_of_1_1_0_passes_through(node: Node, ipam_dir: str) -> None:
    pod = node.new_pod()
    conf = calico_conf("1.1.0", host_local(ipam_dir, "ipv4"))
    result = node.run("ADD", conf, "ctr-110", pod.path, args=pod_args("p110"))
    assert result.code != 0
    assert result.json["code"] == 1 and result.json["msg"] == "incompatible CNI versions"
    assert pod.link("eth0") is None and node.host_veths() == []

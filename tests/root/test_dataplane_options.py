"""Dataplane options a user sets in the netconf or the environment, read back from the kernel."""

from __future__ import annotations

import pytest

from tests.harness import Node, calico_conf, ip_json, pod_args
from tests.root.checks import expected_host_veth

VERSIONS = ["0.3.1", "1.0.0"]
ARGS = pod_args("pod-1", "opts")


def host_local(ipam_dir: str) -> dict:
    return {"type": "host-local", "subnet": "10.44.0.0/24", "dataDir": ipam_dir}


@pytest.mark.parametrize("version", VERSIONS)
def test_num_queues_on_both_ends(node: Node, ipam_dir: str, version: str) -> None:
    pod = node.new_pod()
    conf = calico_conf(version, host_local(ipam_dir), num_queues=3)
    assert node.run("ADD", conf, "ctr", pod.path, args=ARGS).code == 0
    host = ip_json(node.netns.name, "-d", "link", "show", expected_host_veth("opts", "pod-1"))[0]
    peer = ip_json(pod.name, "-d", "link", "show", "eth0")[0]
    assert (host["num_tx_queues"], host["num_rx_queues"]) == (3, 3)
    assert (peer["num_tx_queues"], peer["num_rx_queues"]) == (3, 3)
    assert node.run("DEL", conf, "ctr", pod.path, args=ARGS).code == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_allow_ip_forwarding(node: Node, ipam_dir: str, version: str) -> None:
    pod = node.new_pod()
    conf = calico_conf(
        version, host_local(ipam_dir), container_settings={"allow_ip_forwarding": True}
    )
    assert node.run("ADD", conf, "ctr", pod.path, args=ARGS).code == 0
    assert pod.sysctl("net.ipv4.ip_forward") == "1"
    assert node.run("DEL", conf, "ctr", pod.path, args=ARGS).code == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_stale_host_veth_of_the_same_pod_is_replaced(
    node: Node, ipam_dir: str, version: str
) -> None:
    """A leftover host veth of an earlier sandbox of the pod (cni-plugin#275)."""
    pod = node.new_pod()
    stale = expected_host_veth("opts", "pod-1")
    node.netns.exec("ip", "link", "add", stale, "type", "veth", "peer", "name", "leftover")
    result = node.run("ADD", calico_conf(version, host_local(ipam_dir)), "ctr", pod.path, args=ARGS)
    assert result.code == 0, result
    assert node.netns.link("leftover") is None  # the old pair is gone
    assert node.netns.link(stale)["address"] == "ee:ee:ee:ee:ee:ee"
    assert node.run("DEL", calico_conf(version, host_local(ipam_dir)), "ctr", pod.path).code == 0


def test_interface_prefix_and_non_kubernetes_name(node: Node, ipam_dir: str) -> None:
    """Felix's prefix names Kubernetes pods' veths; without pod identifiers the name is
    `cali` + the container ID's first 11 characters."""
    conf = calico_conf("1.0.0", host_local(ipam_dir))
    pod, plain = node.new_pod(), node.new_pod()
    env = {"FELIX_INTERFACEPREFIX": "tap,cali"}
    tap = "tap" + expected_host_veth("opts", "pod-1")[4:]
    result = node.run("ADD", conf, "ctr-k8s", pod.path, args=ARGS, env=env)
    assert result.code == 0 and result.json["interfaces"][0]["name"] == tap, result
    assert node.netns.link(tap) is not None
    result = node.run("ADD", conf, "0123456789abcdef", plain.path, env=env)
    assert result.code == 0 and result.json["interfaces"][0]["name"] == "cali0123456789a", result
    assert node.netns.link("cali0123456789a") is not None
    assert node.run("DEL", conf, "ctr-k8s", pod.path, args=ARGS, env=env).code == 0
    assert node.run("DEL", conf, "0123456789abcdef", plain.path, env=env).code == 0
    assert node.netns.link(tap) is None and node.netns.link("cali0123456789a") is None

"""Bad input on a real node: the right error, no traceback, and nothing created or leaked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.harness import CNIResult, Node, calico_conf, version_tuple

VERSIONS = ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"]  # those Go host-local accepts


def host_local(ipam_dir: str) -> dict:
    return {"type": "host-local", "subnet": "10.66.0.0/24", "dataDir": ipam_dir}


def allocated_ips(ipam_dir: str) -> list[str]:
    path = Path(ipam_dir) / "k8s-pod-network"
    return sorted(p.name for p in path.iterdir() if p.name[0].isdigit()) if path.exists() else []


def assert_failed_cleanly(
    result: CNIResult, node: Node, ipam_dir: str, code: int, text: str
) -> dict:
    assert result.code != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    doc = result.json
    assert doc["code"] == code, result
    assert text in doc["msg"] + doc.get("details", ""), result
    assert node.host_veths() == [], "a host veth was left behind"
    assert allocated_ips(ipam_dir) == [], "an IP reservation was left behind"
    return doc


@pytest.mark.parametrize("version", VERSIONS)
def test_netns_that_is_not_a_netns(node: Node, ipam_dir: str, tmp_path: Path, version: str) -> None:
    fake = tmp_path / "not-a-netns"
    fake.write_text("")
    result = node.run("ADD", calico_conf(version, host_local(ipam_dir)), "ctr", str(fake))
    assert_failed_cleanly(result, node, ipam_dir, 4, "is not a network namespace")


@pytest.mark.parametrize("version", VERSIONS)
def test_netns_that_does_not_exist(node: Node, ipam_dir: str, version: str) -> None:
    result = node.run(
        "ADD", calico_conf(version, host_local(ipam_dir)), "ctr", "/var/run/netns/cnt-nope"
    )
    assert_failed_cleanly(result, node, ipam_dir, 3, "does not exist")


@pytest.mark.parametrize("version", VERSIONS)
def test_pod_interface_already_present(node: Node, ipam_dir: str, version: str) -> None:
    pod = node.new_pod()
    pod.exec("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "other0")
    result = node.run("ADD", calico_conf(version, host_local(ipam_dir)), "ctr", pod.path)
    assert_failed_cleanly(result, node, ipam_dir, 4, "already exists")
    assert pod.link("eth0") is not None, "the existing interface must be left alone"


@pytest.mark.parametrize("version", VERSIONS)
def test_ipam_binary_missing(node: Node, ipam_dir: str, version: str) -> None:
    pod = node.new_pod()
    conf = calico_conf(version, {"type": "no-such-ipam"})
    result = node.run("ADD", conf, "ctr", pod.path)
    assert_failed_cleanly(result, node, ipam_dir, 7, 'failed to find plugin "no-such-ipam"')
    assert pod.link("eth0") is None


@pytest.mark.parametrize("version", VERSIONS)
def test_failure_after_veth_creation_releases_everything(
    node: Node, ipam_dir: str, version: str
) -> None:
    """A host route for the pod's IP on another interface (calico#8180): Calico's message,
    the veth removed again, and the IPAM allocation released."""
    pod = node.new_pod()
    node.netns.exec("ip", "route", "add", "10.66.0.2/32", "dev", "underlay", "scope", "link")
    result = node.run("ADD", calico_conf(version, host_local(ipam_dir)), "ctr", pod.path)
    doc = assert_failed_cleanly(
        result, node, ipam_dir, 999, "already exists for an interface other than"
    )
    assert "Iface: underlay" in doc["msg"]
    assert pod.link("eth0") is None


@pytest.mark.parametrize("version", VERSIONS)
def test_ipam_error_passes_through_unchanged(node: Node, ipam_dir: str, version: str) -> None:
    pod = node.new_pod()
    conf = calico_conf(
        version, {"type": "host-local", "subnet": "10.66.0.0/31", "dataDir": ipam_dir}
    )
    result = node.run("ADD", conf, "ctr", pod.path)
    doc = assert_failed_cleanly(result, node, ipam_dir, 999, "too small to allocate from")
    assert pod.link("eth0") is None and doc


@pytest.mark.parametrize("version", VERSIONS)
def test_use_pod_cidr_without_kubernetes_datastore(node: Node, ipam_dir: str, version: str) -> None:
    pod = node.new_pod()
    conf = calico_conf(version, {"type": "host-local", "subnet": "usePodCidr", "dataDir": ipam_dir})
    result = node.run("ADD", conf, "ctr", pod.path)
    assert_failed_cleanly(result, node, ipam_dir, 7, "Kubernetes datastore")
    deleted = node.run("DEL", conf, "ctr", pod.path)
    assert (deleted.code, deleted.stdout) == (0, ""), deleted


@pytest.mark.parametrize("version", VERSIONS)
def test_missing_nodename_file_means_calico_node_not_ready(
    node: Node, ipam_dir: str, tmp_path: Path, version: str
) -> None:
    pod = node.new_pod()
    conf = calico_conf(version, host_local(ipam_dir))
    del conf["nodename"], conf["nodename_file_optional"]
    conf["nodename_file"] = str(tmp_path / "nodename")
    result = node.run("ADD", conf, "ctr", pod.path)
    assert_failed_cleanly(
        result, node, ipam_dir, 11, "check that the calico/node container is running"
    )
    (tmp_path / "nodename").write_text("node-from-file")
    ok = node.run("ADD", conf, "ctr", pod.path)
    assert ok.code == 0, ok
    assert 'Node="node-from-file"' in ok.stderr
    assert node.run("DEL", conf, "ctr", pod.path).code == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_mtu_from_file_and_required_file(
    node: Node, ipam_dir: str, tmp_path: Path, version: str
) -> None:
    pod = node.new_pod()
    mtu_file = tmp_path / "mtu"
    conf = calico_conf(
        version, host_local(ipam_dir), mtu=0, require_mtu_file=True, mtu_file_path=str(mtu_file)
    )
    result = node.run("ADD", conf, "ctr", pod.path)
    assert_failed_cleanly(result, node, ipam_dir, 11, "failed to read MTU file")
    mtu_file.write_text("1234\n")
    ok = node.run("ADD", conf, "ctr", pod.path)
    assert ok.code == 0, ok
    assert pod.link("eth0")["mtu"] == 1234
    if version_tuple(version) >= (1, 0, 0):
        assert ok.json["interfaces"][1]["mtu"] == 1234
    assert node.run("DEL", conf, "ctr", pod.path).code == 0


def test_log_file_is_private_and_names_the_duration(
    node: Node, ipam_dir: str, tmp_path: Path
) -> None:
    pod = node.new_pod()
    log_file = tmp_path / "logs" / "cni.log"
    conf = calico_conf("1.0.0", host_local(ipam_dir), log_file_path=str(log_file))
    assert node.run("ADD", conf, "ctr", pod.path).code == 0
    assert node.run("DEL", conf, "ctr", pod.path).code == 0
    assert oct(os.stat(log_file).st_mode & 0o777) == "0o600"
    text = log_file.read_text()
    assert "Calico CNI ADD complete" in text and "Duration=" in text
    assert "Teardown processing complete." in text
    assert "[INFO][" in text and "cni-plugin/plugin.py" in text

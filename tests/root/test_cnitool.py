"""The lifecycle through cnitool (libcni) as an operator runs it: calico chained to portmap."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import agent_fixture
from tests.harness import REPO, Node
from tests.root.checks import assert_pod_gone, assert_pod_networking

CACHE_DIR = Path("/var/lib/cni/results")


def cnitool_binary() -> str:
    found = os.environ.get("CNITOOL") or shutil.which("cnitool") or "/opt/cnitool-bin/cnitool"
    if not os.path.exists(found):
        pytest.fail("cnitool is not installed: .ci/run installs it with `go install`")
    return found


def cnitool_container_id(netns_path: str) -> str:
    """cnitool derives the container ID from the netns path (sha512, first 10 bytes)."""
    return "cnitool-" + hashlib.sha512(netns_path.encode()).hexdigest()[:20]


@pytest.fixture
def netconf_dir(tmp_path: Path, ipam_dir: str) -> Path:
    conf = json.loads((REPO / "conf" / "10-calico-host-local.conflist").read_text())
    calico = conf["plugins"][0]
    calico["ipam"]["dataDir"] = ipam_dir
    calico["log_file_path"] = str(tmp_path / "cni.log")
    calico["mtu"] = 1400
    calico["nodename"] = "node1"
    confdir = tmp_path / "net.d"
    confdir.mkdir()
    (confdir / "10-calico.conflist").write_text(json.dumps(conf))
    # Debian's portmap 1.1.1 fails every CHECK of an IPv4-only pod: it looks for IPv6
    # DNAT rules it never created (containernetworking/plugins#819, fixed upstream later).
    # CHECK therefore runs the same network with calico alone.
    conf["plugins"] = conf["plugins"][:1]
    (tmp_path / "net.d-check").mkdir()
    (tmp_path / "net.d-check" / "10-calico.conflist").write_text(json.dumps(conf))
    return confdir


def cnitool(node: Node, confdir: Path, verb: str, netns: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ["PATH"],
        "NETCONFPATH": str(confdir),
        "CNI_PATH": node.cni_path,
        "CNI_IFNAME": "eth0",
        "CAP_ARGS": json.dumps(
            {"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]}
        ),
        **agent_fixture.env_for(node.netns.path, {}),  # the agent pass's agent, if any
    }
    return node.netns.exec(cnitool_binary(), verb, "k8s-pod-network", netns, env=env, check=False)


def test_cnitool_lifecycle_with_portmap(node: Node, netconf_dir: Path) -> None:
    pod = node.new_pod()
    container_id = cnitool_container_id(pod.path)
    cache_file = CACHE_DIR / f"k8s-pod-network-{container_id}-eth0"
    try:
        add = cnitool(node, netconf_dir, "add", pod.path)
        assert add.returncode == 0, add.stderr
        result = json.loads(add.stdout)
        host_if = "cali" + container_id[:11]
        ips = [ip["address"] for ip in result["ips"]]
        assert result["interfaces"][0]["name"] == host_if
        assert_pod_networking(node, pod, host_if, ips, pod_mac=result["interfaces"][1]["mac"])
        pod_ip = ips[0].split("/")[0]
        assert node.netns.ping(pod_ip)
        nat = node.netns.exec("iptables", "-t", "nat", "-S").stdout
        assert "--dport 18080" in nat and f"{pod_ip}:80" in nat, nat

        check_dir = netconf_dir.parent / "net.d-check"
        check = cnitool(node, check_dir, "check", pod.path)
        assert check.returncode == 0, check.stderr
        pod.exec("ip", "route", "del", "default")
        broken = cnitool(node, check_dir, "check", pod.path)
        assert broken.returncode != 0 and "route 0.0.0.0/0 via 169.254.1.1" in broken.stderr

        delete = cnitool(node, netconf_dir, "del", pod.path)
        assert delete.returncode == 0, delete.stderr
        assert_pod_gone(node, pod, host_if, ips)
        assert f"{pod_ip}:80" not in node.netns.exec("iptables", "-t", "nat", "-S").stdout
        assert not cache_file.exists()
    finally:
        cache_file.unlink(missing_ok=True)

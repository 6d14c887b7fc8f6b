"""One calico-node on its own: start-up's writes, its refusals, its probes, the CNI served
from another mount namespace, and what a stop leaves (nothing but the nodename file and
the rendered configuration)."""

from __future__ import annotations

import re
import stat
import subprocess

from libcalico.model import ResourceKey, ResourceListOptions
from tests.harness import sh, wait_for
from tests.node.cluster import Cluster
from tests.node.conftest import ClusterFactory


def test_start_up_registers_the_node(clusters: ClusterFactory) -> None:
    cluster = clusters()
    node = cluster.add_node(AS="64601", CALICO_IPV4POOL_BLOCK_SIZE="28")
    with cluster.store() as store:
        spec = store.get(ResourceKey("Node", node.name)).value.spec
        info = store.get(ResourceKey("ClusterInformation", "default")).value.spec
        pool = store.get(ResourceKey("IPPool", "default-ipv4-ippool")).value.spec
        felix = store.get(ResourceKey("FelixConfiguration", "default")).value.spec
        bgp = store.get(ResourceKey("BGPConfiguration", "default")).value.spec
    assert spec["bgp"] == {"ipv4Address": f"{node.ip}/24", "asNumber": 64601}
    assert info["datastoreReady"] is True and re.fullmatch(r"[0-9a-f]{32}", info["clusterGUID"])
    assert info["calicoVersion"] and info["clusterType"] == "k8s,bgp"
    assert (pool.cidr, pool.block_size, pool.ipip_mode, pool.nat_outgoing) == (
        cluster.pool_cidr, 28, "Never", True,
    )  # fmt: skip
    assert felix == {"reportingInterval": "0s", "logSeverityScreen": "Info"}
    assert bgp == {}
    nodename = node.lib_dir / "nodename"
    assert nodename.read_text() == node.name  # no newline, as the CNI expects
    assert stat.S_IMODE(nodename.stat().st_mode) == 0o644
    assert "Using autodetected IPv4 address" in node.log() and "interface eth0" in node.log()

    # Probes: live and ready; one node, no peers, so BIRD is ready with 0 established.
    assert node.calico_node("-felix-live", "-bird-live").returncode == 0
    ready = node.calico_node("-felix-ready", "-bird-ready")
    assert ready.returncode == 0 and "established = 0" in ready.stdout

    # A second daemon for the same run directory refuses; the first goes on.
    second = node.calico_node()
    assert second.returncode == 1 and "already running" in second.stderr
    assert node.proc is not None and node.proc.poll() is None

    # A clean stop leaves no process, socket or pid file; the routes BIRD made stay.
    assert node.stop() == 0
    leftovers = sorted(p.name for p in node.run_dir.iterdir())
    assert leftovers == [], leftovers
    live = node.calico_node("-felix-live")
    assert live.returncode == 1 and "calico/node is not ready: felix is not live" in live.stdout
    bird = node.calico_node("-bird-ready")
    assert bird.returncode == 1 and "BIRD is not ready: Error querying BIRD" in bird.stdout
    status = node.calicoctl("node", "status")
    assert (status.returncode, status.stderr.strip()) == (1, "Calico process is not running.")


def test_refusals_change_nothing(clusters: ClusterFactory) -> None:
    cluster = clusters()
    first = cluster.add_node()
    taken = cluster.add_node(start=False, IP=first.ip)
    taken.start(wait=False)
    assert taken.proc is not None and taken.proc.wait(120) == 1
    assert f"Calico node '{first.name}' is already using the IPv4 address {first.ip}" in taken.log()
    bad = [
        ({"CALICO_NETWORKING_BACKEND": "gobgp"}, "CALICO_NETWORKING_BACKEND='gobgp' is not one of"),
        ({"IP_AUTODETECTION_METHOD": "nearest"}, "Invalid IP autodetection method: 'nearest'"),
        ({"AS": "70000.1"}, "AS='70000.1' is not an AS number"),
        ({"IP": "300.1.2.3"}, "IP='300.1.2.3' is not an address"),
        ({"CALICO_IPV4POOL_IPIP": "sometimes"}, "CALICO_IPV4POOL_IPIP='sometimes'"),
    ]
    for env, message in bad:
        node = cluster.add_node(start=False, **env)
        out = node.calico_node()
        assert out.returncode == 1, (env, out)
        assert message in out.stderr, (env, out.stderr)
        assert "Traceback" not in out.stderr
    with cluster.store() as store:
        names = {n.key.name for n in store.list(ResourceListOptions("Node"))}
        pools = {p.key.name for p in store.list(ResourceListOptions("IPPool"))}
    assert names == {first.name} and pools == {"default-ipv4-ippool"}


def test_autodetection_methods(clusters: ClusterFactory) -> None:
    """can-reach=, interface=, skip-interface= and cidr= on a node with a second NIC."""
    cluster = clusters()
    first = cluster.add_node()
    for method, wanted in (
        (f"can-reach={first.ip}", "eth0"),
        ("interface=ens.*", "ens5"),
        ("skip-interface=eth0", "ens5"),
        ("cidr=192.0.2.0/24", "ens5"),
    ):
        node = cluster.add_node(start=False, IP_AUTODETECTION_METHOD=method)
        sh(
            "ip",
            "-n",
            node.netns.name,
            "link",
            "add",
            "ens5",
            "type",
            "veth",
            "peer",
            "name",
            "ens5p",
        )
        sh(
            "ip",
            "-n",
            node.netns.name,
            "addr",
            "add",
            f"192.0.2.{len(cluster.nodes)}/24",
            "dev",
            "ens5",
        )
        sh("ip", "-n", node.netns.name, "link", "set", "ens5", "up")
        node.start()
        with cluster.store() as store:
            address = store.get(ResourceKey("Node", node.name)).value.spec["bgp"]["ipv4Address"]
        expected = f"{node.ip}/24" if wanted == "eth0" else f"192.0.2.{len(cluster.nodes)}/24"
        assert address == expected, (method, address)
        assert f"on interface {wanted} (method {method})" in node.log()
        assert node.stop() == 0


def test_cni_from_another_mount_namespace(clusters: ClusterFactory) -> None:
    """A daemon in its own mount namespace cannot open a pod netns created after it
    started by its path; the client hands the netns over as a descriptor."""
    cluster = clusters()
    node = cluster.add_node(start=False)
    node.start(private_mounts=True)
    pod = node.add_pod()  # its netns is created now, after the daemon's mounts were copied
    assert node.log().count("served CNI request") == 1
    daemon = node.proc.pid if node.proc else 0
    mounts = subprocess.run(
        ["nsenter", "-t", str(daemon), "-m", "cat", "/proc/self/mountinfo"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert pod.netns.name not in mounts  # by its path, the daemon could not have found it
    link = sh("ip", "-n", pod.netns.name, "-j", "addr", "show", "eth0").stdout
    assert pod.ip in link
    node.delete_pod(pod)
    assert node.log().count("served CNI request") == 2


def test_no_bgp_backend(clusters: ClusterFactory) -> None:
    cluster: Cluster = clusters()
    node = cluster.add_node(start=False, CALICO_NETWORKING_BACKEND="none")
    node.start(wait=False)
    wait_for(lambda: node.exited() or (node.run_dir / "cni-agent.sock").exists(), "the CNI socket")
    assert not node.exited(), node.log()
    wait_for(lambda: node.calico_node("-felix-ready").returncode == 0, "ready")
    assert "no need to run a BGP daemon" in node.log()
    assert node.bird_pid() is None and not node.bird_cfg.exists()
    status = node.calicoctl("node", "status")
    assert status.returncode == 0
    assert "The BGP backend process (BIRD) is not running." in status.stdout

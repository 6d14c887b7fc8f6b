"""Two nodes of a real cluster: the seed's deployment and service flow, and a node that
leaves.

    kubectl create deployment web --replicas=3 ...   pods on both nodes, pool addresses
    calicoctl ipam show                              the pool and one block per node
    kubectl drain node2; (node2 goes); kubectl delete node node2
                                                     its block released by kube-controllers
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator

import pytest
import yaml

from tests.cluster.cluster import POD_POOL, Cluster
from tests.cluster.conftest import checked_cluster
from tests.cluster.node import poll

WEB = "web"
# busybox's httpd serves the pod's name, so a client sees which pod answered.
WEB_COMMAND = "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 80 -h /www"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with checked_cluster(tmp_path_factory.mktemp("two-nodes"), nodes=2) as running:
        yield running


@pytest.fixture(scope="module")
def web(cluster: Cluster) -> dict[str, dict]:
    """`kubectl create deployment web --replicas=3`, spread over the nodes (a topology
    spread constraint makes the scheduler's choice certain), all three pods Running."""
    manifest = yaml.safe_load(
        cluster.kubectl(
            "create", "deployment", WEB, f"--image={cluster.busybox}", "--replicas=3",
            "--port=80", "--dry-run=client", "-o", "yaml", "--", "sh", "-c", WEB_COMMAND,
        ).stdout
    )  # fmt: skip
    spec = manifest["spec"]["template"]["spec"]
    spec["topologySpreadConstraints"] = [
        {
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "DoNotSchedule",
            "nodeTaintsPolicy": "Honor",  # a cordoned node is no longer a domain to fill
            "labelSelector": {"matchLabels": {"app": WEB}},
        }
    ]
    spec["terminationGracePeriodSeconds"] = 1
    spec["containers"][0]["imagePullPolicy"] = "Never"
    cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(manifest))
    return poll(lambda: running_pods(cluster, WEB, 3), "3 web pods running", 240)


def running_pods(cluster: Cluster, app: str, count: int) -> dict[str, dict] | None:
    """name -> pod of the app's pods, once exactly `count` are Running and Ready."""
    pods = cluster.get("pods", "-l", f"app={app}")["items"]
    ready = [
        p
        for p in pods
        if p["status"].get("phase") == "Running"
        and "deletionTimestamp" not in p["metadata"]
        and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"]["conditions"])
    ]
    if len(ready) != count or len(pods) != count:
        return None
    return {p["metadata"]["name"]: p for p in ready}


def block_of(cluster: Cluster, ip: str) -> dict:
    address = ipaddress.ip_address(ip)
    for block in cluster.ipam_objects("ipamblocks").values():
        if address in ipaddress.ip_network(block["spec"]["cidr"]):
            return block
    raise AssertionError(f"{ip} is in no IPAM block")


def test_deployment_pods_spread_over_both_nodes_with_pool_addresses(
    cluster: Cluster, web: dict[str, dict]
) -> None:
    nodes = {pod["spec"]["nodeName"] for pod in web.values()}
    assert nodes == {"node1", "node2"}
    for pod in web.values():
        ip = pod["status"]["podIP"]
        assert ipaddress.ip_address(ip) in ipaddress.ip_network(POD_POOL)
        assert block_of(cluster, ip)["spec"]["affinity"] == f"host:{pod['spec']['nodeName']}"
        assert pod["metadata"]["annotations"]["cni.projectcalico.org/podIP"] == f"{ip}/32"
    show = cluster.calico("ipam", "show")
    assert show.returncode == 0, show.stderr
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in show.stdout.splitlines()]
    assert ["IP Pool", POD_POOL, "65536", "3 (0%)", "65533 (100%)"] in rows
    blocks = cluster.calico("ipam", "show", "--show-blocks").stdout
    assert sum(1 for line in blocks.splitlines() if "| Block" in line) == 2


def on_node(web: dict[str, dict], node: str) -> list[dict]:
    return [pod for pod in web.values() if pod["spec"]["nodeName"] == node]


def pod_exec(cluster: Cluster, pod: dict, *argv: str, check: bool = True):
    """A command in a pod's container, through crictl on the pod's node."""
    node = cluster.nodes[pod["spec"]["nodeName"]]
    return node.pod_exec(pod["metadata"]["name"], *argv, check=check)


def test_pods_reach_each_other_across_nodes(cluster: Cluster, web: dict[str, dict]) -> None:
    """calico-node's BIRD mesh: each node routes the other's block to it."""
    here, there = on_node(web, "node1")[0], on_node(web, "node2")[0]
    for node, other in (("node1", "node2"), ("node2", "node1")):
        routes = json.loads(cluster.nodes[node].run("ip", "-j", "-4", "route").stdout)
        other_ip = cluster.nodes[other].address
        via = {
            r["dst"] for r in routes if r.get("gateway") == other_ip and r.get("protocol") == "bird"
        }
        blocks = {
            b["spec"]["cidr"]
            for b in cluster.ipam_objects("ipamblocks").values()
            if b["spec"]["affinity"] == f"host:{other}"
        }
        assert blocks and blocks <= via, (node, routes)
    for source, target in ((here, there), (there, here)):
        ping = pod_exec(cluster, source, "ping", "-c", "2", "-W", "5", target["status"]["podIP"])
        assert ping.returncode == 0, ping.stdout


def test_a_service_is_answered_by_a_pod_on_the_other_node(
    cluster: Cluster, web: dict[str, dict]
) -> None:
    """`kubectl expose deployment web --port=80`, then requests from a pod on node1 to the
    ClusterIP (kube-proxy's DNAT) until a pod on node2 answers."""
    cluster.kubectl("expose", "deployment", WEB, "--port=80")
    service_ip = cluster.get("service", WEB)["spec"]["clusterIP"]
    far = {pod["metadata"]["name"] for pod in on_node(web, "node2")}
    client = on_node(web, "node1")[0]

    def answered_from_node2() -> bool:
        # busybox-static's wget crashes in static glibc's resolver; nc speaks HTTP fine.
        request = f'printf "GET / HTTP/1.0\\r\\n\\r\\n" | nc -w 5 {service_ip} 80'
        reply = pod_exec(cluster, client, "sh", "-c", request, check=False)
        lines = reply.stdout.strip().splitlines()
        return reply.returncode == 0 and bool(lines) and lines[-1] in far

    poll(answered_from_node2, f"an answer from node2 through {service_ip}", 120)


def test_a_drained_and_deleted_node_gives_its_block_back(
    cluster: Cluster, web: dict[str, dict]
) -> None:
    """The operator drains node2 (its pods move to node1), the machine goes, the Node is
    deleted: calico-kube-controllers releases node2's block and affinity."""
    node2_blocks = {
        name
        for name, block in cluster.ipam_objects("ipamblocks").items()
        if block["spec"]["affinity"] == "host:node2"
    }
    assert node2_blocks
    cluster.kubectl(
        "drain", "node2", "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=120s",
        timeout=180,
    )  # fmt: skip
    moved = poll(lambda: running_pods(cluster, WEB, 3), "the web pods back to 3", 240)
    assert {pod["spec"]["nodeName"] for pod in moved.values()} == {"node1"}
    cluster.remove_node("node2")
    cluster.kubectl("delete", "node", "node2")

    def node2_gone() -> bool:
        blocks = cluster.ipam_objects("ipamblocks")
        affinities = cluster.ipam_objects("blockaffinities")
        return not (node2_blocks & set(blocks)) and not any(
            a["spec"]["node"] == "node2" for a in affinities.values()
        )

    poll(node2_gone, "node2's block released", 120)
    log = (cluster.directory / "calico-kube-controllers.log").read_text()
    assert "Released the blocks of a node that no longer exists" in log
    assert 'node="node2"' in log
    show = cluster.calico("ipam", "show", "--show-blocks").stdout
    assert sum(1 for line in show.splitlines() if "| Block" in line) == 1
    check = cluster.calico("ipam", "check")
    assert check.returncode == 0 and "found 0 problems" in check.stdout, check.stdout

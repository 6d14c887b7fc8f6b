"""Kubelet's parallelism: many ADDs and DELs at once on one node never collide or leak."""

from __future__ import annotations

import ipaddress
import os
from concurrent.futures import ThreadPoolExecutor

from tests.harness import Node, calico_conf, pod_args
from tests.root.checks import expected_host_veth

PODS = 30


def test_parallel_add_then_parallel_del(node: Node, ipam_dir: str) -> None:
    conf = calico_conf(
        "1.0.0", {"type": "host-local", "subnet": "10.55.0.0/24", "dataDir": ipam_dir}
    )
    pods = [node.new_pod() for _ in range(PODS)]

    def add(i: int):
        args = pod_args(f"pod-{i}", "burst")
        return node.run("ADD", conf, f"ctr-{i}", pods[i].path, args=args)

    with ThreadPoolExecutor(PODS) as pool:
        results = list(pool.map(add, range(PODS)))
    assert all(r.code == 0 for r in results), [r for r in results if r.code][:2]
    ips = [r.json["ips"][0]["address"] for r in results]
    assert len(set(ips)) == PODS
    for i, (pod, address) in enumerate(zip(pods, ips, strict=True)):
        assert pod.addrs("eth0") == [address]
        assert node.netns.link(expected_host_veth("burst", f"pod-{i}")) is not None
    for address in ips[::5]:
        assert node.netns.ping(str(ipaddress.ip_interface(address).ip))

    def delete(i: int):
        return node.run("DEL", conf, f"ctr-{i}", pods[i].path, args="IgnoreUnknown=1")

    with ThreadPoolExecutor(PODS) as pool:
        deleted = list(pool.map(delete, range(PODS)))
    assert all(r.code == 0 for r in deleted), [r for r in deleted if r.code][:2]
    assert node.host_veths() == []
    assert all(pod.link("eth0") is None for pod in pods)
    files = os.listdir(os.path.join(ipam_dir, "k8s-pod-network"))
    assert not [f for f in files if f[0].isdigit()], files
    host_routes = [r["dst"] for r in node.netns.routes(4)]
    assert not [d for d in host_routes if d.startswith("10.55.")], host_routes

"""calico-ipam through the calico plugin on real nodes: Calico's IPAM rules as a user meets
them, failures that leave nothing half-done, and many nodes sharing one datastore."""

from __future__ import annotations

import fcntl
import ipaddress
import os
import random
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.harness import GO_PLUGIN_DIR, Node, calico_conf, pod_args, run_plugin
from tests.ipam_support import LocalStore

VERSIONS = ["0.3.1", "1.0.0", "1.1.0"]


def conf_for(
    store: LocalStore,
    tmp_path: Path,
    version: str = "1.0.0",
    node_name: str = "node1",
    ipam: dict | None = None,
    **extra,
) -> dict:
    return calico_conf(
        version,
        {"type": "calico-ipam", **(ipam or {})},
        nodename=node_name,
        local_datastore_path=store.path,
        ipam_lock_file=str(tmp_path / f"ipam-{node_name}.lock"),
        **extra,
    )


def add(node: Node, conf: dict, name: str, **kw):
    pod = node.new_pod()
    result = node.run(
        "ADD",
        conf,
        f"ctr-{name}",
        pod.path,
        args=pod_args(name, "ns"),
        **kw,
    )
    return pod, result


def pod_ip(result) -> str:
    return result.json["ips"][0]["address"].split("/")[0]


def assert_nothing_half_done(node: Node, store: LocalStore, handle: str, pod) -> None:
    assert pod.link("eth0") is None
    assert store.ips_of(handle) == []
    assert store.consistency().ok


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(str(tmp_path / "calico.db"))


@pytest.mark.parametrize("version", VERSIONS)
def test_pool_exhausted(node: Node, store: LocalStore, tmp_path: Path, version: str) -> None:
    store.add_pool("tiny", "10.99.0.0/30", blockSize=30)
    conf = conf_for(store, tmp_path, version)
    for i in range(4):  # a block's network and broadcast addresses are valid pod IPs
        assert add(node, conf, f"p{i}")[1].code == 0
    pod, result = add(node, conf, "overflow")
    assert result.code != 0
    assert result.json["msg"] == (
        "failed to request IPv4 addresses: Assigned 0 out of 1 requested IPv4 addresses; "
        "No IPs available in pools: [10.99.0.0/30]"
    ), result
    assert_nothing_half_done(node, store, "k8s-pod-network.ctr-overflow", pod)
    assert store.in_use() == 4 and len(node.host_veths()) == 4


def test_per_host_block_limit(node: Node, store: LocalStore, tmp_path: Path) -> None:
    store.add_pool("small-blocks", "10.98.0.0/24", blockSize=30)
    store.set_config(strict_affinity=True, max_blocks_per_host=1)
    conf = conf_for(store, tmp_path)
    for i in range(4):
        assert add(node, conf, f"p{i}")[1].code == 0
    pod, result = add(node, conf, "fifth")
    assert "cannot allocate new block due to per host block limit" in result.json["msg"], result
    assert_nothing_half_done(node, store, "k8s-pod-network.ctr-fifth", pod)


@pytest.mark.parametrize("strict", [False, True])
def test_borrowing_only_without_strict_affinity(
    tmp_path: Path, store: LocalStore, cni_path: str, strict: bool
) -> None:
    store.add_pool("one-block", "10.97.0.0/30", blockSize=30)
    if strict:
        store.set_config(strict_affinity=True)
    node1, node2 = Node.create(cni_path), Node.create(cni_path)
    try:
        assert add(node1, conf_for(store, tmp_path, node_name="node1"), "first")[1].code == 0
        pod, result = add(node2, conf_for(store, tmp_path, node_name="node2"), "borrower")
        if strict:
            assert result.code != 0
            assert "No more free affine blocks and strict affinity enabled" in result.json["msg"]
            assert_nothing_half_done(node2, store, "k8s-pod-network.ctr-borrower", pod)
        else:
            assert result.code == 0, result
            assert pod_ip(result).startswith("10.97.0.")
            assert store.block_affinities() == {"10.97.0.0/30": "host:node1"}
    finally:
        node1.destroy()
        node2.destroy()


def test_reservation_is_never_handed_out(node: Node, store: LocalStore, tmp_path: Path) -> None:
    store.add_pool("p", "10.96.0.0/29", blockSize=29)
    store.add_reservation("gateways", ["10.96.0.0/31", "10.96.0.4/32"])
    conf = conf_for(store, tmp_path)
    ips = [pod_ip(add(node, conf, f"p{i}")[1]) for i in range(5)]
    assert sorted(ips) == ["10.96.0.2", "10.96.0.3", "10.96.0.5", "10.96.0.6", "10.96.0.7"]
    assert add(node, conf, "none-left")[1].code != 0


@pytest.mark.parametrize("version", VERSIONS)
def test_specific_ip(node: Node, store: LocalStore, tmp_path: Path, version: str) -> None:
    store.add_pool("p", "10.95.0.0/24")
    conf = conf_for(store, tmp_path, version)
    pod, ok = add(node, conf, "wants-42", env={"CNI_ARGS": "IgnoreUnknown=1;IP=10.95.0.42"})
    assert ok.code == 0 and pod_ip(ok) == "10.95.0.42", ok
    assert pod.addrs("eth0") == ["10.95.0.42/32"]
    pod2, taken = add(node, conf, "also-42", env={"CNI_ARGS": "IgnoreUnknown=1;IP=10.95.0.42"})
    assert taken.code != 0 and "Address already assigned in block" in taken.json["msg"], taken
    assert_nothing_half_done(node, store, "k8s-pod-network.ctr-also-42", pod2)
    pod3, outside = add(node, conf, "outside", env={"CNI_ARGS": "IgnoreUnknown=1;IP=192.0.2.9"})
    assert outside.json["code"] == 7, outside
    assert outside.json["msg"].startswith("The provided IP address is not in a configured pool")
    assert_nothing_half_done(node, store, "k8s-pod-network.ctr-outside", pod3)


def test_unknown_pool_name(node: Node, store: LocalStore, tmp_path: Path) -> None:
    store.add_pool("p", "10.94.0.0/24")
    conf = conf_for(store, tmp_path, ipam={"ipv4_pools": ["no-such-pool"]})
    pod, result = add(node, conf, "x")
    assert result.json["code"] == 7, result
    assert result.json["msg"] == "the given pool (no-such-pool) does not exist, or is not enabled"
    assert_nothing_half_done(node, store, "k8s-pod-network.ctr-x", pod)
    by_name = conf_for(store, tmp_path, ipam={"ipv4_pools": ["p"]})
    assert pod_ip(add(node, by_name, "y")[1]).startswith("10.94.0.")


def test_dual_stack_half_failure_gives_back_the_other_family(
    node: Node, store: LocalStore, tmp_path: Path
) -> None:
    store.add_pool("v4", "10.93.0.0/24")
    store.add_pool("v6", "fd00:93::/126", blockSize=126)
    conf = conf_for(store, tmp_path, ipam={"assign_ipv6": "true"})
    for i in range(4):
        assert add(node, conf, f"p{i}")[1].code == 0
    pod, result = add(node, conf, "no-v6-left")
    assert result.json["msg"].startswith("failed to request IPv6 addresses: Assigned 0 out of 1")
    assert_nothing_half_done(node, store, "k8s-pod-network.ctr-no-v6-left", pod)
    assert store.in_use() == 8


def test_corrupt_and_unusable_datastore(node: Node, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(os.urandom(8192))
    pod, result = add(node, conf_for(LocalStore(str(corrupt)), tmp_path), "c")
    assert result.code != 0 and "Traceback" not in result.stderr
    assert result.json["code"] == 999 and str(corrupt) in result.json["msg"], result
    assert "move the file aside" in result.json["details"]
    assert pod.link("eth0") is None and node.host_veths() == []
    directory = tmp_path / "a-directory.db"
    directory.mkdir()
    pod, result = add(node, conf_for(LocalStore(str(directory)), tmp_path), "d")
    assert result.code != 0 and str(directory) in result.json["msg"], result
    assert pod.link("eth0") is None and node.host_veths() == []


def test_lock_held_past_the_timeout(node: Node, store: LocalStore, tmp_path: Path) -> None:
    store.add_pool("p", "10.92.0.0/24")
    conf = conf_for(store, tmp_path, ipam_lock_timeout_seconds=1)
    with open(conf["ipam_lock_file"], "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        pod, result = add(node, conf, "waits")
    assert result.json["code"] == 11, result
    assert result.json["msg"].startswith(
        f"timed out after 1s waiting for the IPAM lock {conf['ipam_lock_file']}"
    )
    assert f"pid {os.getpid()}" in result.json["details"]
    assert_nothing_half_done(node, store, "k8s-pod-network.ctr-waits", pod)
    assert node.host_veths() == []


def test_fifty_parallel_adds_on_one_node(node: Node, store: LocalStore, tmp_path: Path) -> None:
    store.add_pool("default-ipv4-ippool", "10.244.0.0/16")
    conf = conf_for(store, tmp_path)
    pods = [node.new_pod() for _ in range(50)]

    def run(i: int, command: str):
        return node.run(
            command,
            conf,
            f"ctr-{i}",
            pods[i].path,
            args=pod_args(f"p{i}", "ns"),
        )

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda i: run(i, "ADD"), range(50)))
    assert all(r.code == 0 for r in results), [r for r in results if r.code][:1]
    assert len({pod_ip(r) for r in results}) == 50
    assert set(store.block_affinities().values()) == {"host:node1"}
    with ThreadPoolExecutor(50) as pool:
        deleted = list(pool.map(lambda i: run(i, "DEL"), range(50)))
    assert all(r.code == 0 for r in deleted), [r for r in deleted if r.code][:1]
    assert store.handles() == [] and store.in_use() == 0 and store.consistency().ok
    assert node.host_veths() == []


def test_three_nodes_share_one_datastore(store: LocalStore, tmp_path: Path, cni_path: str) -> None:
    store.add_pool("default-ipv4-ippool", "10.244.0.0/16")
    nodes = [Node.create(cni_path) for _ in range(3)]
    try:
        jobs = [(n, f"node{n}", i) for n in range(3) for i in range(10)]
        pods = {job: nodes[job[0]].new_pod() for job in jobs}

        def run(job, command: str):
            n, name, i = job
            return nodes[n].run(
                command,
                conf_for(store, tmp_path, node_name=name),
                f"ctr-{name}-{i}",
                pods[job].path,
                args=pod_args(f"{name}-{i}", "ns"),
            )

        with ThreadPoolExecutor(30) as pool:
            results = dict(zip(jobs, pool.map(lambda j: run(j, "ADD"), jobs), strict=True))
        assert all(r.code == 0 for r in results.values()), [r for r in results.values() if r.code][
            :1
        ]
        assert len({pod_ip(r) for r in results.values()}) == 30
        affinities = store.block_affinities()
        for (_, name, _), result in results.items():
            ip = ipaddress.ip_address(pod_ip(result))
            block = next(b for b in affinities if ip in ipaddress.ip_network(b))
            assert affinities[block] == f"host:{name}", "a node allocated from another's block"
        with ThreadPoolExecutor(30) as pool:
            deleted = list(pool.map(lambda j: run(j, "DEL"), jobs))
        assert all(r.code == 0 for r in deleted), [r for r in deleted if r.code][:1]
        assert store.handles() == [] and store.in_use() == 0 and store.consistency().ok
    finally:
        for n in nodes:
            n.destroy()


def test_kill_dash_nine_mid_add_then_del_leaves_ipam_consistent(
    node: Node, store: LocalStore, tmp_path: Path
) -> None:
    """The runtime's retry after a crash is DEL: whatever the ADD got to, DEL cleans it up."""
    store.add_pool("p", "10.91.0.0/24", blockSize=28)
    conf = conf_for(store, tmp_path)
    rng = random.Random(1234)
    plugin = os.path.join(node.cni_path, "calico")
    import json

    for i in range(12):
        pod = node.new_pod()
        env = {
            "PATH": os.environ["PATH"],
            "CNI_COMMAND": "ADD",
            "CNI_CONTAINERID": f"ctr-k{i}",
            "CNI_NETNS": pod.path,
            "CNI_IFNAME": "eth0",
            "CNI_PATH": node.cni_path,
            "CNI_ARGS": pod_args(f"k{i}", "ns"),
        }
        proc = subprocess.Popen(
            ["nsenter", f"--net={node.netns.path}", plugin],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        proc.stdin.write(json.dumps(conf).encode())
        proc.stdin.close()
        time.sleep(rng.uniform(0.05, 0.9))
        os.killpg(proc.pid, signal.SIGKILL)  # the plugin and its calico-ipam child
        proc.wait()
        deleted = node.run(
            "DEL",
            conf,
            f"ctr-k{i}",
            pod.path,
            args=pod_args(f"k{i}", "ns"),
        )
        assert deleted.code == 0, deleted
        assert pod.link("eth0") is None
    assert store.handles() == [] and store.in_use() == 0
    assert store.consistency().ok
    assert node.host_veths() == []


def test_range_mode_shares_a_directory_with_go_host_local(node: Node, ipam_dir: str) -> None:
    """calico-ipam with `subnet` and the Go host-local, 20 ADDs each at once, one dataDir."""
    conf = {
        "cniVersion": "1.0.0",
        "name": "shared-net",
        "type": "calico",
        "ipam": {"type": "calico-ipam", "subnet": "10.90.0.0/24", "dataDir": ipam_dir},
    }
    go_conf = dict(conf, ipam=dict(conf["ipam"], type="host-local"))
    ours = os.path.join(node.cni_path, "calico-ipam")
    go = str(GO_PLUGIN_DIR / "host-local")
    netns = node.new_pod().path  # IPAM ignores it, but skel insists on one that is not its own

    def run(i: int, command: str):
        plugin, c = (ours, conf) if i % 2 else (go, go_conf)
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": f"ctr-{i}",
            "CNI_IFNAME": "eth0",
            "CNI_NETNS": netns,
            "CNI_PATH": node.cni_path,
        }
        return run_plugin([plugin], env, c)

    with ThreadPoolExecutor(40) as pool:
        results = list(pool.map(lambda i: run(i, "ADD"), range(40)))
    assert all(r.code == 0 for r in results), [r for r in results if r.code][:1]
    ips = [r.json["ips"][0]["address"] for r in results]
    assert len(set(ips)) == 40
    directory = Path(ipam_dir) / "shared-net"
    for i, address in enumerate(ips):
        content = (directory / address.split("/")[0]).read_bytes()
        assert content == f"ctr-{i}\r\neth0".encode()
    with ThreadPoolExecutor(40) as pool:
        assert all(r.code == 0 for r in pool.map(lambda i: run(i, "DEL"), range(40)))
    assert sorted(p.name for p in directory.iterdir()) == ["last_reserved_ip.0", "lock"]

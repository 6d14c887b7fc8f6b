"""Real calico-ipam v3.31.7 and ours allocating on one node of one etcd at high fill.

Ours remembers the node's blocks between calls (a hints file beside the IPAM lock); real
Calico writes the same blocks behind those hints' back. Each side must keep using what the
other freed or claimed (the freed address first, the block the other claimed before a new
one), and real Calico's own `calicoctl ipam show` must agree with ours on every block.
"""

from __future__ import annotations

import ipaddress
import uuid
from pathlib import Path

from ipam_plugin.engine import IPAM, AutoAssignRequest
from ipam_plugin.inspect import block_usage, check_consistency
from libcalico.datastore.base import KVPair
from libcalico.model import BlockAffinityListOptions, IPAMConfig, IPAMConfigKey, IPPool, ResourceKey
from tests.etcd_fixture import EtcdCluster
from tests.harness import calico_conf
from tests.ipam_support import run_ipam
from tests.oracle import RealCalico, real_calico

__all__ = ["real_calico"]

NODE = "shared-node"
POOL = "10.62.0.0/24"  # 16 blocks of 16
BLOCK = 16
FULL_BLOCKS = 6


def address(result) -> str:
    assert result.code == 0, result
    return result.json["ips"][0]["address"].split("/")[0]


def block_of(ip: str) -> str:
    return str(ipaddress.ip_interface(f"{ip}/28").network)


def affine_blocks(cluster: EtcdCluster) -> set[str]:
    with cluster.open_store() as store:
        return {str(kvp.key.cidr) for kvp in store.list(BlockAffinityListOptions(NODE, 4))}


def fill_one_by_one(cluster: EtcdCluster, count: int, tag: str) -> list[str]:
    """Pods' worth of addresses through our engine in-process (not through the node's
    hints), each with its own handle as the CNI plugin names them."""
    with cluster.open_store() as store:
        ipam = IPAM(store)
        ips = []
        for i in range(count):
            handle = f"k8s-pod-network.{tag}-{i}"
            v4, _ = ipam.auto_assign(AutoAssignRequest(handle, NODE, {"node": NODE}))
            assert len(v4.ips) == 1, v4.msgs
            ips.append(str(v4.ips[0].ip))
    return ips


def test_real_calico_and_ours_share_a_full_node(
    clean_etcd: EtcdCluster, real_calico: RealCalico, tmp_path: Path
) -> None:
    with clean_etcd.open_store() as store:
        doc = {"metadata": {"name": "shared"}, "spec": {"cidr": POOL, "blockSize": 28}}
        store.create(KVPair(ResourceKey("IPPool", "shared"), IPPool.from_json(doc)))
        store.create(KVPair(IPAMConfigKey(), IPAMConfig(strict_affinity=True)))
        IPAM(store).ensure_node(NODE)
    conf = calico_conf(
        "1.0.0",
        {"type": "calico-ipam"},
        nodename=NODE,
        ipam_lock_file=str(tmp_path / "node.lock"),
        **clean_etcd.netconf(),
    )
    fill = fill_one_by_one(clean_etcd, FULL_BLOCKS * BLOCK, "fill")
    assert len(affine_blocks(clean_etcd)) == FULL_BLOCKS
    tag = uuid.uuid4().hex[:6]

    # Every block full: ours claims the seventh; the fill then tops it up behind its hints.
    first = address(run_ipam("ADD", conf, f"ours-1-{tag}"))
    seventh = block_of(first)
    assert seventh not in {block_of(ip) for ip in fill}
    fill += fill_one_by_one(clean_etcd, BLOCK - 1, "topup")
    assert len(affine_blocks(clean_etcd)) == FULL_BLOCKS + 1

    # Real Calico frees one address in a block ours last saw full: ours takes exactly it.
    freed = fill[37]
    released = real_calico.ipam("DEL", conf, "fill-37")
    assert released.code == 0, released
    assert address(run_ipam("ADD", conf, f"ours-2-{tag}")) == freed
    assert len(affine_blocks(clean_etcd)) == FULL_BLOCKS + 1

    # Real Calico claims the next block for the node; ours uses it rather than claim another.
    real_first = address(real_calico.ipam("ADD", conf, f"real-1-{tag}"))
    eighth = block_of(real_first)
    assert eighth not in {seventh, *(block_of(ip) for ip in fill)}
    ours_third = address(run_ipam("ADD", conf, f"ours-3-{tag}"))
    assert block_of(ours_third) == eighth
    real_second = address(real_calico.ipam("ADD", conf, f"real-2-{tag}"))
    assert block_of(real_second) == eighth
    assert affine_blocks(clean_etcd) == {*(block_of(ip) for ip in fill), eighth}
    taken = [first, freed, real_first, ours_third, real_second]
    assert len(set(taken)) == len(taken)

    env = {"DATASTORE_TYPE": "etcdv3", "ETCD_ENDPOINTS": clean_etcd.endpoint}
    with clean_etcd.open_store() as store:
        report = check_consistency(store)
        assert report.ok, report
        ours_view = {b.cidr: b.in_use for b in block_usage(store)}
    assert real_calico.block_usage(env) == ours_view
    assert ours_view[eighth] == 3

    # Each side releases the other's pods; the fill is all that is left.
    for cid in (f"ours-1-{tag}", f"ours-2-{tag}", f"ours-3-{tag}"):
        assert real_calico.ipam("DEL", conf, cid).code == 0
    for cid in (f"real-1-{tag}", f"real-2-{tag}"):
        assert run_ipam("DEL", conf, cid).code == 0
    with clean_etcd.open_store() as store:
        report = check_consistency(store)
        assert report.ok, report
        in_use = sum(b.in_use for b in block_usage(store))
    assert in_use == len(fill) - 1
    assert sum(real_calico.block_usage(env).values()) == in_use

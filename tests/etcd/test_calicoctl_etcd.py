"""The built calicoctl on a real etcd: every command, bad input, Calico's key layout read
back raw, and real calicoctl v3.31.7 on the same etcd reading what ours wrote and ours
reading what it wrote, their outputs compared."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from cni_plugin.workload import WorkloadID, write_endpoint
from ipam_plugin.engine import IPAM, AutoAssignRequest
from libcalico.model import ResourceKey
from tests.calicoctl_support import (
    POLICY,
    POLICY_TABLES,
    SEED,
    SEED_TABLES,
    Calicoctl,
    bad_input_changes_nothing,
    every_command,
    same_as_real,
)
from tests.etcd.cni_support import RESOURCES
from tests.etcd_fixture import EtcdCluster


@pytest.fixture
def ctl(clean_etcd: EtcdCluster) -> Calicoctl:
    return Calicoctl({"DATASTORE_TYPE": "etcdv3", "ETCD_ENDPOINTS": clean_etcd.endpoints})


def test_every_command_on_etcd(ctl: Calicoctl, clean_etcd: EtcdCluster, tmp_path: Path) -> None:
    every_command(ctl)
    raw = clean_etcd.raw_json(RESOURCES + "/")
    node = raw[f"{RESOURCES}/nodes/node1"]
    assert node["spec"]["bgp"]["routeReflectorClusterID"] == "1.1.1.1"
    assert raw[f"{RESOURCES}/bgpconfigurations/default"]["spec"]["asNumber"] == 63400
    # A policy is stored under its tiered name, its own name in an annotation (Calico's).
    policy = raw[f"{RESOURCES}/networkpolicies/default/default.allow-tcp-6379"]
    assert policy["metadata"]["name"] == "default.allow-tcp-6379"
    assert policy["metadata"]["annotations"] == {
        "projectcalico.org/metadata": '{"name":"allow-tcp-6379"}'
    }
    assert "tier" not in policy["spec"]
    assert f"{RESOURCES}/tiers/default" in raw
    assert raw[f"{RESOURCES}/clusterinformations/default"]["spec"]["datastoreReady"] is True


def test_bad_input_on_etcd(ctl: Calicoctl, clean_etcd: EtcdCluster) -> None:
    ctl.ok("apply", "-f", "-", stdin=SEED)
    before = clean_etcd.raw_items("/calico/")
    bad_input_changes_nothing(ctl)
    assert clean_etcd.raw_items("/calico/") == before


def _pods(clean_etcd: EtcdCluster, count: int) -> None:
    """Addresses and endpoints of `count` pods on node1, as calico and calico-ipam write
    them (the CNI itself runs in the root suites)."""
    with clean_etcd.open_store() as store:
        engine = IPAM(store)
        for index in range(count):
            pod = f"web-{index}"
            handle = f"k8s-pod-network.c{index}"
            attrs = {"node": "node1", "pod": pod, "namespace": "default"}
            v4, _ = engine.auto_assign(AutoAssignRequest(handle, "node1", attrs, num_v4=1))
            ips = [ipaddress.ip_interface(f"{ip.ip}/32") for ip in v4.ips]
            wid = WorkloadID("node1", "k8s", "default", pod, "eth0")
            mac = "ee:ee:ee:ee:ee:ee"
            write_endpoint(store, wid, f"c{index}", f"cali{index}", mac, ips, ["kns.default"])


def test_real_calicoctl_reads_what_ours_wrote(ctl: Calicoctl, clean_etcd: EtcdCluster) -> None:
    real = ctl.oracle()
    ctl.ok("apply", "-f", "-", stdin=SEED)
    ctl.ok("apply", "-f", "-", stdin=POLICY)
    _pods(clean_etcd, 3)
    for argv, table in {**SEED_TABLES, **POLICY_TABLES}.items():
        assert real.ok(*argv) == table, argv
    same_as_real(ctl, real)
    ip = real.doc("get", "workloadendpoints", "-A")["items"][0]["spec"]["ipNetworks"][0]
    shown = real.ok("ipam", "show", "--ip", ip.split("/")[0])
    assert shown.startswith(f"IP {ip.split('/')[0]} is in use")


def test_ours_reads_what_real_calicoctl_wrote(ctl: Calicoctl, clean_etcd: EtcdCluster) -> None:
    real = ctl.oracle()
    real.ok("apply", "-f", "-", stdin=SEED)
    real.ok("apply", "-f", "-", stdin=POLICY)
    real.ok("ipam", "configure", "--strictaffinity=true")
    _pods(clean_etcd, 2)
    for argv, table in {**SEED_TABLES, **POLICY_TABLES}.items():
        assert ctl.ok(*argv) == table, argv
    same_as_real(ctl, real)
    # What real calicoctl wrote, ours rewrites and real reads back.
    ctl.ok("label", "nodes", "node1", "zone=a")
    ctl.ok("patch", "gnp", "deny-blue", "-p", '{"spec":{"order":20}}')
    assert real.doc("get", "node", "node1")["metadata"]["labels"]["zone"] == "a"
    assert real.doc("get", "gnp", "deny-blue")["spec"]["order"] == 20
    assert "Check complete; found 0 problems." in ctl.ok("ipam", "check")


def _decommission(ctl: Calicoctl, clean_etcd: EtcdCluster, deleter: Calicoctl) -> dict[str, Any]:
    """The etcd data left after `deleter` deletes node1, which had two pods, a VXLAN tunnel
    address, its own FelixConfiguration and a block one of node2's pods borrowed from."""
    clean_etcd.wipe()
    ctl.ok("apply", "-f", "-", stdin=SEED)
    felix = {"kind": "FelixConfiguration", "apiVersion": "projectcalico.org/v3"}
    ctl.ok("apply", "-f", "-", stdin=json.dumps({**felix, "metadata": {"name": "node.node1"}}))
    _pods(clean_etcd, 2)
    with clean_etcd.open_store() as store:
        engine = IPAM(store)
        attrs = {"node": "node1", "type": "vxlanTunnelAddress"}
        request = AutoAssignRequest("vxlan-tunnel-addr-node1", "node1", attrs, num_v4=1)
        tunnel = engine.auto_assign(request)[0].ips[0].ip
        node = store.get(ResourceKey("Node", "node1"))
        node.value.spec["ipv4VXLANTunnelAddr"] = str(tunnel)
        store.update(node)
        engine.ensure_node("node2")
        block = ipaddress.ip_network(f"{tunnel}/26", strict=False)
        attrs = {"node": "node2", "pod": "q", "namespace": "default"}
        borrowed = engine.assign_ip(str(block[40]), "k8s-pod-network.q", attrs, "node2")
        wid = WorkloadID("node2", "k8s", "default", "q", "eth0")
        write_endpoint(store, wid, "q", "caliq", "ee:ee:ee:ee:ee:ee", [borrowed], [])
    assert deleter.ok("delete", "node", "node1") == "Successfully deleted 1 'Node' resource(s)\n"
    assert "Check complete; found 0 problems." in ctl.ok("ipam", "check")
    return clean_etcd.raw_json("/calico/")


def test_deleting_a_node_leaves_what_real_calicoctl_leaves(
    ctl: Calicoctl, clean_etcd: EtcdCluster
) -> None:
    def ipam(raw: dict[str, Any]) -> dict[str, Any]:
        """Keys, and for blocks their affinity and allocations (the rest is bookkeeping)."""
        return {
            key: {k: value.get(k) for k in ("affinity", "allocations")}
            if "/block/" in key
            else None
            for key, value in raw.items()
            if not key.startswith("/calico/resources/v3/projectcalico.org/clusterinformations")
        }

    theirs = ipam(_decommission(ctl, clean_etcd, ctl.oracle()))
    ours = ipam(_decommission(ctl, clean_etcd, ctl))
    assert ours == theirs
    assert not [key for key in ours if "node1" in key]

"""The built calicoctl on a real etcd: every command, bad input, Calico's key layout read
back raw, and real calicoctl v3.31.7 on the same etcd reading what ours wrote and ours
reading what it wrote, their outputs compared."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from cni_plugin.workload import WorkloadID, write_endpoint
from ipam_plugin.engine import IPAM, AutoAssignRequest
from tests.calicoctl_support import (
    POLICY,
    POLICY_TABLES,
    SEED,
    SEED_TABLES,
    Calicoctl,
    bad_input_changes_nothing,
    every_command,
    without_server_fields,
)
from tests.etcd.cni_support import RESOURCES
from tests.etcd_fixture import EtcdCluster

# What both tools print alike for the same data (list revisions aside).
SHARED_VIEWS = [
    ("get", "nodes", "-o", "wide"),
    ("get", "bgppeers", "-o", "wide"),
    ("get", "bgpconfigurations"),
    ("get", "ippools", "-o", "wide"),
    ("get", "networkpolicies", "-A", "-o", "wide"),
    ("get", "globalnetworkpolicies", "-o", "wide"),
    ("get", "networksets", "-A", "-o", "wide"),
    ("get", "globalnetworksets", "-o", "wide"),
    ("get", "felixconfigurations"),
    ("get", "tiers"),
    ("get", "workloadendpoints", "-A", "-o", "wide"),
    ("ipam", "show", "--show-blocks"),
    ("ipam", "show", "--show-configuration"),
]
YAML_VIEWS = [
    ("get", "node", "node1"),
    ("get", "bgppeers"),
    ("get", "bgpconfig", "default"),
    ("get", "ippools"),
    ("get", "networkpolicy", "allow-tcp-6379"),
    ("get", "globalnetworkpolicies"),
    ("get", "globalnetworkset", "a-name-for-the-set"),
    ("get", "felixconfiguration", "default"),
    ("get", "workloadendpoints", "-A"),
]


@pytest.fixture
def ctl(clean_etcd: EtcdCluster) -> Calicoctl:
    return Calicoctl({"DATASTORE_TYPE": "etcdv3", "ETCD_ENDPOINTS": clean_etcd.endpoints})


def test_every_command_on_etcd(ctl: Calicoctl, clean_etcd: EtcdCluster, tmp_path: Path) -> None:
    every_command(ctl, tmp_path)
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


def _compare(ours: Calicoctl, real: Calicoctl) -> None:
    for argv in SHARED_VIEWS:
        assert ours.ok(*argv) == real.ok(*argv), argv
    for argv in YAML_VIEWS:
        assert without_server_fields(ours.doc(*argv)) == without_server_fields(real.doc(*argv))


def test_real_calicoctl_reads_what_ours_wrote(ctl: Calicoctl, clean_etcd: EtcdCluster) -> None:
    real = ctl.oracle()
    ctl.ok("apply", "-f", "-", stdin=SEED)
    ctl.ok("apply", "-f", "-", stdin=POLICY)
    _pods(clean_etcd, 3)
    for argv, table in {**SEED_TABLES, **POLICY_TABLES}.items():
        assert real.ok(*argv) == table, argv
    _compare(ctl, real)
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
    _compare(ctl, real)
    # What real calicoctl wrote, ours rewrites and real reads back.
    ctl.ok("label", "nodes", "node1", "zone=a")
    ctl.ok("patch", "gnp", "deny-blue", "-p", '{"spec":{"order":20}}')
    assert real.doc("get", "node", "node1")["metadata"]["labels"]["zone"] == "a"
    assert real.doc("get", "gnp", "deny-blue")["spec"]["order"] == 20
    assert "Check complete; found 0 problems." in ctl.ok("ipam", "check")

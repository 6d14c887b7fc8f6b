"""calicoctl in-process on a real SQLite file, for what test_cli.py does not cover: every
kind's checks (CRD schema and Calico's rules), names, Go's formatting, the version check,
`node checksystem`, `ipam release --from-report`, `--show-borrowed`, migration between two
files; and the Kubernetes codecs' pure parts (UIDs, the Node in annotations)."""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from calicoctl import schema
from calicoctl.kinds import go_float, kind_for
from cni_plugin.workload import WorkloadID, write_endpoint
from ipam_plugin.engine import IPAM, AutoAssignRequest
from libcalico.datastore.base import NotFound
from libcalico.datastore.kubernetes import NodeCodec, convert_uid
from libcalico.datastore.local import LocalDatastore
from libcalico.model import (
    BlockAffinityListOptions,
    BlockKey,
    Node,
    ObjectMeta,
    ResourceKey,
    ResourceListOptions,
)
from tests.calicoctl_support import POLICY, SEED, rows
from tests.harness import REPO
from tests.unit.cli_support import Cli, cli, db

__all__ = ["cli", "db"]


def refused(cli: Cli, text: str) -> str:
    result = cli("apply", "-f", "-", stdin=text)
    assert result.code == 1, result
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    return lines[0]


def doc(kind: str, name: str, spec: dict, **metadata: object) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "projectcalico.org/v3",
            "kind": kind,
            "metadata": {"name": name, **metadata},
            "spec": spec,
        }
    )


# ------------------------------------------------------------------- schemas


@pytest.mark.parametrize("path", sorted((REPO / "conf" / "crds").glob("*.yaml")), ids=str)
def test_every_crd_schema_is_valid_json_schema(path: Path) -> None:
    plural = path.stem.split("_", 1)[1]
    strict = schema._strict(schema.crd_schema(plural))
    jsonschema.Draft7Validator.check_schema(strict)

    def patterns(node: object) -> list[str]:
        if isinstance(node, dict):
            return [v for k, v in node.items() if k == "pattern"] + [
                p for v in node.values() for p in patterns(v)
            ]
        return [p for v in node for p in patterns(v)] if isinstance(node, list) else []

    for pattern in patterns(strict):
        re.compile(pattern)


# ------------------------------------------------------------- every kind


BAD = [
    (doc("BGPPeer", "p", {"peerSelector": "all()", "asNumber": 64512}), "spec.asNumber = '64512'"),
    (doc("BGPPeer", "p", {"peerIP": "10.0.0.1", "asNumber": -5}), "spec.asNumber = '-5'"),
    (doc("BGPPeer", "p", {"peerIP": "[fd00::1]:99999", "asNumber": 1}), "port must be"),
    (doc("BGPPeer", "p", {"nodeSelector": "a =="}), "spec.nodeSelector = 'a =='"),
    (doc("BGPPeer", "p", {"sourceAddress": "Sometimes"}), "spec.sourceAddress"),
    (doc("BGPConfiguration", "default", {"logSeverityScreen": "Loud"}), "log level"),
    (doc("BGPConfiguration", "default", {"listenPort": 70000}), "at most 65535"),
    (doc("BGPConfiguration", "default", {"communities": [{"name": "a", "value": "x"}]}), "value"),
    (doc("BGPConfiguration", "other", {}), "default or node.<nodename>"),
    (doc("FelixConfiguration", "default", {"floatingIPs": "Maybe"}), "spec.floatingIPs"),
    (doc("FelixConfiguration", "default", {"vxlanPortz": 4789}), "spec.vxlanPortz"),
    (doc("FelixConfiguration", "default", {"logSeverityScreen": "loud"}), "does not match"),
    (doc("KubeControllersConfiguration", "other", {}), "must be named default"),
    (doc("Tier", "t", {"defaultAction": "Allow"}), "spec.defaultAction"),
    (doc("GlobalNetworkSet", "s", {"nets": ["10.0.0.0/33"]}), "spec.nets[0] = '10.0.0.0/33'"),
    (doc("NetworkSet", "s", {"nets": ["nope"]}, namespace="Bad_NS"), "metadata.namespace"),
    (doc("Node", "n", {"bgp": {"ipv4Address": "10.0.0.1/40"}}), "spec.bgp.ipv4Address"),
    (doc("Node", "n", {"bgp": {"ipv4Address": "fd00::1/64"}}), "must be an IPv4"),
    (doc("Node", "n", {"bgp": {"routeReflectorClusterID": "x"}}), "routeReflectorClusterID"),
    (doc("GlobalNetworkPolicy", "p", {"selector": "has("}), "spec.selector"),
    (doc("GlobalNetworkPolicy", "p", {"ingress": [{"action": "Accept"}]}), "ingress[0].action"),
    (
        doc(
            "GlobalNetworkPolicy",
            "p",
            {"ingress": [{"action": "Allow", "destination": {"ports": [80]}}]},
        ),
        "ports are only valid with protocol TCP, UDP or SCTP",
    ),
    (
        doc("GlobalNetworkPolicy", "p", {"types": ["Egress"], "ingress": [{"action": "Deny"}]}),
        "ingress rules need Ingress in types",
    ),
    (doc("GlobalNetworkPolicy", "p", {"doNotTrack": True}), "spec.applyOnForward"),
    (doc("NetworkPolicy", "x.y", {}, namespace="default"), "must start with its tier"),
    (
        doc("GlobalNetworkPolicy", "p", {"ingress": [{"action": "Allow", "protocol": 300}]}),
        "protocol",
    ),
]


@pytest.mark.parametrize(("text", "wanted"), BAD)
def test_each_kind_refuses_what_calico_refuses(cli: Cli, text: str, wanted: str) -> None:
    message = refused(cli, text)
    assert wanted in message
    kind = yaml.safe_load(text)["kind"]
    listing = cli("get", kind, "-o", "yaml", *(["-A"] if kind in ("NetworkSet",) else []))
    assert yaml.safe_load(listing.out)["items"] == []


def test_field_names_match_case_insensitively_as_calicoctl_decodes(cli: Cli) -> None:
    text = doc("IPPool", "p", {"CIDR": "10.9.0.0/16", "natOutGoing": True, "IPIPMode": "Always"})
    assert cli("apply", "-f", "-", stdin=text).code == 0
    spec = yaml.safe_load(cli("get", "ippool", "p", "-o", "yaml").out)["spec"]
    assert (spec["cidr"], spec["natOutgoing"], spec["ipipMode"]) == ("10.9.0.0/16", True, "Always")


def test_policies_in_other_tiers_and_their_names(cli: Cli, db: str) -> None:
    tier = doc("Tier", "security", {"order": 100})
    policy = doc("GlobalNetworkPolicy", "security.block", {"tier": "security", "selector": "all()"})
    assert cli("apply", "-f", "-", stdin=tier + "---\n" + policy).code == 0
    assert ["security.block", "security", "<nil>", "all()"] in rows(
        cli("get", "gnp", "-o", "wide").out
    )
    with LocalDatastore(db) as store:
        stored = store.get(ResourceKey("GlobalNetworkPolicy", "security.block")).value
    assert stored.to_json()["spec"]["tier"] == "security"
    assert rows(cli("get", "tier", "security").out)[0][1:] == ["100"]


@pytest.mark.parametrize(
    ("typed", "kind"),
    [
        ("ipPools", "IPPool"),
        ("BGPPeer", "BGPPeer"),
        ("bgppeers", "BGPPeer"),
        ("BGPConfiguration", "BGPConfiguration"),
        ("bgpconfigs", "BGPConfiguration"),
        ("no", "Node"),
        ("GNP", "GlobalNetworkPolicy"),
        ("policies", "NetworkPolicy"),
        ("weps", "WorkloadEndpoint"),
        ("felixConfigurations", "FelixConfiguration"),
        ("KubeControllersConfiguration", "KubeControllersConfiguration"),
        ("clusterinfos", "ClusterInformation"),
    ],
)
def test_kind_names_plurals_and_short_names(typed: str, kind: str) -> None:
    assert kind_for(typed).name == kind


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (10, "10"),
        (10.5, "10.5"),
        (1000, "1000"),
        (1e6, "1e+06"),
        (123456, "123456"),
        (1e7, "1e+07"),
    ],
)
def test_go_float_formatting(value: float, shown: str) -> None:
    assert go_float(value) == shown


# ------------------------------------------------------------- version, node


def test_a_cluster_of_another_version_needs_the_flag(cli: Cli) -> None:
    info = doc(
        "ClusterInformation", "default", {"calicoVersion": "v3.31.7", "datastoreReady": True}
    )
    assert cli("apply", "-f", "-", stdin=info).code == 0
    mismatch = cli("get", "nodes")
    assert mismatch.code == 1 and "use --allow-version-mismatch" in mismatch.err
    assert cli("get", "nodes", "--allow-version-mismatch").code == 0
    assert cli("--allow-version-mismatch", "get", "nodes").code == 0
    version = cli("version")
    assert version.code == 0 and "Cluster Version:   v3.31.7" in version.out


def test_node_status_without_calico_node(cli: Cli) -> None:
    assert (cli("node", "status").code, cli("node", "status").err) == (
        1,
        "Calico process is not running.\n",
    )


def _kernel_config(tmp_path: Path, *without: str) -> str:
    options = [
        "CONFIG_VETH", "CONFIG_IP_SET", "CONFIG_IP_NF_IPTABLES", "CONFIG_IP6_NF_IPTABLES",
        "CONFIG_IP_NF_TARGET_REJECT", "CONFIG_IP_NF_MATCH_RPFILTER", "CONFIG_NF_CT_NETLINK",
        "CONFIG_NETFILTER_XT_MATCH_ADDRTYPE", "CONFIG_NETFILTER_XT_MATCH_CONNTRACK",
        "CONFIG_NETFILTER_XT_MARK", "CONFIG_NETFILTER_XT_MATCH_MULTIPORT",
        "CONFIG_NETFILTER_XT_SET", "CONFIG_NETFILTER_XT_TARGET_MASQUERADE", "CONFIG_VXLAN",
        "CONFIG_NET_IPIP", "CONFIG_WIREGUARD",
    ]  # fmt: skip
    lines = [f"# {o} is not set" if o in without else f"{o}=y" for o in options]
    path = tmp_path / "config"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_checksystem_on_this_kernel_names_the_missing_ipip(cli: Cli) -> None:
    result = cli("node", "checksystem")
    assert result.code == 0, result.err
    assert "WARNING: this kernel has no ipip (CONFIG_NET_IPIP is not set)" in result.out
    assert "System meets minimum system requirements to run Calico!" in result.out


def test_checksystem_fails_without_a_required_feature(cli: Cli, tmp_path: Path) -> None:
    config = _kernel_config(tmp_path, "CONFIG_IP_SET")
    result = cli("node", "checksystem", "--kernel-config", config)
    assert result.code == 1
    assert "\t\tip_set              \t\t\t\t\tFAIL" in result.out
    assert result.err == (
        "system doesn't meet one or more minimum systems requirements to run Calico\n"
    )
    complete = cli("node", "checksystem", "--kernel-config", _kernel_config(tmp_path))
    assert complete.code == 0 and "WARNING" not in complete.out


# ------------------------------------------------------------------ ipam


def _allocate(db: str, pod: str, node: str = "node1", endpoint: bool = True) -> str:
    with LocalDatastore(db) as store:
        engine = IPAM(store)
        engine.ensure_node(node)
        attrs = {"node": node, "pod": pod, "namespace": "default"}
        v4, _ = engine.auto_assign(
            AutoAssignRequest(f"k8s-pod-network.{pod}", node, attrs, num_v4=1)
        )
        if endpoint:
            wid = WorkloadID(node, "k8s", "default", pod, "eth0")
            write_endpoint(store, wid, pod, "cali0", "ee:ee:ee:ee:ee:ee", v4.ips, ["kns.default"])
        return str(v4.ips[0].ip)


def test_release_from_report_needs_the_lock_and_frees_only_leaks(
    cli: Cli, db: str, tmp_path: Path
) -> None:
    assert cli("apply", "-f", "-", stdin=SEED).code == 0
    used = _allocate(db, "live")
    leaked = _allocate(db, "gone", endpoint=False)
    report = tmp_path / "report.json"
    assert cli("ipam", "check", "-o", str(report)).code == 1
    unlocked = cli("ipam", "release", f"--from-report={report}")
    assert unlocked.code == 1 and "data store is not locked" in unlocked.err
    assert cli("datastore", "migrate", "lock").out == "Datastore locked.\n"
    stale = cli("ipam", "release", f"--from-report={report}")
    assert stale.code == 1 and "stale" in stale.err  # the lock changed ClusterInformation
    assert cli("ipam", "check", "-o", str(report)).code == 1
    released = cli("ipam", "release", f"--from-report={report}")
    assert released.code == 0, released.err
    assert "Released 1 IPs successfully" in released.out
    assert f"{leaked} is not assigned" in cli("ipam", "show", "--ip", leaked).out
    assert f"IP {used} is in use" in cli("ipam", "show", "--ip", used).out
    cli("datastore", "migrate", "unlock")
    assert cli("ipam", "check").code == 0
    other = json.loads(report.read_text())
    other["clusterGUID"] = "0" * 32
    report.write_text(json.dumps(other))
    assert "mismatched cluster GUID" in cli("ipam", "release", f"--from-report={report}").err


def test_show_borrowed(cli: Cli, db: str) -> None:
    assert cli("apply", "-f", "-", stdin=SEED).code == 0
    ip = _allocate(db, "p1")
    with LocalDatastore(db) as store:
        engine = IPAM(store)
        engine.ensure_node("node2")
        attrs = {"node": "node2", "pod": "p2", "namespace": "default"}
        borrowed = str(ipaddress.ip_address(ip) + 9)  # in node1's block
        engine.assign_ip(borrowed, "k8s-pod-network.p2", attrs, "node2")
    out = cli("ipam", "show", "--show-borrowed").out
    (row,) = [r for r in out.splitlines() if r.startswith("| 10.")]
    block = str(ipaddress.ip_network(f"{ip}/26", strict=False))
    assert [c.strip() for c in row.strip("|").split("|")] == [
        borrowed,
        "node2",
        block,
        "node1",
        "pod",
        "default/p2",
    ]


def test_deleting_a_node_releases_what_it_held(cli: Cli, db: str) -> None:
    """As calicoctl on etcd: the node's endpoints, addresses, tunnel address, affinities
    and per-node configuration go with it; another node's address borrowed from its block
    stays, in a block without affinity that goes when that address does."""
    assert cli("apply", "-f", "-", stdin=SEED).code == 0
    felix = doc("FelixConfiguration", "node.node1", {"logSeverityScreen": "Debug"})
    assert cli("apply", "-f", "-", stdin=felix).code == 0
    pods = [_allocate(db, "p1"), _allocate(db, "p2")]
    other = _allocate(db, "q1", node="node2")
    block = ipaddress.ip_network(f"{pods[0]}/26", strict=False)
    with LocalDatastore(db) as store:
        engine = IPAM(store)
        attrs = {"node": "node1", "type": "vxlanTunnelAddress"}
        tunnel, _ = engine.auto_assign(
            AutoAssignRequest("vxlan-tunnel-addr-node1", "node1", attrs, num_v4=1)
        )
        node = store.get(ResourceKey("Node", "node1"))
        node.value.spec["ipv4VXLANTunnelAddr"] = str(tunnel.ips[0].ip)
        store.update(node)
        borrowed = engine.assign_ip(
            str(block[40]), "k8s-pod-network.q2", {"node": "node2", "pod": "q2"}, "node2"
        )
        wid = WorkloadID("node2", "k8s", "default", "q2", "eth0")
        write_endpoint(store, wid, "q2", "cali1", "ee:ee:ee:ee:ee:ee", [borrowed], [])
    assert cli("ipam", "check").code == 0

    deleted = cli("delete", "node", "node1")
    assert (deleted.code, deleted.out) == (0, "Successfully deleted 1 'Node' resource(s)\n")

    for ip in [*pods, str(tunnel.ips[0].ip)]:
        assert f"{ip} is not assigned" in cli("ipam", "show", "--ip", ip).out
    for ip in (other, str(block[40])):
        assert f"IP {ip} is in use" in cli("ipam", "show", "--ip", ip).out
    assert cli("get", "felixconfiguration", "node.node1").code == 1
    assert cli("get", "node", "node2").code == 0
    assert cli("ipam", "check").code == 0
    with LocalDatastore(db) as store:
        endpoints = store.list(ResourceListOptions("WorkloadEndpoint"))
        assert sorted(kvp.value.spec["pod"] for kvp in endpoints) == ["q1", "q2"]
        assert store.list(BlockAffinityListOptions("node1")) == []
        assert store.get(BlockKey(block)).value.affinity is None
        IPAM(store).release_by_handle("k8s-pod-network.q2")
        with pytest.raises(NotFound):
            store.get(BlockKey(block))  # emptied and owned by nobody: back to the pool


# --------------------------------------------------------------- migrate


def test_migrate_between_two_local_files(cli: Cli, db: str, tmp_path: Path) -> None:
    assert cli("apply", "-f", "-", stdin=SEED).code == 0
    assert cli("apply", "-f", "-", stdin=POLICY).code == 0
    ip = _allocate(db, "web-0")
    assert "datastore is not locked" in cli("datastore", "migrate", "export").err
    cli("datastore", "migrate", "lock")
    exported = cli("datastore", "migrate", "export").out
    assert exported.count("\n===\n") == 3
    target = tmp_path / "target.cfg"
    target.write_text(
        "apiVersion: projectcalico.org/v3\nkind: CalicoAPIConfig\nmetadata: {}\n"
        f"spec: {{datastoreType: local, localDatastorePath: {tmp_path / 'new.db'}}}\n"
    )
    imported = cli("datastore", "migrate", "import", "-f", "-", "-c", str(target), stdin=exported)
    assert imported.code == 0, imported.err
    again = cli("datastore", "migrate", "import", "-f", "-", "-c", str(target), stdin=exported)
    assert again.code == 1 and "import into an empty datastore" in again.err
    locked = cli("get", "clusterinfo", "-c", str(target), "-o", "yaml").out
    assert yaml.safe_load(locked)["items"][0]["spec"]["datastoreReady"] is False
    cli("datastore", "migrate", "unlock", "-c", str(target))
    for argv in (
        ("get", "nodes", "-o", "wide"),
        ("get", "gnp", "-o", "wide"),
        ("get", "wep", "-A", "-o", "wide"),
        ("ipam", "show", "--show-blocks"),
    ):
        assert cli(*argv, "-c", str(target)).out == cli(*argv).out, argv
    assert f"IP {ip} is in use" in cli("ipam", "show", "--ip", ip, "-c", str(target)).out
    assert cli("ipam", "check", "-c", str(target)).code == 0
    info = yaml.safe_load(cli("get", "clusterinfo", "default", "-o", "yaml").out)
    moved = yaml.safe_load(
        cli("get", "clusterinfo", "default", "-o", "yaml", "-c", str(target)).out
    )
    assert moved["spec"]["clusterGUID"] == info["spec"]["clusterGUID"]


# ------------------------------------------------------ Kubernetes codecs


def test_v3_uids_are_calicos_transform_of_the_crds() -> None:
    # Observed from calicoctl v3.31.7: CRD UID -> the UID it shows.
    assert convert_uid("c077cb69-5efc-4cd4-9bb9-19cc02c1d44a") == (
        "03eed396-7a3f-4c2b-9b9d-983340832b52"
    )
    assert convert_uid(convert_uid("84437e33-b7ea-4fe6-a566-ddab88a6fc46")) == (
        "84437e33-b7ea-4fe6-a566-ddab88a6fc46"
    )


def test_the_node_round_trips_through_the_kubernetes_node() -> None:
    codec = NodeCodec("Node", "nodes", root="/api/v1")
    kube = {"metadata": {"name": "n1", "labels": {"kubernetes.io/hostname": "n1"}}, "spec": {}}
    node = Node(
        ObjectMeta("n1", {"route-reflector": "true", "kubernetes.io/hostname": "n1"}),
        {
            "bgp": {
                "ipv4Address": "10.0.0.1/24",
                "asNumber": 65001,
                "routeReflectorClusterID": "1.1.1.1",
            }
        },
    )
    merged = codec.merge(kube, ResourceKey("Node", "n1"), node)
    annotations = merged["metadata"]["annotations"]
    assert annotations == {
        "projectcalico.org/labels": '{"route-reflector":"true"}',
        "projectcalico.org/IPv4Address": "10.0.0.1/24",
        "projectcalico.org/RouteReflectorClusterID": "1.1.1.1",
        "projectcalico.org/ASNumber": "65001",
    }
    assert merged["metadata"]["labels"] == {"kubernetes.io/hostname": "n1"}
    back = codec.decode(merged).value
    assert back.metadata.labels == {"route-reflector": "true", "kubernetes.io/hostname": "n1"}
    assert back.spec["bgp"] == node.spec["bgp"]
    node.spec.pop("bgp")
    assert (
        "projectcalico.org/IPv4Address"
        not in codec.merge(merged, ResourceKey("Node", "n1"), node)["metadata"]["annotations"]
    )

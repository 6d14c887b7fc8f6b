"""confd: the BGP view computed from a snapshot (Calico's peering rules) and the rendered
BIRD 2 configuration, every variant of which must pass BIRD's own parser (`bird -p`)."""

from __future__ import annotations

import ipaddress
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from calico_node.confd.bgp import bird_view, router_id_hash
from calico_node.confd.render import ConfigRejected, ConfigWriter, render
from calico_node.syncer import Snapshot
from libcalico.model import (
    BGPConfiguration,
    BGPPeer,
    BlockAffinity,
    BlockAffinityKey,
    IPPool,
    IPPoolSpec,
    Node,
    ObjectMeta,
)

BIRD = shutil.which("bird") or "/usr/sbin/bird"


def node(name: str, ip: str, labels: dict[str, str] | None = None, **bgp: Any) -> Node:
    return Node(ObjectMeta(name, labels or {}), {"bgp": {"ipv4Address": ip, **bgp}})


def pool(name: str, cidr: str, **spec: Any) -> IPPool:
    return IPPool(ObjectMeta(name), IPPoolSpec.from_json({"cidr": cidr, **spec}))


def snapshot(
    nodes: list[Node],
    pools: list[IPPool] | None = None,
    blocks: dict[tuple[str, str], str] | None = None,
    peers: dict[str, dict[str, Any]] | None = None,
    configs: dict[str, dict[str, Any]] | None = None,
) -> Snapshot:
    affinities = {
        BlockAffinityKey(host, ipaddress.ip_network(cidr)): BlockAffinity(state)
        for (host, cidr), state in (blocks or {}).items()
    }
    return Snapshot(
        nodes={n.metadata.name: n for n in nodes},
        pools={p.name: p for p in pools or [pool("default", "10.244.0.0/16")]},
        affinities=affinities,
        bgp_peers={k: BGPPeer(ObjectMeta(k), v) for k, v in (peers or {}).items()},
        bgp_configurations={
            k: BGPConfiguration(ObjectMeta(k), v) for k, v in (configs or {}).items()
        },
        in_sync=True,
    )


THREE = [node("a", "10.0.0.1/24"), node("b", "10.0.0.2/24"), node("c", "10.0.0.10/24")]
SEED_RR = [
    node("a", "192.168.10.26/24", {"route-reflector": "true"}, routeReflectorClusterID="1.1.1.1"),
    node("b", "192.168.10.27/24"),
    node("c", "192.168.10.28/24"),
]
SEED_PEER = {
    "peer-with-route-reflectors": {
        "nodeSelector": "all()",
        "peerSelector": 'route-reflector == "true"',
    }
}
SEED_CONFIG = {
    "default": {"logSeverityScreen": "Info", "nodeToNodeMeshEnabled": False, "asNumber": 63400}
}


def protocols(text: str) -> dict[str, str]:
    """protocol bgp NAME -> its body."""
    return dict(re.findall(r"protocol bgp (\S+) from bgp_template \{\n(.*?)\n\}", text, re.S))


def checked(tmp_path: Path, snap: Snapshot, name: str, router_id: str = "") -> dict[str, str]:
    """Render node `name`'s files and put them through `bird -p` (ConfigWriter)."""
    files = render(bird_view(snap, name, router_id))
    assert ConfigWriter(tmp_path / name, BIRD).write(files)
    return files


def test_full_mesh_passive_by_string_order(tmp_path: Path) -> None:
    files = checked(tmp_path, snapshot(THREE, blocks={("a", "10.244.1.0/26"): "confirmed"}), "a")
    peers = protocols(files["bird.cfg"])
    assert set(peers) == {"Mesh_10_0_0_2", "Mesh_10_0_0_10"}
    # "10.0.0.10" > "10.0.0.1" and "10.0.0.2" > "10.0.0.1" as strings: a is passive to both.
    assert all("passive on;" in body for body in peers.values())
    assert "neighbor 10.0.0.2 as 64512;" in peers["Mesh_10_0_0_2"]
    assert "source address 10.0.0.1;" in peers["Mesh_10_0_0_2"]
    assert "calico_export_to_bgp_peers(true)" in peers["Mesh_10_0_0_2"]
    assert "# Skipping ourselves (10.0.0.1)" in files["bird.cfg"]
    assert "router id 10.0.0.1;" in files["bird.cfg"]
    assert "local as 64512;" in files["bird.cfg"]
    c = protocols(checked(tmp_path, snapshot(THREE), "c")["bird.cfg"])
    # "10.0.0.2" > "10.0.0.10" lexicographically, so c is passive to b but not to a.
    assert "passive on;" in c["Mesh_10_0_0_2"] and "passive on;" not in c["Mesh_10_0_0_1"]


def test_blocks_blackholed_and_aggregated(tmp_path: Path) -> None:
    blocks = {
        ("a", "10.244.1.0/26"): "confirmed",
        ("a", "10.244.1.64/26"): "pending",
        ("b", "10.244.2.0/26"): "confirmed",
        ("a", "10.244.9.9/32"): "confirmed",
    }
    files = checked(tmp_path, snapshot(THREE, blocks=blocks), "a")
    aggr = files["bird_aggr.cfg"]
    assert "route 10.244.1.0/26 blackhole;" in aggr
    assert "10.244.1.64/26 blackhole" not in aggr  # pending: not yet (calico#6867)
    assert "10.244.2.0/26" not in aggr  # b's
    assert "10.244.9.9/32" not in aggr  # /32 blocks never blackholed
    assert "if ( net = 10.244.1.0/26 ) then { accept; }" in aggr
    assert "if ( net ~ 10.244.1.0/26 ) then { reject; }" in aggr
    empty = checked(tmp_path, snapshot(THREE), "c")["bird_aggr.cfg"]
    assert "# No IP blocks or static routes for this host." in empty


def test_pools_export_and_kernel_rules(tmp_path: Path) -> None:
    pools = [
        pool("plain", "10.244.0.0/16"),
        pool("vx", "10.245.0.0/16", vxlanMode="Always"),
        pool("quiet", "10.246.0.0/16", disableBGPExport=True),
    ]
    ipam = checked(tmp_path, snapshot(THREE, pools=pools), "a")["bird_ipam.cfg"]
    export = ipam[ipam.index("function calico_export_to_bgp_peers") :]
    assert "if ( net ~ 10.244.0.0/16 ) then { accept; }" in export
    assert "# Skip 10.246.0.0/16 as BGP export is disabled for it" in export
    assert "if ( net ~ 10.246.0.0/16 ) then { reject; }" in ipam  # reject_disabled_pools
    kernel = ipam[ipam.index("filter calico_kernel_programming") :]
    assert "source = RTS_DEVICE" in kernel  # BIRD 2 would program the underlay's own route
    assert re.search(r"net ~ 10\.245\.0\.0/16 \) then \{\n\s+# Don't program VXLAN routes", kernel)


def test_seed_route_reflector(tmp_path: Path) -> None:
    """calico-node.md §1.6a: the RR peers with every client (rr client), the clients only
    with the RR; the mesh is off everywhere; AS 63400."""
    snap = snapshot(SEED_RR, peers=SEED_PEER, configs=SEED_CONFIG)
    a = checked(tmp_path, snap, "a")["bird.cfg"]
    assert "# This node (a) is configured as a route reflector with cluster ID 1.1.1.1;" in a
    assert "# Node-to-node mesh disabled" in a
    assert "Mesh_" not in a and "local as 63400;" in a
    rr = protocols(a)
    assert set(rr) == {"Node_192_168_10_27", "Node_192_168_10_28"}
    for body in rr.values():
        assert "rr client;" in body and "rr cluster id 1.1.1.1;" in body
        assert "as 63400;" in body and "passive on" not in body
    b = checked(tmp_path, snap, "b")["bird.cfg"]
    assert "# Node-to-node mesh disabled" in b
    client = protocols(b)
    assert set(client) == {"Node_192_168_10_26"}
    assert "rr client" not in client["Node_192_168_10_26"]
    assert "source address 192.168.10.27;" in client["Node_192_168_10_26"]


def test_route_reflector_leaves_the_mesh_pair_by_pair(tmp_path: Path) -> None:
    """The seed's order: the RR's cluster ID first (still meshed: nobody is cut off), then
    the BGPPeer (the RR's mesh sessions become node-specific ones), then the mesh off."""
    labelled = snapshot(SEED_RR)
    a, b = (protocols(checked(tmp_path, labelled, n)["bird.cfg"]) for n in "ab")
    assert set(a) == {"Mesh_192_168_10_27", "Mesh_192_168_10_28"}
    assert not any("rr client" in body for body in a.values())
    assert set(b) == {"Mesh_192_168_10_26", "Mesh_192_168_10_28"}
    peered = snapshot(SEED_RR, peers=SEED_PEER)
    a_text, b_text = (checked(tmp_path / "peered", peered, n)["bird.cfg"] for n in "ab")
    a, b = protocols(a_text), protocols(b_text)
    assert set(a) == {"Node_192_168_10_27", "Node_192_168_10_28"}
    assert all("rr client;" in body for body in a.values())
    assert set(b) == {"Node_192_168_10_26", "Mesh_192_168_10_28"}
    assert "# Skipping 192.168.10.26 (a): peered through a BGPPeer" in b_text


def test_global_and_node_specific_peers(tmp_path: Path) -> None:
    nodes = [node("a", "10.0.0.1/24", {"rack": "r1"}), node("b", "10.0.0.2/24", {"rack": "r2"})]
    peers = {
        "tor": {"peerIP": "10.0.0.254", "asNumber": 65001},
        "rack1": {"nodeSelector": "rack == 'r1'", "peerIP": "10.0.1.1:1790", "asNumber": 64512,
                  "ttlSecurity": 2, "keepOriginalNextHop": True},
        "to-a": {"node": "b", "peerIP": "10.0.0.1", "sourceAddress": "None"},
    }  # fmt: skip
    snap = snapshot(nodes, peers=peers, configs={"default": {"nodeToNodeMeshEnabled": False}})
    a = protocols(checked(tmp_path, snap, "a")["bird.cfg"])
    assert "Global_10_0_0_254" in a
    tor = a["Global_10_0_0_254"]
    assert "neighbor 10.0.0.254 as 65001;" in tor
    assert "calico_export_to_bgp_peers(false)" in tor  # eBGP
    assert "ttl security off;" in tor and "multihop;" in tor
    rack = a["Node_10_0_1_1_port_1790"]
    assert "neighbor 10.0.1.1 port 1790 as 64512;" in rack
    assert "ttl security on;" in rack and "multihop 2;" in rack
    assert "next hop keep" not in rack  # only for eBGP
    # The reverse of `to-a`: a (on its remote side) peers back with b.
    assert "Node_10_0_0_2" in a
    assert "source address" not in a["Node_10_0_0_2"]  # sourceAddress: None carries over
    b = protocols(checked(tmp_path, snap, "b")["bird.cfg"])
    assert set(b) == {"Global_10_0_0_254", "Node_10_0_0_1"}  # b is not in rack r1
    meshed = protocols(checked(tmp_path, snapshot(nodes, peers=peers), "b")["bird.cfg"])
    assert "Node_10_0_0_1" in meshed and "Mesh_10_0_0_1" not in meshed  # one per address


def test_node_specific_settings(tmp_path: Path) -> None:
    nodes = [node("a", "10.0.0.1/24", asNumber=65010), node("b", "10.0.0.2/24")]
    configs = {
        "default": {"asNumber": 64600, "listenPort": 1790, "logSeverityScreen": "Debug"},
        "node.b": {"logSeverityScreen": "Warning", "listenPort": 1791},
    }
    snap = snapshot(nodes, configs=configs)
    a = checked(tmp_path, snap, "a")["bird.cfg"]
    assert "local port 1790 as 65010;" in a and "debug all;" in a
    assert "neighbor 10.0.0.2 port 1791 as 64600;" in protocols(a)["Mesh_10_0_0_2_port_1791"]
    b = checked(tmp_path, snap, "b")["bird.cfg"]
    assert "debug" not in b.split("template bgp")[1].split("}")[0]  # Warning: no debug
    assert "neighbor 10.0.0.1 port 1790 as 65010;" in b


def test_router_id_and_no_ipv4(tmp_path: Path) -> None:
    snap = snapshot([node("a", "10.0.0.1/24"), Node(ObjectMeta("v6only"), {"bgp": {}})])
    files = checked(tmp_path, snap, "v6only", router_id="hash")
    assert f"router id {router_id_hash('v6only')};" in files["bird.cfg"]
    assert "# IPv4 disabled on this node." in files["bird.cfg"]
    assert "protocol bgp" not in files["bird.cfg"]


def test_services_and_communities(tmp_path: Path) -> None:
    configs = {
        "default": {
            "serviceClusterIPs": [{"cidr": "10.96.0.0/12"}],
            "communities": [{"name": "mine", "value": "64512:100"}],
            "prefixAdvertisements": [{"cidr": "10.244.0.0/16", "communities": ["mine", "1:2:3"]}],
        }
    }
    files = checked(tmp_path, snapshot(THREE, configs=configs), "a")
    assert "route 10.96.0.0/12 blackhole;" in files["bird_aggr.cfg"]
    assert "if ( net ~ 10.96.0.0/12 ) then { reject; }" in files["bird_ipam.cfg"]
    assert "bgp_community.add((64512, 100));" in files["bird.cfg"]
    assert "bgp_large_community.add((1, 2, 3));" in files["bird.cfg"]


def test_writer_skips_unchanged_and_keeps_rejected_out(tmp_path: Path) -> None:
    writer = ConfigWriter(tmp_path / "config", BIRD)
    files = render(bird_view(snapshot(THREE), "a"))
    assert writer.write(files)
    assert not writer.write(files)  # same text: nothing written, no reload
    broken = dict(files, **{"bird_ipam.cfg": files["bird_ipam.cfg"] + "\nthis is not bird;\n"})
    with pytest.raises(ConfigRejected):
        writer.write(broken)
    assert writer.current("bird_ipam.cfg") == files["bird_ipam.cfg"]  # the old set stays
    assert {p.name for p in (tmp_path / "config").iterdir()} == set(files)  # no stage left

"""conf/'s calico-node files say what calico-node understands: every variable the DaemonSet
sets is one calico-node reads and accepts, its probes are calico-node's flags, the systemd
unit lets BIRD outlive a crashed daemon."""

from __future__ import annotations

from pathlib import Path

import yaml

from calico_node.config import NodeConfig
from calico_node.main import parse

CONF = Path(__file__).resolve().parents[2] / "conf"
KNOWN = {
    "DATASTORE_TYPE", "NODENAME", "CALICO_NETWORKING_BACKEND", "CLUSTER_TYPE", "IP",
    "IP_AUTODETECTION_METHOD", "CALICO_IPV4POOL_CIDR", "CALICO_IPV4POOL_IPIP",
    "CALICO_IPV4POOL_VXLAN", "FELIX_LOGSEVERITYSCREEN",
}  # fmt: skip


def daemonset() -> dict:
    return yaml.safe_load((CONF / "calico-node-daemonset.yaml").read_text())


def test_daemonset_environment_is_calico_nodes() -> None:
    container = daemonset()["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value", "node-a") for e in container["env"]}
    assert set(env) <= KNOWN, set(env) - KNOWN
    config = NodeConfig.from_env({**env, "KUBECONFIG": "/dev/null"})
    assert config.networking_backend == "bird" and config.datastore.type == "kubernetes"
    assert config.pools[0].encapsulation("IPIP") == "Never"


def test_daemonset_probes_are_calico_nodes_flags() -> None:
    container = daemonset()["spec"]["template"]["spec"]["containers"][0]
    live = container["livenessProbe"]["exec"]["command"]
    ready = container["readinessProbe"]["exec"]["command"]
    assert live[0].endswith("/calico-node") and ready[0].endswith("/calico-node")
    assert parse(live[1:])[0] == ["felix-live", "bird-live"]
    assert parse(ready[1:])[0] == ["felix-ready", "bird-ready"]


def test_rbac_lets_calico_node_watch_and_write_its_node() -> None:
    docs = list(yaml.safe_load_all((CONF / "calico-node-rbac.yaml").read_text()))
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    rules = {
        (g, r): set(rule["verbs"])
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert {"watch", "list"} <= rules[("", "nodes")]
    assert "update" in rules[("", "nodes/status")]
    for plural in ("bgppeers", "bgpconfigurations", "ipamblocks", "blockaffinities", "ippools"):
        assert "watch" in rules[("crd.projectcalico.org", plural)]


def test_systemd_unit_keeps_bird_across_a_crash() -> None:
    unit = (CONF / "calico-node.service").read_text()
    assert "ExecStart=/opt/cni/bin/calico-node\n" in unit
    assert "KillMode=process\n" in unit
    assert "bird2" in unit

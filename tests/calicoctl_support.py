"""What the calicoctl suites share: the built `calicoctl` (and real calicoctl v3.31.7 from
/work/shared/oracles) run as an operator runs them, the seed's documents, and the
walk through every command that runs unchanged on each datastore."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.harness import REPO, bin_dir

ORACLE = Path(
    os.environ.get("CALICO_ORACLE_DIR", REPO.parent / "shared" / "oracles" / "calico-v3.31.7")
)
ORACLE_CALICOCTL = ORACLE / "calicoctl"
_DATASTORE_ENV = (
    "DATASTORE_TYPE",
    "ETCD_ENDPOINTS",
    "KUBECONFIG",
    "LOCAL_DATASTORE_PATH",
    "CNI_COMMAND",
    "K8S_API_ENDPOINT",
)

# The seed's documents: the pool, the route reflector, the peering to it, the BGP settings.
SEED = """\
apiVersion: projectcalico.org/v3
kind: IPPool
metadata:
  name: default-ipv4-ippool
spec:
  cidr: 10.244.0.0/16
  blockSize: 26
  ipipMode: CrossSubnet
  natOutgoing: true
  nodeSelector: all()
  vxlanMode: Never
---
apiVersion: projectcalico.org/v3
kind: Node
metadata:
  name: node1
  labels:
    route-reflector: "true"
spec:
  bgp:
    ipv4Address: 192.168.10.26/24
    routeReflectorClusterID: 1.1.1.1
---
apiVersion: projectcalico.org/v3
kind: BGPPeer
metadata:
  name: peer-with-route-reflectors
spec:
  nodeSelector: all()
  peerSelector: route-reflector == 'true'
---
apiVersion: projectcalico.org/v3
kind: BGPConfiguration
metadata:
  name: default
spec:
  logSeverityScreen: Info
  nodeToNodeMeshEnabled: false
  asNumber: 63400
"""
SEED_TABLES = {
    ("get", "nodes", "-o", "wide"): (
        "NAME    ASN       IPV4               IPV6   \n"
        "node1   (63400)   192.168.10.26/24          \n\n"
    ),
    ("get", "BGPPeer"): (
        "NAME                         PEERIP   NODE    ASN   \n"
        "peer-with-route-reflectors            all()   0     \n\n"
    ),
    ("get", "bgpconfiguration"): (
        "NAME      LOGSEVERITY   MESHENABLED   ASNUMBER   \n"
        "default   Info          false         63400      \n\n"
    ),
    ("get", "ipPools", "-o", "wide"): (
        "NAME                  CIDR            NAT    IPIPMODE      VXLANMODE   DISABLED   "
        "DISABLEBGPEXPORT   SELECTOR   ASSIGNMENTMODE   \n"
        "default-ipv4-ippool   10.244.0.0/16   true   CrossSubnet   Never       false      "
        "false              all()      Automatic        \n\n"
    ),
}

# Policy and network sets: stored and validated, read back with Calico's defaults.
POLICY = """\
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: allow-tcp-6379
  namespace: default
spec:
  selector: role == 'database'
  ingress:
  - action: Allow
    protocol: TCP
    source:
      selector: role == 'frontend'
    destination:
      ports: [6379]
  egress:
  - action: Allow
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: deny-blue
spec:
  order: 10
  selector: color == 'blue'
  ingress:
  - action: Deny
---
apiVersion: projectcalico.org/v3
kind: NetworkSet
metadata:
  name: external-database
  namespace: default
  labels: {role: db}
spec:
  nets: [198.51.100.0/28, 203.0.113.0/24]
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkSet
metadata:
  name: a-name-for-the-set
  labels: {role: external-database}
spec:
  nets: [198.51.100.0/28]
---
apiVersion: projectcalico.org/v3
kind: FelixConfiguration
metadata:
  name: default
spec:
  logSeverityScreen: Info
  reportingInterval: 0s
---
apiVersion: projectcalico.org/v3
kind: KubeControllersConfiguration
metadata:
  name: default
spec:
  controllers:
    node:
      reconcilerPeriod: 5m0s
"""
POLICY_TABLES = {
    ("get", "networkpolicy", "-o", "wide"): (
        "NAME             TIER      ORDER   SELECTOR             \n"
        "allow-tcp-6379   default   <nil>   role == 'database'   \n\n"
    ),
    ("get", "gnp", "-o", "wide"): (
        "NAME        TIER      ORDER   SELECTOR          \n"
        "deny-blue   default   10      color == 'blue'   \n\n"
    ),
    ("get", "networksets", "-A", "-o", "wide"): (
        "NAMESPACE   NAME                NETS                             \n"
        "default     external-database   198.51.100.0/28,203.0.113.0/24   \n\n"
    ),
    ("get", "globalnetworksets", "-o", "wide"): (
        "NAME                 NETS              \na-name-for-the-set   198.51.100.0/28   \n\n"
    ),
    ("get", "felixconfigurations"): "NAME      \ndefault   \n\n",
    ("get", "kubecontrollersconfigurations"): "NAME      \ndefault   \n\n",
}


def run_tool(
    executable: Path, argv: tuple[str, ...], env: dict[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """One invocation with this environment's datastore settings replaced by `env`."""
    full = {k: v for k, v in os.environ.items() if k not in _DATASTORE_ENV}
    return subprocess.run(
        [str(executable), *argv],
        input=stdin,
        env={**full, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@dataclass
class Calicoctl:
    """The built calicoctl (or real calicoctl, `executable=ORACLE_CALICOCTL`) on one
    datastore; every run asserts no traceback and, with `ok`, success."""

    env: dict[str, str]
    executable: Path = field(default_factory=lambda: bin_dir() / "calicoctl")

    def __call__(self, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        result = run_tool(self.executable, argv, self.env, stdin)
        assert "Traceback" not in result.stderr, result.stderr
        return result

    def ok(self, *argv: str, stdin: str | None = None) -> str:
        result = self(*argv, stdin=stdin)
        assert result.returncode == 0, (argv, result.stdout, result.stderr)
        return result.stdout

    def doc(self, *argv: str) -> Any:
        return yaml.safe_load(self.ok(*argv, "-o", "yaml"))

    def fails(self, *argv: str, stdin: str | None = None) -> str:
        """The one line a refused command prints (asserted to be exactly one)."""
        result = self(*argv, stdin=stdin)
        assert result.returncode != 0, (argv, result.stdout)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        return lines[0]

    def oracle(self) -> Calicoctl:
        """Real calicoctl v3.31.7 on the same datastore."""
        if not ORACLE_CALICOCTL.is_file():
            raise AssertionError(f"real calicoctl missing at {ORACLE_CALICOCTL}")
        return Calicoctl(self.env, ORACLE_CALICOCTL)


def rows(table: str) -> list[list[str]]:
    """A `get` table's rows, each split into its cells."""
    return [line.split() for line in table.splitlines()[1:] if line.strip()]


def names(listing: dict[str, Any]) -> list[str]:
    return [item["metadata"]["name"] for item in listing.get("items") or []]


def without_server_fields(doc: dict[str, Any]) -> dict[str, Any]:
    """A resource without what differs between two reads (revisions), for comparison."""
    doc = json.loads(json.dumps(doc))
    doc.get("metadata", {}).pop("resourceVersion", None)
    for item in doc.get("items") or []:
        item["metadata"].pop("resourceVersion", None)
    return doc


def every_command(ctl: Calicoctl, tmp_path: Path, kdd: bool = False) -> None:
    """The seed, every resource command and the IPAM configuration on one datastore, with
    what an operator sees; `kdd`: the Kubernetes datastore, where the Node must exist."""
    # The seed's documents apply unchanged and read back as the seed shows them.
    assert ctl.ok("apply", "-f", "-", "--allow-version-mismatch", stdin=SEED) == (
        "Successfully applied 4 resource(s)\n"
    )
    for argv, table in SEED_TABLES.items():
        assert ctl.ok(*argv, "--allow-version-mismatch") == table, argv
    node = ctl.doc("get", "node", "node1")
    assert node["metadata"]["labels"]["route-reflector"] == "true"
    assert node["spec"]["bgp"] == {
        "ipv4Address": "192.168.10.26/24",
        "routeReflectorClusterID": "1.1.1.1",
    }
    assert node["metadata"]["uid"] and node["metadata"]["creationTimestamp"]
    pool = ctl.doc("get", "ippools", "default-ipv4-ippool")
    assert pool["spec"]["ipipMode"] == "CrossSubnet" and pool["spec"]["natOutgoing"] is True
    assert ctl.doc("get", "ipPools")["kind"] == "IPPoolList"
    peer = json.loads(ctl.ok("get", "bgppeers", "peer-with-route-reflectors", "-o", "json"))
    assert peer["spec"] == {"nodeSelector": "all()", "peerSelector": "route-reflector == 'true'"}
    info = ctl.doc("get", "clusterinformation", "default")
    assert info["spec"]["datastoreReady"] is True and len(info["spec"]["clusterGUID"]) == 32

    # create / replace / delete, label, patch
    extra_peer = (
        "apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {name: rack1-tor}\n"
        "spec: {peerIP: 192.168.10.1, asNumber: 64567, node: node1}\n"
    )
    assert ctl.ok("create", "-f", "-", stdin=extra_peer) == (
        "Successfully created 1 'BGPPeer' resource(s)\n"
    )
    assert ctl.fails("create", "-f", "-", stdin=extra_peer) == (
        "resource already exists: BGPPeer(rack1-tor)"
    )
    assert ctl.ok("replace", "-f", "-", stdin=extra_peer.replace("64567", "64568")) == (
        "Successfully replaced 1 'BGPPeer' resource(s)\n"
    )
    assert ["rack1-tor", "192.168.10.1", "node1", "64568"] in rows(ctl.ok("get", "bgpp"))
    assert ctl.ok("patch", "bgppeer", "rack1-tor", "-p", '{"spec":{"asNumber":64569}}') == (
        "Successfully patched 1 'BGPPeer' resource\n"
    )
    assert ctl.doc("get", "bgppeer", "rack1-tor")["spec"]["asNumber"] == 64569
    assert ctl.ok("label", "nodes", "node1", "rack=r1") == (
        "Successfully set label rack on nodes node1\n"
    )
    assert "key rack is already present" in ctl.fails("label", "nodes", "node1", "rack=r2")
    ctl.ok("label", "nodes", "node1", "rack=r2", "--overwrite")
    assert ctl.doc("get", "node", "node1")["metadata"]["labels"]["rack"] == "r2"
    assert ctl.ok("label", "nodes", "node1", "rack", "--remove") == (
        "Successfully removed label rack from nodes node1\n"
    )
    assert ctl.ok("delete", "bgppeer", "rack1-tor") == (
        "Successfully deleted 1 'BGPPeer' resource(s)\n"
    )
    assert ctl.fails("delete", "bgppeer", "rack1-tor").endswith(
        "resource does not exist: BGPPeer(rack1-tor) with error: <nil>"
    )

    # Policy and sets: stored, validated, read back with Calico's defaults and tables.
    assert ctl.ok("apply", "-f", "-", stdin=POLICY) == "Successfully applied 6 resource(s)\n"
    for argv, table in POLICY_TABLES.items():
        assert ctl.ok(*argv) == table, argv
    policy = ctl.doc("get", "networkpolicy", "allow-tcp-6379", "-n", "default")
    assert policy["spec"]["types"] == ["Ingress", "Egress"]
    assert policy["spec"]["tier"] == "default"
    assert policy["metadata"]["labels"] == {"projectcalico.org/tier": "default"}
    assert policy["spec"]["egress"] == [{"action": "Allow", "destination": {}, "source": {}}]
    felix = ctl.doc("get", "felixconfig", "default")["spec"]
    assert felix["reportingInterval"] == "0s" and felix["floatingIPs"] == "Disabled"
    assert ctl.ok("validate", "-f", "-", stdin=POLICY) == "Successfully validated 6 resource(s)\n"
    assert ctl.ok("delete", "-f", "-", stdin=POLICY.split("---\n")[2]) == (
        "Successfully deleted 1 'NetworkSet' resource(s)\n"
    )
    assert names(ctl.doc("get", "networksets", "-A")) == []

    # IPAM configuration
    assert ctl.ok("ipam", "configure", "--strictaffinity=true") == (
        "Successfully set StrictAffinity to: true\n"
    )
    assert "| StrictAffinity     | true  |" in ctl.ok("ipam", "show", "--show-configuration")
    ctl.ok("ipam", "configure", "--strictaffinity=false")
    assert "| IP Pool  | 10.244.0.0/16 |     65536 | 0 (0%)     | 65536 (100%) |" in ctl.ok(
        "ipam", "show"
    )
    assert ctl.ok("ipam", "show", "--ip", "10.244.0.9") == "10.244.0.9 is not assigned\n"
    assert "Check complete; found 0 problems." in ctl.ok("ipam", "check")
    assert "Client Version:" in ctl.ok("version")
    assert ctl.fails("node", "status") == "Calico process is not running."


def bad_input_changes_nothing(ctl: Calicoctl) -> None:
    """Schema and semantic violations, unknown kinds and malformed YAML: one line, a
    non-zero exit, and the datastore as it was."""
    before = ctl.ok("get", "ippools", "-o", "yaml")
    pool = "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: bad}\nspec: "
    cases = {
        pool + "{cidr: 10.99.0.0/16, blockSize: 33}": "spec.blockSize = '33'",
        pool + "{cidr: 10.99.0.0/16, ipipMode: Sometimes}": "spec.ipipMode = 'Sometimes'",
        pool + "{cidr: 10.99.0.0/16, ipipMode: Always, vxlanMode: Always}": "cannot both",
        pool + "{cidr: 10.244.8.0/24}": "overlaps with IPPool(default-ipv4-ippool)",
        pool + "{cidr: 10.99.0.0/16, natOutgoing: maybe}": "spec.natOutgoing",
        pool + "{cidr: 10.99.0.0/16, frob: 1}": "not recognized or is in the wrong location",
        "apiVersion: projectcalico.org/v3\nkind: Frob\nmetadata: {name: x}\n": (
            "unknown resource type (Frob)"
        ),
        "apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {name: p}\n"
        "spec: {peerIP: 10.0.0.1, peerSelector: all()}\n": "PeerIP field must be empty",
        "apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata: {name: default}\n"
        "spec: {asNumber: 4294967296}\n": "AS number must be between",
        "kind: [": "cannot parse stdin",
    }
    for text, wanted in cases.items():
        # A good document first: a refused one must keep it out too.
        good = pool.replace("name: bad", "name: good") + "{cidr: 10.98.0.0/16}\n---\n"
        assert wanted in ctl.fails("apply", "-f", "-", stdin=good + text), text
    assert ctl.ok("get", "ippools", "-o", "yaml") == before
    assert "not supported" in ctl.fails("get", "frobs")

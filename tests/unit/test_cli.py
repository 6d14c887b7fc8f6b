"""calicoctl in-process on a real SQLite file: IP pools, reservations, the IPAM
configuration, cluster information, `ipam`; the other kinds are in test_calicoctl.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from cni_plugin.datastore import require_ready
from cni_plugin.types import CNIError
from cni_plugin.workload import WorkloadID, write_endpoint
from ipam_plugin.engine import IPAM, AutoAssignRequest
from libcalico.datastore.base import KVPair
from libcalico.datastore.local import LocalDatastore
from libcalico.model import ClusterInformation, HandleKey, ObjectMeta, ResourceKey
from libcalico.version import VERSION
from tests.harness import REPO
from tests.unit.cli_support import Cli, cli, db

__all__ = ["cli", "db"]

# The seed's pool as shipped in conf/: it must apply unchanged.
SEED_POOL = (REPO / "conf" / "ippool-default.yaml").read_text()
SEED_SPEC = {
    "cidr": "10.244.0.0/16",
    "blockSize": 26,
    "ipipMode": "CrossSubnet",
    "natOutgoing": True,
    "nodeSelector": "all()",
    "vxlanMode": "Never",
}
NODE = "node1"


def write(tmp_path: Path, text: str, name: str = "res.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def pool_yaml(name: str = "default-ipv4-ippool", **spec: object) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "projectcalico.org/v3",
            "kind": "IPPool",
            "metadata": {"name": name},
            "spec": {**SEED_SPEC, **spec},
        }
    )


def pool_names(cli) -> list[str]:
    result = cli("get", "ippools", "-o", "json")
    assert result.code == 0, result
    return [item["metadata"]["name"] for item in json.loads(result.out)["items"]]


@pytest.fixture
def seeded(cli: Cli, tmp_path: Path) -> Cli:
    result = cli("apply", "-f", write(tmp_path, SEED_POOL, "seed.yaml"))
    assert result.code == 0, result
    return cli


@pytest.fixture
def store(db: str) -> Iterator[LocalDatastore]:
    with LocalDatastore(db) as datastore:
        yield datastore


def allocate(store: LocalDatastore, count: int, handle: str = "k8s-pod-network.c1") -> list[str]:
    """Addresses for a pod, and its WorkloadEndpoint, as calico and calico-ipam record them."""
    engine = IPAM(store)
    engine.ensure_node(NODE)
    pod = f"web-{handle.rsplit('.', 1)[-1]}"
    attrs = {"node": NODE, "pod": pod, "namespace": "default"}
    v4, _ = engine.auto_assign(AutoAssignRequest(handle, NODE, attrs, num_v4=count))
    assert len(v4.ips) == count
    wid = WorkloadID(NODE, "k8s", "default", pod, "eth0")
    write_endpoint(store, wid, handle, "cali0", "ee:ee:ee:ee:ee:ee", v4.ips, ["kns.default"])
    return [str(ip.ip) for ip in v4.ips]


# ------------------------------------------------------------------- ctl apply / get


def test_seed_pool_applies_unchanged_and_reads_back(cli: Cli, tmp_path: Path) -> None:
    result = cli("apply", "-f", write(tmp_path, SEED_POOL))
    assert (result.code, result.out) == (0, "Successfully applied 1 'IPPool' resource(s)\n")

    got = cli("get", "ippool", "default-ipv4-ippool", "-o", "yaml")
    doc = yaml.safe_load(got.out)
    assert doc["apiVersion"] == "projectcalico.org/v3"
    assert doc["kind"] == "IPPool"
    assert doc["metadata"]["name"] == "default-ipv4-ippool"
    assert {k: doc["spec"][k] for k in SEED_SPEC} == SEED_SPEC
    # Calico's defaults are filled in, as calicoctl shows them.
    assert doc["spec"]["allowedUses"] == ["Workload", "Tunnel"]


def test_output_of_get_applies_back_unchanged(seeded: Cli, tmp_path: Path) -> None:
    exported = seeded("get", "ippools", "-o", "yaml").out
    assert yaml.safe_load(exported)["kind"] == "IPPoolList"
    assert seeded("apply", "-f", write(tmp_path, exported, "export.yaml")).code == 0
    (before,) = yaml.safe_load(exported)["items"]
    (after,) = yaml.safe_load(seeded("get", "ippools", "-o", "yaml").out)["items"]
    assert after["spec"] == before["spec"]
    assert after["metadata"]["uid"] == before["metadata"]["uid"]


def test_get_tables_match_calicoctl(seeded: Cli) -> None:
    assert seeded("get", "ippools").out == (
        "NAME                  CIDR            SELECTOR   \n"
        "default-ipv4-ippool   10.244.0.0/16   all()      \n\n"
    )
    assert seeded("get", "ipp", "-o", "wide").out == (
        "NAME                  CIDR            NAT    IPIPMODE      VXLANMODE   DISABLED   "
        "DISABLEBGPEXPORT   SELECTOR   ASSIGNMENTMODE   \n"
        "default-ipv4-ippool   10.244.0.0/16   true   CrossSubnet   Never       false      "
        "false              all()      Automatic        \n\n"
    )


def test_get_missing_resource_fails(seeded: Cli) -> None:
    result = seeded("get", "ippool", "nope")
    assert result.code == 1
    assert result.err.strip() == "resource does not exist: IPPool(nope) with error: <nil>"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"cidr": "10.244.0.0/33"}, "spec.cidr"),
        ({"cidr": "10.244.0.1/16"}, "spec.cidr"),
        ({"blockSize": 33}, "spec.blockSize"),
        ({"blockSize": 8}, "spec.blockSize"),
        ({"blockSize": "big"}, "spec.blockSize"),
        ({"ipipMode": "Sometimes"}, "spec.ipipMode"),
        ({"vxlanMode": "Always"}, "spec.ipipMode"),  # with ipipMode CrossSubnet
        ({"natOutgoing": "yes please"}, "spec.natOutgoing"),
        ({"nodeSelector": "has("}, "spec.nodeSelector"),
        ({"allowedUses": ["Everything"]}, "spec.allowedUses"),
        ({"assignmentMode": "Sometimes"}, "spec.assignmentMode"),
        ({"natOutgoingg": True}, "spec.natOutgoingg"),
    ],
)
def test_invalid_pool_field_is_refused_by_name(
    cli: Cli,
    tmp_path: Path,
    change: dict[str, object],
    field: str,
) -> None:
    result = cli("apply", "-f", write(tmp_path, pool_yaml(**change)))
    assert result.code == 1
    assert field in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert pool_names(cli) == []


def test_invalid_name_is_refused(cli: Cli, tmp_path: Path) -> None:
    result = cli("apply", "-f", write(tmp_path, pool_yaml(name="Bad/Name")))
    assert result.code == 1
    assert "metadata.name" in result.err
    assert pool_names(cli) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            SEED_POOL.replace("projectcalico.org/v3", "crd.projectcalico.org/v1"),
            "unknown resource type (IPPool) and/or version (crd.projectcalico.org/v1)",
        ),
        (SEED_POOL.replace("kind: IPPool", "kind: IPPoool"), "unknown resource type (IPPoool)"),
        (SEED_POOL.replace("  cidr: 10.244.0.0/16", "  cidr: [10.244"), "cannot parse"),
        ("", "no resources found"),
        ("- just\n- a list\n", "not a mapping"),
    ],
)
def test_bad_documents_are_refused_and_nothing_is_written(
    cli: Cli,
    tmp_path: Path,
    text: str,
    message: str,
) -> None:
    result = cli("apply", "-f", write(tmp_path, text))
    assert result.code == 1
    assert message in result.err
    assert pool_names(cli) == []


def test_one_bad_document_keeps_all_others_out(cli: Cli, tmp_path: Path) -> None:
    text = pool_yaml("good", cidr="10.1.0.0/16") + "---\n" + pool_yaml("bad", blockSize=99)
    result = cli("apply", "-f", write(tmp_path, text))
    assert result.code == 1
    assert "document 2" in result.err and "spec.blockSize" in result.err
    assert pool_names(cli) == []


def test_multiple_documents_and_lists_apply(cli: Cli, tmp_path: Path) -> None:
    listing = {
        "apiVersion": "projectcalico.org/v3",
        "kind": "List",
        "items": [yaml.safe_load(pool_yaml("c", cidr="10.3.0.0/16"))],
    }
    text = (
        pool_yaml("a", cidr="10.1.0.0/16")
        + "---\n"
        + pool_yaml("b", cidr="10.2.0.0/16")
        + "---\n"
        + yaml.safe_dump(listing)
    )
    result = cli("apply", "-f", write(tmp_path, text))
    assert result.out == "Successfully applied 3 'IPPool' resource(s)\n"
    assert pool_names(cli) == ["a", "b", "c"]


def test_json_input_from_stdin(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    doc = yaml.safe_load(SEED_POOL)
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(doc)))
    assert cli("apply", "-f", "-").code == 0
    assert pool_names(cli) == ["default-ipv4-ippool"]


def test_overlapping_pool_is_refused(seeded: Cli, tmp_path: Path) -> None:
    result = seeded("apply", "-f", write(tmp_path, pool_yaml("inner", cidr="10.244.8.0/24")))
    assert result.code == 1
    assert "IPPool(inner) CIDR overlaps with IPPool(default-ipv4-ippool)" in result.err
    assert pool_names(seeded) == ["default-ipv4-ippool"]


def test_overlap_within_one_file_is_refused(cli: Cli, tmp_path: Path) -> None:
    text = pool_yaml("a", cidr="10.1.0.0/16") + "---\n" + pool_yaml("b", cidr="10.1.2.0/24")
    result = cli("apply", "-f", write(tmp_path, text))
    assert result.code == 1
    assert "overlaps" in result.err
    assert pool_names(cli) == []


def test_block_size_is_immutable(seeded: Cli, tmp_path: Path) -> None:
    result = seeded("apply", "-f", write(tmp_path, pool_yaml(blockSize=24)))
    assert result.code == 1
    assert "spec.blockSize" in result.err and "cannot be modified" in result.err
    doc = yaml.safe_load(seeded("get", "ippool", "default-ipv4-ippool", "-o", "yaml").out)
    assert doc["spec"]["blockSize"] == 26


def test_cidr_is_immutable(seeded: Cli, tmp_path: Path) -> None:
    result = seeded("apply", "-f", write(tmp_path, pool_yaml(cidr="10.245.0.0/16")))
    assert result.code == 1
    assert "spec.cidr" in result.err


def test_mutable_fields_update_and_keep_identity(seeded: Cli, tmp_path: Path) -> None:
    before = yaml.safe_load(seeded("get", "ippool", "default-ipv4-ippool", "-o", "yaml").out)
    result = seeded("apply", "-f", write(tmp_path, pool_yaml(natOutgoing=False)))
    assert result.code == 0, result
    after = yaml.safe_load(seeded("get", "ippool", "default-ipv4-ippool", "-o", "yaml").out)
    assert "natOutgoing" not in after["spec"]  # false is omitted, as Go's omitempty does
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert after["metadata"]["resourceVersion"] != before["metadata"]["resourceVersion"]


def test_stale_resource_version_is_refused(seeded: Cli, tmp_path: Path) -> None:
    exported = seeded("get", "ippool", "default-ipv4-ippool", "-o", "yaml").out
    assert seeded("apply", "-f", write(tmp_path, pool_yaml(natOutgoing=False))).code == 0
    result = seeded("apply", "-f", write(tmp_path, exported, "stale.yaml"))
    assert result.code == 1
    assert "has been modified" in result.err


def test_create_and_replace(seeded: Cli, tmp_path: Path) -> None:
    existing = write(tmp_path, SEED_POOL)
    assert seeded("create", "-f", existing).err.strip() == (
        "resource already exists: IPPool(default-ipv4-ippool)"
    )
    new = write(tmp_path, pool_yaml("new", cidr="10.9.0.0/16"), "new.yaml")
    assert seeded("replace", "-f", new).code == 1
    assert seeded("create", "-f", new).out == "Successfully created 1 'IPPool' resource(s)\n"
    assert seeded("replace", "-f", new).out == ("Successfully replaced 1 'IPPool' resource(s)\n")


# ------------------------------------------------------------ reservations, config


def test_ip_reservation_round_trip(cli: Cli, tmp_path: Path) -> None:
    text = (
        "apiVersion: projectcalico.org/v3\nkind: IPReservation\nmetadata:\n  name: infra\n"
        "spec:\n  reservedCIDRs: [10.244.0.0/28, 10.244.1.1]\n"
    )
    assert cli("apply", "-f", write(tmp_path, text)).code == 0
    assert cli("get", "ipreservations", "-o", "wide").out == (
        "NAME    CIDRS                      \ninfra   10.244.0.0/28,10.244.1.1   \n\n"
    )
    bad = text.replace("10.244.1.1", "not-an-ip").replace("infra", "bad")
    result = cli("apply", "-f", write(tmp_path, bad, "bad.yaml"))
    assert result.code == 1
    assert "spec.reservedCIDRs[1]" in result.err
    assert cli("get", "ipreservation", "bad").code == 1


def ipam_config_yaml(kind: str = "IPAMConfiguration", **spec: object) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "projectcalico.org/v3",
            "kind": kind,
            "metadata": {"name": "default"},
            "spec": spec,
        }
    )


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"strictAffinity": False, "autoAllocateBlocks": False}, "spec.autoAllocateBlocks"),
        ({"strictAffinity": False, "maxBlocksPerHost": 4}, "spec.maxBlocksPerHost"),
        ({"strictAffinity": True, "maxBlocksPerHost": -1}, "spec.maxBlocksPerHost"),
        ({"strictAffinity": "yes"}, "spec.strictAffinity"),
    ],
)
def test_ipam_config_rules(
    cli: Cli,
    tmp_path: Path,
    spec: dict[str, object],
    field: str,
) -> None:
    result = cli("apply", "-f", write(tmp_path, ipam_config_yaml(**spec)))
    assert result.code == 1
    assert field in result.err
    assert cli("get", "ipamconfigs").out == "NAME   STRICTAFFINITY   AUTOALLOCATEBLOCKS   \n\n"


def test_ipam_config_applies_under_either_kind_name(cli: Cli, tmp_path: Path) -> None:
    text = ipam_config_yaml("IPAMConfig", strictAffinity=True, maxBlocksPerHost=4)
    assert cli("apply", "-f", write(tmp_path, text)).out == (
        "Successfully applied 1 'IPAMConfiguration' resource(s)\n"
    )
    assert cli("ipam", "show", "--show-configuration").out == (
        "+--------------------+-------+\n"
        "|      PROPERTY      | VALUE |\n"
        "+--------------------+-------+\n"
        "| StrictAffinity     | true  |\n"
        "| AutoAllocateBlocks | true  |\n"
        "| MaxBlocksPerHost   |     4 |\n"
        "+--------------------+-------+\n"
    )
    wrong_name = text.replace("name: default", "name: other")
    result = cli("apply", "-f", write(tmp_path, wrong_name, "other.yaml"))
    assert result.code == 1 and "metadata.name" in result.err


def test_ipam_configure(cli: Cli) -> None:
    assert "| StrictAffinity     | false |" in cli("ipam", "show", "--show-configuration").out
    result = cli("ipam", "configure", "--strictaffinity=true")
    assert result.out == "Successfully set StrictAffinity to: true\n"
    assert "| StrictAffinity     | true  |" in cli("ipam", "show", "--show-configuration").out
    assert cli("ipam", "configure", "--max-blocks-per-host=2").code == 0
    refused = cli("ipam", "configure", "--strictaffinity=false")
    assert refused.code == 1 and "maxBlocksPerHost" in refused.err
    assert "| StrictAffinity     | true  |" in cli("ipam", "show", "--show-configuration").out


# ------------------------------------------------------------------ cluster information


def cluster_info_yaml(name: str = "default", **spec: object) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "projectcalico.org/v3",
            "kind": "ClusterInformation",
            "metadata": {"name": name},
            "spec": spec,
        }
    )


def datastore_ready(store: LocalDatastore) -> object:
    """What the calico plugin's ADD reads (cni_plugin/datastore.py `require_ready`)."""
    info = store.get(ResourceKey("ClusterInformation", "default")).value
    assert isinstance(info, ClusterInformation)
    return info.spec.get("datastoreReady")


def test_cluster_information_apply_marks_the_datastore_ready(
    cli: Cli, tmp_path: Path, store: LocalDatastore
) -> None:
    # calico/node marks the datastore not ready around an upgrade ...
    key = ResourceKey("ClusterInformation", "default")
    store.create(KVPair(key, ClusterInformation(ObjectMeta("default"), {"datastoreReady": False})))
    with pytest.raises(CNIError, match="not ready"):
        require_ready(store)

    # ... and the operator marks it ready again with the document from the docs.
    text = (
        "apiVersion: projectcalico.org/v3\nkind: ClusterInformation\n"
        "metadata: {name: default}\nspec: {datastoreReady: true}\n"
    )
    result = cli("apply", "-f", write(tmp_path, text))
    assert (result.code, result.out) == (
        0,
        "Successfully applied 1 'ClusterInformation' resource(s)\n",
    )
    assert datastore_ready(store) is True
    require_ready(store)  # ADD is accepted again


def test_cluster_information_get_in_every_format(cli: Cli, tmp_path: Path) -> None:
    assert cli("get", "clusterinformations").out == (
        "NAME   CLUSTERGUID   CLUSTERTYPE   CALICOVERSION   DATASTOREREADY   \n\n"
    )
    spec = {
        "clusterGUID": "7d4c8a7e0f2a4b8c9f1e2d3c4b5a6978",
        "clusterType": "k8s,bgp,kubeadm,kdd",
        "calicoVersion": VERSION,
        "datastoreReady": False,
    }
    assert cli("create", "-f", write(tmp_path, cluster_info_yaml(**spec))).code == 0
    table = (
        "NAME      CLUSTERGUID                        CLUSTERTYPE           CALICOVERSION   "
        "DATASTOREREADY   \n"
        "default   7d4c8a7e0f2a4b8c9f1e2d3c4b5a6978   k8s,bgp,kubeadm,kdd   v0.1.0          "
        "false            \n\n"
    )
    for alias in ("clusterinformation", "clusterinformations", "clusterinfo", "ClusterInfos"):
        assert cli("get", alias).out == table
    assert cli("get", "clusterinfo", "-o", "wide").out == table

    doc = yaml.safe_load(cli("get", "clusterinformation", "default", "-o", "yaml").out)
    assert (doc["apiVersion"], doc["kind"]) == ("projectcalico.org/v3", "ClusterInformation")
    assert doc["metadata"]["name"] == "default" and doc["metadata"]["uid"]
    assert doc["spec"] == spec
    listing = json.loads(cli("get", "clusterinformations", "-o", "json").out)
    assert listing["kind"] == "ClusterInformationList"
    assert [item["spec"] for item in listing["items"]] == [spec]

    # What `get -o yaml` prints applies back; apply replaces the spec, as calicoctl's does.
    exported = cli("get", "clusterinfo", "-o", "yaml").out
    assert cli("apply", "-f", write(tmp_path, exported, "export.yaml")).code == 0
    ready = cluster_info_yaml(datastoreReady=True, clusterGUID=None, clusterType="")
    assert cli("replace", "-f", write(tmp_path, ready, "ready.yaml")).code == 0
    after = yaml.safe_load(cli("get", "clusterinfo", "default", "-o", "yaml").out)
    assert after["spec"] == {"datastoreReady": True}  # null and "" are omitted, as Go omits
    assert after["metadata"]["uid"] == doc["metadata"]["uid"]


def test_cluster_information_unset_ready_shows_as_go_prints_it(cli: Cli, tmp_path: Path) -> None:
    text = cluster_info_yaml(calicoVersion=VERSION)
    assert cli("apply", "-f", write(tmp_path, text)).code == 0
    assert cli("get", "clusterinfo").out.splitlines()[1].split() == [
        "default",
        VERSION,
        "<nil>",
    ]


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (cluster_info_yaml("other", datastoreReady=True), "metadata.name"),
        (cluster_info_yaml(datastoreReady="yes"), "spec.datastoreReady"),
        (cluster_info_yaml(datastoreReady=1), "spec.datastoreReady"),
        (cluster_info_yaml(clusterGUID=42), "spec.clusterGUID"),
        (cluster_info_yaml(calicoVersion=["v3"]), "spec.calicoVersion"),
        (cluster_info_yaml(clusterType=True), "spec.clusterType"),
        (cluster_info_yaml(datastoreReadyy=True), "spec.datastoreReadyy"),
        (cluster_info_yaml(datastoreReady=True) + "status: {}\nextra: 1\n", "extra"),
    ],
)
def test_cluster_information_refusals_name_the_field(
    cli: Cli, tmp_path: Path, text: str, field: str
) -> None:
    result = cli("apply", "-f", write(tmp_path, text))
    assert result.code == 1
    assert field in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert cli("get", "clusterinfo", "-o", "json").out.count('"name"') == 0


def test_cluster_information_is_never_deleted(cli: Cli, tmp_path: Path) -> None:
    path = write(tmp_path, cluster_info_yaml(datastoreReady=True))
    assert cli("apply", "-f", path).code == 0
    for argv in (("clusterinformation", "default"), ("-f", path)):
        result = cli("delete", *argv)
        assert result.code == 1
        assert "not supported on ClusterInformation" in result.err
    assert "default" in cli("get", "clusterinfo").out


# ---------------------------------------------------------------------- ipam show


def test_ipam_show_counts_allocations(seeded: Cli, store: LocalDatastore) -> None:
    allocate(store, 3)
    assert seeded("ipam", "show").out == (
        "+----------+---------------+-----------+------------+--------------+\n"
        "| GROUPING |     CIDR      | IPS TOTAL | IPS IN USE |   IPS FREE   |\n"
        "+----------+---------------+-----------+------------+--------------+\n"
        "| IP Pool  | 10.244.0.0/16 |     65536 | 3 (0%)     | 65533 (100%) |\n"
        "+----------+---------------+-----------+------------+--------------+\n"
    )


def test_ipam_show_blocks_and_percentages(cli: Cli, tmp_path: Path, store: LocalDatastore) -> None:
    pool = pool_yaml("small", cidr="10.8.0.0/24", blockSize=26)
    assert cli("apply", "-f", write(tmp_path, pool)).code == 0
    ips = allocate(store, 80)  # one full block of 64 and 16 in a second
    assert len(ips) == 80
    out = cli("ipam", "show", "--show-blocks").out.splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out if line[0] == "|"]
    assert rows[1] == ["IP Pool", "10.8.0.0/24", "256", "80 (31%)", "176 (69%)"]
    blocks = sorted(rows[2:], key=lambda r: r[3])
    assert [r[0] for r in blocks] == ["Block", "Block"]
    assert [(r[2], r[3], r[4]) for r in blocks] == [
        ("64", "16 (25%)", "48 (75%)"),
        ("64", "64 (100%)", "0 (0%)"),
    ]


def test_ipam_show_ip(seeded: Cli, store: LocalDatastore) -> None:
    (ip,) = allocate(store, 1, handle="k8s-pod-network.abc")
    out = seeded("ipam", "show", "--ip", ip).out
    assert f"IP {ip} is in use" in out
    assert "Handle ID: k8s-pod-network.abc" in out
    assert "  pod: web-abc" in out and "  namespace: default" in out
    assert seeded("ipam", "show", "--ip", "10.244.200.1").out == "10.244.200.1 is not assigned\n"
    assert "in no IP pool" in seeded("ipam", "show", "--ip", "192.0.2.1").out
    assert seeded("ipam", "show", "--ip", "nonsense").code == 1


# --------------------------------------------------------------------- ipam check


def test_ipam_check_clean_then_corrupt_handle(seeded: Cli, store: LocalDatastore) -> None:
    allocate(store, 2, handle="k8s-pod-network.h1")
    clean = seeded("ipam", "check")
    assert clean.code == 0
    assert "Check complete; found 0 problems." in clean.out

    kvp = store.get(HandleKey("k8s-pod-network.h1"))
    (block,) = kvp.value.block
    kvp.value.block[block] = 5
    store.update(kvp)

    broken = seeded("ipam", "check")
    assert broken.code != 0
    assert f"handle k8s-pod-network.h1, block {block}: the handle records 5" in broken.out
    assert "found 1 problems" in broken.out


def test_ipam_check_matches_allocations_with_endpoints(
    seeded: Cli, store: LocalDatastore, tmp_path: Path
) -> None:
    """calicoctl's check: an address no endpoint uses is leaked, and the report says so."""
    (used,) = allocate(store, 1, handle="k8s-pod-network.h1")
    engine = IPAM(store)
    attrs = {"node": NODE, "pod": "gone", "namespace": "default"}
    v4, _ = engine.auto_assign(AutoAssignRequest("k8s-pod-network.gone", NODE, attrs, num_v4=1))
    leaked = str(v4.ips[0].ip)
    report_path = tmp_path / "report.json"
    result = seeded("ipam", "check", "--show-problem-ips", "-o", str(report_path))
    assert result.code == 1
    assert f"  {leaked} leaked" in result.out
    assert "Found 1 IPs that are allocated in IPAM but not actually in use." in result.out
    assert "Found 1 handles with no matching IPs (and 1 handles with matches)." not in result.out
    assert "Check complete; found 1 problems." in result.out
    report = json.loads(report_path.read_text())
    assert report["version"] == VERSION
    assert report["allocations"][used][0]["inUse"] is True
    assert report["allocations"][used][0]["owners"] == [
        f"Workload(default/{NODE}-k8s-web--h1-eth0)"
    ]
    entry = report["allocations"][leaked][0]
    assert (entry["inUse"], entry["handle"], entry["pod"]) == (
        False,
        "k8s-pod-network.gone",
        "gone",
    )
    assert report_path.stat().st_mode & 0o777 == 0o600


# ------------------------------------------------------------------- ipam release


def test_ipam_release_frees_the_ip_and_updates_the_handle(
    seeded: Cli, store: LocalDatastore
) -> None:
    first, second = allocate(store, 2, handle="k8s-pod-network.h2")
    result = seeded("ipam", "release", "--ip", first)
    assert result.out == f"Successfully released IP address {first}\n"
    assert "is not assigned" in seeded("ipam", "show", "--ip", first).out
    assert store.get(HandleKey("k8s-pod-network.h2")).value.block.popitem()[1] == 1
    # The endpoint still names the address: calicoctl's check calls that a problem.
    check = seeded("ipam", "check")
    assert check.code == 1
    assert (
        "Found 1 in-use IPs that are in active IP pools but have no corresponding IPAM "
        "allocation." in check.out
    )
    assert "1 (0%)" in seeded("ipam", "show").out
    again = seeded("ipam", "release", "--ip", first)
    assert again.code == 1
    assert again.err.strip() == f"IP address {first} is not assigned"
    assert f"IP {second} is in use" in seeded("ipam", "show", "--ip", second).out


# ------------------------------------------------------------------------ delete


def test_delete_pool_in_use_needs_force(seeded: Cli, store: LocalDatastore) -> None:
    allocate(store, 1)
    refused = seeded("delete", "ippool", "default-ipv4-ippool")
    assert refused.code == 1
    assert "1 address(es) in use" in refused.err and "--force" in refused.err
    assert pool_names(seeded) == ["default-ipv4-ippool"]
    forced = seeded("delete", "ippool", "default-ipv4-ippool", "--force")
    assert forced.out == "Successfully deleted 1 'IPPool' resource(s)\n"
    assert pool_names(seeded) == []


def test_delete_by_file(seeded: Cli, tmp_path: Path) -> None:
    result = seeded("delete", "-f", write(tmp_path, SEED_POOL))
    assert result.out == "Successfully deleted 1 'IPPool' resource(s)\n"
    assert pool_names(seeded) == []
    assert seeded("delete", "ippool", "default-ipv4-ippool").err.strip() == (
        "Failed to delete 'IPPool' resource: resource does not exist: "
        "IPPool(default-ipv4-ippool) with error: <nil>"
    )


# ------------------------------------------------------------- datastore, errors


def test_config_file_chooses_the_datastore(
    cli: Cli,
    tmp_path: Path,
) -> None:
    other = tmp_path / "other.db"
    netconf = write(tmp_path, json.dumps({"local_datastore_path": str(other)}), "conf.json")
    pool = write(tmp_path, SEED_POOL)
    assert cli("apply", "-f", pool, "--config", netconf).code == 0
    assert pool_names(cli) == []  # the environment's datastore is untouched
    api_config = write(
        tmp_path,
        "apiVersion: projectcalico.org/v3\nkind: CalicoAPIConfig\nmetadata: {}\n"
        f"spec:\n  datastoreType: local\n  localDatastorePath: {other}\n",
        "calicoctl.cfg",
    )
    assert "default-ipv4-ippool" in cli("get", "ippools", "-c", api_config).out


@pytest.mark.parametrize(
    "argv",
    [["frobnicate"], ["get", "-o", "tsv"], ["ipam", "show", "--bogus"], ["label", "node"]],
)
def test_usage_errors_are_one_line(cli: Cli, argv: list[str]) -> None:
    result = cli(*argv)
    assert result.code == 2
    assert len(result.err.strip().splitlines()) == 1
    assert result.err.startswith("calico")


def test_unknown_resource_type(cli: Cli) -> None:
    result = cli("get", "frobnications")
    assert result.code == 1
    assert result.err == "failed to get resources: resource type 'frobnications' is not supported\n"


def test_corrupt_datastore_is_one_clear_line(cli: Cli, db: str) -> None:
    Path(db).write_text("this is not sqlite")
    result = cli("ipam", "show")
    assert result.code == 1
    assert result.err.count("\n") == 1
    assert "corrupt" in result.err and db in result.err


def test_unusable_datastore_type(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATASTORE_TYPE", "zookeeper")
    result = cli("get", "ippools")
    assert result.code == 1
    assert "zookeeper" in result.err and result.err.count("\n") == 1


def test_version_still_works(cli: Cli) -> None:
    assert cli("version").out.startswith("Client Version:    v")
    assert cli("-v").code == 0

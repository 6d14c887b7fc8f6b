"""The resource kinds calicoctl knows: the names an operator may type for each, whether it
lives in a namespace, the CRD whose schema checks it, and the columns `get` prints.

Columns are Calico's `get` templates (calicoctl/resourcemgr/*.go) as functions of the v3
document, with Go's formatting of what they print (`<nil>` for an unset pointer, `1e+06`
for a float order, `-` where the template says so).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from calicoctl.errors import CommandError

Doc = dict[str, Any]


@dataclass(frozen=True)
class TableContext:
    """What a column may need beyond the resource: the cluster's AS number (Node's ASN)."""

    global_as: str = "64512"


Cell = Callable[[Doc, TableContext], str]


@dataclass(frozen=True)
class Column:
    header: str
    cell: Cell


@dataclass(frozen=True)
class Kind:
    """One kind of resource, as calicoctl presents it."""

    name: str
    aliases: tuple[str, ...]
    columns: tuple[Column, ...]
    wide: tuple[Column, ...] = ()
    namespaced: bool = False
    crd: str | None = None  # plural of the CRD in conf/crds whose schema validates it
    singleton: str | None = None  # the only name the kind allows
    read_only: str = ""  # why calicoctl never writes it, if it does not

    def table_columns(self, wide: bool, all_namespaces: bool) -> tuple[Column, ...]:
        columns = self.wide if wide and self.wide else self.columns
        if self.namespaced and all_namespaces:
            columns = (NAMESPACE, *columns)
        return columns


# ------------------------------------------------------------ Go's formatting


def go_bool(value: Any) -> str:
    return "true" if value else "false"


def go_pointer(value: Any) -> str:
    """A template printing a pointer field: its value, or `<nil>`."""
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return go_bool(value)
    if isinstance(value, float):
        return go_float(value)
    return str(value)


def go_float(value: float) -> str:
    """Go's %v of a float64: the shortest digits, exponent form from 1e+06 (or below 1e-04)."""
    if value == 0:
        return "0"
    sign, digits, exponent = Decimal(repr(float(value))).normalize().as_tuple()
    text = "".join(map(str, digits))
    count, point = len(text), len(text) + int(exponent)
    limit = count if 6 > count >= point else 6
    negative = "-" if sign else ""
    power = point - 1
    if power < -4 or power >= limit:
        mantissa = text[0] + ("." + text[1:] if count > 1 else "")
        return f"{negative}{mantissa}e{'-' if power < 0 else '+'}{abs(power):02d}"
    if point <= 0:
        return f"{negative}0.{'0' * -point}{text}"
    if point >= count:
        return negative + text + "0" * (point - count)
    return f"{negative}{text[:point]}.{text[point:]}"


def _join(values: Any) -> str:
    """calicoctl's `join`: a list joined by commas, a map as sorted k=v pairs."""
    if isinstance(values, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(values.items()))
    return ",".join(_nat(v) if isinstance(v, dict) else str(v) for v in values or [])


def _nat(value: Doc) -> str:
    return f"{value.get('internalIP', '')}:{value.get('externalIP', '')}"


def _truncated(text: str, limit: int = 80) -> str:
    """calicoctl's joinAndTruncate: at most `limit` characters, `...` marking a cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _spec(doc: Doc) -> Doc:
    return doc.get("spec") or {}


def _bgp(doc: Doc) -> Doc | None:
    return _spec(doc).get("bgp")


def spec_cell(name: str, default: str = "") -> Cell:
    return lambda doc, _: str(_spec(doc).get(name, default))


def bool_cell(name: str) -> Cell:
    return lambda doc, _: go_bool(_spec(doc).get(name))


def pointer_cell(name: str, unset: str = "<nil>") -> Cell:
    def cell(doc: Doc, _: TableContext) -> str:
        value = _spec(doc).get(name)
        return unset if value is None else go_pointer(value)

    return cell


def _node_asn(doc: Doc, ctx: TableContext) -> str:
    bgp = _bgp(doc)
    if bgp is None:
        return ""
    return str(bgp["asNumber"]) if bgp.get("asNumber") else f"({ctx.global_as})"


def _node_address(name: str) -> Cell:
    return lambda doc, _: str((_bgp(doc) or {}).get(name) or "")


def _peer_node(doc: Doc, _: TableContext) -> str:
    spec = _spec(doc)
    return spec.get("node") or spec.get("nodeSelector") or "(global)"


def _workload(doc: Doc, _: TableContext) -> str:
    spec = _spec(doc)
    return spec.get("workload") or spec.get("pod") or ""


NAME = Column("NAME", lambda doc, _: str(doc["metadata"]["name"]))
NAMESPACE = Column("NAMESPACE", lambda doc, _: str(doc["metadata"].get("namespace", "")))
SELECTOR = Column("SELECTOR", spec_cell("selector"))
TIER = Column("TIER", spec_cell("tier"))
ORDER = Column(
    "ORDER",
    lambda doc, _: "<nil>" if _spec(doc).get("order") is None else go_float(_spec(doc)["order"]),
)
NETS = Column("NETS", lambda doc, _: _truncated(_join(_spec(doc).get("nets"))))


KINDS: tuple[Kind, ...] = (
    Kind(
        "IPPool",
        ("ippool", "ippools", "ipp", "ipps", "pool", "pools"),
        (NAME, Column("CIDR", spec_cell("cidr")), Column("SELECTOR", spec_cell("nodeSelector"))),
        wide=(
            NAME,
            Column("CIDR", spec_cell("cidr")),
            Column("NAT", bool_cell("natOutgoing")),
            Column("IPIPMODE", spec_cell("ipipMode", "Never")),
            Column("VXLANMODE", spec_cell("vxlanMode", "Never")),
            Column("DISABLED", bool_cell("disabled")),
            Column("DISABLEBGPEXPORT", bool_cell("disableBGPExport")),
            Column("SELECTOR", spec_cell("nodeSelector")),
            Column("ASSIGNMENTMODE", spec_cell("assignmentMode")),
        ),
        crd="ippools",
    ),
    Kind(
        "IPReservation",
        ("ipreservation", "ipreservations"),
        (NAME,),
        wide=(NAME, Column("CIDRS", lambda doc, _: _join(_spec(doc).get("reservedCIDRs")))),
        crd="ipreservations",
    ),
    Kind(
        "Node",
        ("node", "nodes", "no", "nos"),
        (NAME,),
        wide=(
            NAME,
            Column("ASN", _node_asn),
            Column("IPV4", _node_address("ipv4Address")),
            Column("IPV6", _node_address("ipv6Address")),
        ),
    ),
    Kind(
        "BGPPeer",
        ("bgppeer", "bgppeers", "bgpp", "bgpps", "bp", "bps"),
        (
            NAME,
            Column("PEERIP", spec_cell("peerIP")),
            Column("NODE", _peer_node),
            Column("ASN", spec_cell("asNumber", "0")),
        ),
        crd="bgppeers",
    ),
    Kind(
        "BGPConfiguration",
        ("bgpconfiguration", "bgpconfigurations", "bgpconfig", "bgpconfigs"),
        (
            NAME,
            Column("LOGSEVERITY", spec_cell("logSeverityScreen")),
            Column("MESHENABLED", pointer_cell("nodeToNodeMeshEnabled", "-")),
            Column("ASNUMBER", pointer_cell("asNumber", "-")),
        ),
        crd="bgpconfigurations",
    ),
    Kind(
        "FelixConfiguration",
        ("felixconfiguration", "felixconfigurations", "felixconfig", "felixconfigs"),
        (NAME,),
        crd="felixconfigurations",
    ),
    Kind(
        "KubeControllersConfiguration",
        (
            "kubecontrollersconfiguration",
            "kubecontrollersconfigurations",
            "kubecontrollersconfig",
            "kubecontrollersconfigs",
        ),
        (NAME,),
        crd="kubecontrollersconfigurations",
        singleton="default",
    ),
    Kind(
        "ClusterInformation",
        ("clusterinformation", "clusterinformations", "clusterinfo", "clusterinfos"),
        (
            NAME,
            Column("CLUSTERGUID", spec_cell("clusterGUID")),
            Column("CLUSTERTYPE", spec_cell("clusterType")),
            Column("CALICOVERSION", spec_cell("calicoVersion")),
            Column("DATASTOREREADY", pointer_cell("datastoreReady")),
        ),
        crd="clusterinformations",
        singleton="default",
    ),
    Kind(
        "IPAMConfiguration",
        ("ipamconfiguration", "ipamconfigurations", "ipamconfig", "ipamconfigs"),
        (
            NAME,
            Column("STRICTAFFINITY", bool_cell("strictAffinity")),
            Column("AUTOALLOCATEBLOCKS", bool_cell("autoAllocateBlocks")),
        ),
        wide=(
            NAME,
            Column("STRICTAFFINITY", bool_cell("strictAffinity")),
            Column("AUTOALLOCATEBLOCKS", bool_cell("autoAllocateBlocks")),
            Column("MAXBLOCKSPERHOST", spec_cell("maxBlocksPerHost", "0")),
        ),
        crd="ipamconfigs",
        singleton="default",
    ),
    Kind(
        "NetworkPolicy",
        ("networkpolicy", "networkpolicies", "policy", "np", "policies", "pol", "pols"),
        (NAME, TIER),
        wide=(NAME, TIER, ORDER, SELECTOR),
        namespaced=True,
        crd="networkpolicies",
    ),
    Kind(
        "GlobalNetworkPolicy",
        ("globalnetworkpolicy", "globalnetworkpolicies", "gnp", "gnps"),
        (NAME, TIER),
        wide=(NAME, TIER, ORDER, SELECTOR),
        crd="globalnetworkpolicies",
    ),
    Kind(
        "NetworkSet",
        ("networkset", "networksets", "netsets"),
        (NAME,),
        wide=(NAME, NETS),
        namespaced=True,
        crd="networksets",
    ),
    Kind(
        "GlobalNetworkSet",
        ("globalnetworkset", "globalnetworksets"),
        (NAME,),
        wide=(NAME, NETS),
        crd="globalnetworksets",
    ),
    Kind(
        "Tier",
        ("tier", "tiers"),
        (NAME, ORDER),
        crd="tiers",
    ),
    Kind(
        "Profile",
        ("profile", "profiles", "pro", "pros"),
        (NAME,),
        wide=(NAME, Column("LABELS", lambda doc, _: _join(_spec(doc).get("labelsToApply")))),
        read_only="profiles are written by the CNI plugin or derived from Kubernetes",
    ),
    Kind(
        "WorkloadEndpoint",
        ("workloadendpoint", "workloadendpoints", "wep", "weps"),
        (
            Column("WORKLOAD", _workload),
            Column("NODE", spec_cell("node")),
            Column("NETWORKS", lambda doc, _: _join(_spec(doc).get("ipNetworks"))),
            Column("INTERFACE", spec_cell("interfaceName")),
        ),
        wide=(
            NAME,
            Column("WORKLOAD", _workload),
            Column("NODE", spec_cell("node")),
            Column("NETWORKS", lambda doc, _: _join(_spec(doc).get("ipNetworks"))),
            Column("INTERFACE", spec_cell("interfaceName")),
            Column("PROFILES", lambda doc, _: _join(_spec(doc).get("profiles"))),
            Column("NATS", lambda doc, _: _join(_spec(doc).get("ipNATs"))),
        ),
        namespaced=True,
        read_only="workload endpoints are written by the CNI plugin as pods start and stop",
    ),
)
_BY_NAME = {kind.name: kind for kind in KINDS}
_BY_ALIAS = {alias: kind for kind in KINDS for alias in kind.aliases}
# `kind:` of a document; IPAMConfig is the CRD's name for the IPAM configuration.
DOCUMENT_KINDS = {
    **{kind.name: kind for kind in KINDS},
    "IPAMConfig": _BY_NAME["IPAMConfiguration"],
}


def kind_named(name: str) -> Kind:
    return _BY_NAME[name]


def kind_for(text: str) -> Kind:
    """The kind an operator means by `ipPools`, `BGPPeer`, `bgpconfigs`, ... (any case)."""
    kind = _BY_ALIAS.get(text.lower())
    if kind is None:
        raise CommandError(f"resource type '{text}' is not supported")
    return kind

"""`calicoctl ipam check` and `ipam release --from-report`.

The check is calicoctl's: every allocation in the blocks is matched against what uses an
address (workload endpoints, the nodes' tunnel addresses), every handle against the
blocks' allocations; plus the structural checks of ipam_plugin/inspect.py (handle counts,
affinities, malformed blocks). Its report (`-o FILE`) has calicoctl's JSON layout, so a
release can be driven from reports of either tool; releasing from reports needs the data
store locked (`calicoctl datastore migrate lock`), as calicoctl requires, so that no
address is handed out between the report and the release.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from calicoctl.errors import CommandError
from ipam_plugin.inspect import ConsistencyReport, check_consistency
from libcalico.datastore.base import Conflict, Datastore, NotFound
from libcalico.model import (
    WINDOWS_RESERVED_HANDLE,
    AllocationBlock,
    BlockListOptions,
    HandleKey,
    HandleListOptions,
    ResourceKey,
    ResourceListOptions,
)
from libcalico.version import VERSION

TOP_NODES = 20


@dataclass
class Allocation:
    """An allocated address, and what was found using it (calicoctl's report entry)."""

    ip: str
    handle: str = ""
    sequence_number: int | None = None
    pod: str = ""
    namespace: str = ""
    node: str = ""
    type: str = ""
    creation_timestamp: str = ""
    in_use: bool = False
    borrowed: bool = False
    owners: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"ip": self.ip}
        optional = {
            "handle": self.handle,
            "sequenceNumber": self.sequence_number,
            "pod": self.pod,
            "namespace": self.namespace,
            "node": self.node,
            "type": self.type,
            "creationTimestamp": self.creation_timestamp,
        }
        doc.update({k: v for k, v in optional.items() if v not in ("", None)})
        doc["inUse"] = self.in_use
        if self.borrowed:
            doc["borrowed"] = True
        doc["owners"] = self.owners or None
        return doc


@dataclass
class CheckResult:
    text: str
    report: dict[str, Any]
    problems: int


def _attributes(block: AllocationBlock, ordinal: int) -> tuple[str | None, dict[str, str]]:
    attribute = block.attributes[block.allocations[ordinal]]
    return attribute.handle_id, attribute.secondary


def _in_use(store: Datastore) -> tuple[dict[str, list[str]], int, int]:
    """Address -> who uses it; and how many node and workload addresses were found."""
    users: dict[str, list[str]] = defaultdict(list)
    node_ips = workload_ips = 0
    for kvp in store.list(ResourceListOptions("Node")):
        node = kvp.value
        for address in node.tunnel_addresses():
            users[address].append(f"Node({node.metadata.name})")
            node_ips += 1
    for kvp in store.list(ResourceListOptions("WorkloadEndpoint")):
        endpoint = kvp.value
        owner = f"Workload({endpoint.metadata.namespace}/{endpoint.metadata.name})"
        for address in endpoint.addresses():
            users[address].append(owner)
            workload_ips += 1
    return users, node_ips, workload_ips


def _cluster_information(store: Datastore) -> tuple[dict[str, Any], str]:
    try:
        kvp = store.get(ResourceKey("ClusterInformation", "default"))
    except NotFound:
        return {}, ""
    return kvp.value.spec, str(kvp.revision or "")


def _structural(report: ConsistencyReport) -> list[tuple[str, list[str]]]:
    return [
        (
            "handles whose count disagrees with their blocks",
            [
                f"handle {m.handle_id}, block {m.block}: the handle records {m.recorded}, "
                f"the block holds {m.allocated}"
                for m in report.handle_mismatches
            ],
        ),
        (
            "block affinities that disagree with their blocks",
            [f"host {a.host}, block {a.cidr}: {a.problem}" for a in report.affinity_problems],
        ),
        ("malformed blocks", list(report.malformed_blocks)),
    ]


def run_check(store: Datastore, show_all: bool = False, show_problems: bool = False) -> CheckResult:
    show_problems = show_problems or show_all
    out = ["Checking IPAM for inconsistencies...", ""]
    info, info_revision = _cluster_information(store)
    allocations: dict[str, list[Allocation]] = defaultdict(list)
    by_node: dict[str, int] = defaultdict(int)
    used_handles: set[str] = set()
    reserved: list[str] = []

    out.append("Loading all IPAM blocks...")
    blocks = [kvp.value for kvp in store.list(BlockListOptions())]
    out.append(f"Found {len(blocks)} IPAM blocks.")
    count = 0
    for block in blocks:
        out.append(f" IPAM block {block.cidr} affinity={block.affinity or '<none>'}:")
        owner = (block.affinity or "").removeprefix("host:") if block.affinity else ""
        for ordinal in block.allocated_ordinals():
            count += 1
            ip = str(block.ip(ordinal))
            handle, attrs = _attributes(block, ordinal)
            entry = Allocation(ip, node=owner)
            if handle == WINDOWS_RESERVED_HANDLE:
                reserved.append(ip)
            elif handle:
                entry.handle = handle
                used_handles.add(handle)
            entry.node = attrs.get("node") or owner
            entry.pod, entry.namespace = attrs.get("pod", ""), attrs.get("namespace", "")
            entry.type, entry.creation_timestamp = attrs.get("type", ""), attrs.get("timestamp", "")
            entry.sequence_number = block.sequence_number_for_allocation.get(
                str(ordinal), block.sequence_number
            )
            entry.borrowed = entry.node != owner
            allocations[ip].append(entry)
            by_node[entry.node] += 1
            if show_all:
                extra = ",".join(f"{k}={v}" for k, v in sorted(attrs.items()))
                out.append(f"  {ip} allocated; attrs Main:{handle or '<none>'} Extra:{extra}")
    out += [f"IPAM blocks record {count} allocations.", ""]

    out.append("Loading all IPAM pools...")
    pools = [kvp.value for kvp in store.list(ResourceListOptions("IPPool"))]
    active = [pool for pool in pools if not pool.spec.disabled]
    out += [f"  {pool.spec.cidr}" for pool in active]
    out += [f"Found {len(active)} active IP pools.", ""]

    users, node_ips, workload_ips = _in_use(store)
    for ip in reserved:
        users[ip].append("Reserved for Windows")
    out += ["Loading all nodes.", f"Found {node_ips} node tunnel IPs.", ""]
    out += [
        "Loading all workload endpoints.",
        f"Found {workload_ips} workload IPs.",
        f"Workloads and nodes are using {len(users)} IPs.",
        "",
    ]
    for ip, owners in users.items():
        for entry in allocations.get(ip, []):
            entry.in_use, entry.owners = True, list(owners)

    out.append("Loading all handles")
    handles = {kvp.key.handle_id: kvp for kvp in store.list(HandleListOptions())}
    out.append(f"Looking for top (up to {TOP_NODES}) nodes by allocations...")
    ranked = sorted(by_node.items(), key=lambda item: -item[1])
    out += [f"  {node} has {n} allocations" for node, n in ranked[:TOP_NODES]]
    if ranked:
        median = sorted(n for _, n in ranked)[len(ranked) // 2]
        out.append(f"Node with most allocations has {ranked[0][1]}; median is {median}")
    out.append("")

    problems = 0
    leaked_ips = [ip for ip in allocations if ip not in users]
    out.append("Scanning for IPs that are allocated but not actually in use...")
    if show_problems:
        out += [f"  {ip} leaked" for ip in leaked_ips]
    out.append(f"Found {len(leaked_ips)} IPs that are allocated in IPAM but not actually in use.")
    problems += len(leaked_ips)

    out.append(
        "Scanning for IPs that are in use by a workload or node but not allocated in IPAM..."
    )
    outside, unallocated = [], []
    for ip, owners in users.items():
        if ip in allocations:
            continue
        in_pool = any(_contains(pool.spec.cidr, ip) for pool in active)
        (unallocated if in_pool else outside).append(ip)
        if show_problems:
            where = (
                "and in active IPAM pool but has no IPAM allocation"
                if in_pool
                else ("is not in any active IP pool")
            )
            out += [f"  {ip} in use by {owner} {where}." for owner in owners]
    out.append(f"Found {len(outside)} in-use IPs that are not in active IP pools.")
    out.append(
        f"Found {len(unallocated)} in-use IPs that are in active IP pools but have no "
        "corresponding IPAM allocation."
    )
    out.append("")
    problems += len(outside) + len(unallocated)

    out.append("Scanning for IPAM handles with no matching IPs...")
    leaked_handles = [kvp for handle, kvp in handles.items() if handle not in used_handles]
    if show_all:
        out += [f"  {kvp.key.handle_id} doesn't have any active IPs." for kvp in leaked_handles]
    out.append(
        f"Found {len(leaked_handles)} handles with no matching IPs (and "
        f"{len(handles) - len(leaked_handles)} handles with matches)."
    )
    problems += len(leaked_handles)
    out.append("Scanning for IPs with missing handle...")
    missing = sorted(h for h in used_handles if h not in handles)
    if show_problems:
        out += [f"  {handle} is in use in a block but doesn't exist." for handle in missing]
    out.append(
        f"Found {len(missing)} handles mentioned in blocks with no matching handle resource."
    )
    problems += len(missing)

    for title, items in _structural(check_consistency(store)):
        out.append(f"Found {len(items)} {title}.")
        out += [f"  {item}" for item in items]
        problems += len(items)
    out.append(f"Check complete; found {problems} problems.")

    report = {
        "version": VERSION,
        "clusterGUID": str(info.get("clusterGUID", "")),
        "datastoreLocked": info.get("datastoreReady") is False,
        "clusterInformationRevision": info_revision,
        "clusterType": str(info.get("clusterType", "")),
        "allocations": {ip: [a.to_json() for a in entries] for ip, entries in allocations.items()},
    }
    if leaked_handles:
        report["leakedHandles"] = [
            {"ID": kvp.key.handle_id, "UID": None, "Revision": kvp.revision}
            for kvp in leaked_handles
        ]
    return CheckResult("\n".join(out), report, problems)


def _contains(cidr: str, ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip) in ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return False


def write_report(path: str, report: dict[str, Any]) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(report, handle, indent=2)
    except OSError as err:
        raise CommandError(f"cannot write the report {path}: {err.strerror}") from err


def _load_report(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            report = json.load(handle)
    except OSError as err:
        raise CommandError(f"cannot read the report {path}: {err.strerror}") from err
    except ValueError as err:
        raise CommandError(f"the report {path} is not JSON: {err}") from err
    if not isinstance(report, dict) or not isinstance(report.get("allocations"), dict):
        raise CommandError(f"the report {path} is not an ipam check report")
    return report


def _leaked(reports: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """What every report calls leaked: addresses not in use, and handles with the same
    revision each time."""
    ips: dict[str, dict[str, Any]] | None = None
    handles: dict[str, str] | None = None
    for report in reports:
        found = {
            a["ip"]: a
            for entries in report["allocations"].values()
            for a in entries
            if not a.get("inUse")
        }
        ips = found if ips is None else {ip: a for ip, a in found.items() if ip in ips}
        leaked = {h["ID"]: str(h.get("Revision")) for h in report.get("leakedHandles") or []}
        handles = (
            leaked if handles is None else {h: r for h, r in leaked.items() if handles.get(h) == r}
        )
    return ips or {}, handles or {}


def _still_allocated(store: Datastore, entry: dict[str, Any]) -> bool:
    """The address is still held by the handle (and sequence) the report saw."""
    address = ipaddress.ip_address(entry["ip"])
    for kvp in store.list(BlockListOptions(address.version)):
        block = kvp.value
        if address not in block.cidr:
            continue
        ordinal = block.ordinal(address)
        if block.allocations[ordinal] is None:
            return False
        handle, _ = _attributes(block, ordinal)
        sequence = block.sequence_number_for_allocation.get(str(ordinal), block.sequence_number)
        wanted = entry.get("sequenceNumber")
        return (handle or "") == entry.get("handle", "") and wanted in (None, sequence)
    return False


def release_from_reports(store: Datastore, paths: list[str], force: bool) -> list[str]:
    from ipam_plugin.engine import IPAM

    info, revision = _cluster_information(store)
    reports = [_load_report(path) for path in paths]
    lines = []
    for path, report in zip(paths, reports, strict=True):
        if report.get("clusterGUID") != info.get("clusterGUID", ""):
            raise CommandError(
                f"cluster does not match the provided report ({path}): mismatched cluster GUID. "
                "Refusing to release"
            )
        if report.get("version") != VERSION:
            if not force:
                raise CommandError(
                    f"the provided report ({path}) was produced using a different version "
                    f"({report.get('version')}) of calicoctl. Refusing to release"
                )
            lines.append(
                "WARNING: Report was produced using a different version of calicoctl. "
                "Ignoring due to --force option"
            )
    if not any(r.get("clusterInformationRevision") == revision for r in reports):
        raise CommandError(
            "the provided reports are all stale - at least one should be up-to-date. Please "
            "generate a new report while the data store is locked and try again"
        )
    if info.get("datastoreReady") is not False:
        if not force:
            raise CommandError(
                "data store is not locked. Either lock the data store, or re-run with --force"
            )
        lines.append("WARNING: Data store is not locked. Ignoring due to --force option")
    ips, handles = _leaked(reports)
    if ips:
        lines.append(f"Releasing {len(ips)} old IPs...")
        current = [ip for ip, entry in ips.items() if _still_allocated(store, entry)]
        unreleased = IPAM(store).release_ips(current) if current else []
        lines.append(f"Released {len(current) - len(unreleased)} IPs successfully")
        gone = len(ips) - len(current) + len(unreleased)
        if gone:
            lines.append(
                f"{gone} addresses marked as leaked in the report had already been cleaned up."
            )
    else:
        lines.append("Report didn't contain any leaked IPs to clean up.")
    if handles:
        lines.append(f"Deleting {len(handles)} handles...")
        released = skipped = 0
        for handle_id, handle_revision in handles.items():
            try:
                kvp = store.get(HandleKey(handle_id))
                if str(kvp.revision) != handle_revision:
                    raise NotFound(handle_id)
                store.delete(kvp)
                released += 1
            except (NotFound, Conflict):
                skipped += 1
        lines.append(f"Released {released} handles; {skipped} skipped; 0 errors.")
    else:
        lines.append("Report didn't contain any handles to clean up.")
    return lines

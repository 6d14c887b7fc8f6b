"""`calico ipam`: calicoctl's show / check / release / configure over the IPAM data."""

from __future__ import annotations

import argparse
import ipaddress
import json
from dataclasses import asdict
from typing import TYPE_CHECKING

from calicoctl.datastore import open_datastore
from calicoctl.errors import CommandError
from ipam_plugin.inspect import ConsistencyReport, assignment
from libcalico.datastore.base import Datastore
from libcalico.model import (
    IPAddress,
    IPPool,
    ResourceListOptions,
)

if TYPE_CHECKING:
    from libcalico.workloads import Snapshot

USAGE_HEADERS = ["GROUPING", "CIDR", "IPS TOTAL", "IPS IN USE", "IPS FREE"]


def usage_row(grouping: str, cidr: str, in_use: int, total: int) -> list[str]:
    """One row of `ipam show`, formatted as calicoctl does (`%.5g (%.0f%%)`)."""
    free = total - in_use
    return [
        grouping,
        cidr,
        f"{float(total):.5g}",
        f"{float(in_use):.5g} ({100 * in_use / total:.0f}%)",
        f"{float(free):.5g} ({100 * free / total:.0f}%)",
    ]


def _usage_table(store: Datastore, show_blocks: bool) -> str:
    from calicoctl.tables import box_table
    from ipam_plugin.inspect import pool_usage

    rows = []
    for pool in pool_usage(store):
        rows.append(usage_row("IP Pool", pool.cidr, pool.in_use, pool.total))
        if show_blocks:
            blocks = sorted(pool.blocks, key=lambda b: ipaddress.ip_network(b.cidr))
            rows += [usage_row("Block", b.cidr, b.in_use, b.total) for b in blocks]
    return box_table(USAGE_HEADERS, rows)


def _configuration_table(store: Datastore) -> str:
    from calicoctl.tables import box_table
    from ipam_plugin.inspect import ipam_config

    config = ipam_config(store)
    rows = [
        ["StrictAffinity", str(config.strict_affinity).lower()],
        ["AutoAllocateBlocks", str(config.auto_allocate_blocks).lower()],
        ["MaxBlocksPerHost", str(config.max_blocks_per_host)],
    ]
    return box_table(["PROPERTY", "VALUE"], rows)


def describe_ip(store: Datastore, text: str) -> str:
    """`ipam show --ip`: whether the address is in use, and by which handle and workload."""
    address = _parse_ip(text)
    owner = assignment(store, str(address))
    if owner is None:
        pools: list[IPPool] = [kvp.value for kvp in store.list(ResourceListOptions("IPPool"))]
        in_pool = any(address in pool.network for pool in pools)
        return f"IP {address} is not currently assigned" + (
            "" if in_pool else " (and is in no IP pool)"
        )
    lines = [f"IP {address} is in use", f"Handle ID: {owner.handle_id}"]
    if owner.secondary:
        lines.append("Attributes:")
        lines += [f"  {key}: {value}" for key, value in sorted(owner.secondary.items())]
    else:
        lines.append("No attributes defined")
    return "\n".join(lines)


def _parse_ip(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise CommandError(f"{text!r} is not an IP address") from None


def _show(opts: argparse.Namespace) -> int:
    with open_datastore(opts.config) as store:
        if opts.ip:
            print(describe_ip(store, opts.ip))
        elif opts.show_configuration:
            print(_configuration_table(store), end="")
        else:
            print(_usage_table(store, opts.show_blocks), end="")
    return 0


def check_text(report: ConsistencyReport) -> str:
    """The human report of `ipam check`: each kind of problem, counted and itemised."""
    sections = [
        (
            "allocated IPs whose handle does not exist",
            [
                f"{leak.ip} in block {leak.block} (handle {leak.handle_id})"
                for leak in report.leaked
            ],
        ),
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
        (
            "IPs that are allocated in IPAM but not actually in use",
            [f"{u.allocation.describe()}: {u.reason}" for u in report.not_in_use],
        ),
    ]
    lines = ["Checking IPAM for inconsistencies...", ""]
    for title, items in sections:
        lines.append(f"Found {len(items)} {title}.")
        lines += [f"  {item}" for item in items]
    lines += ["", f"Check complete; found {report.problems} problems."]
    return "\n".join(lines)


def _check(opts: argparse.Namespace) -> int:
    from ipam_plugin.inspect import check_consistency

    with open_datastore(opts.config) as store:
        report = check_consistency(store, _workloads(store))
    if opts.output == "json":
        doc = {"ok": report.ok, "problems": report.problems, **asdict(report)}
        print(json.dumps(doc, indent=2))
    else:
        print(check_text(report))
    return 0 if report.ok else 1


def _workloads(store: Datastore) -> Snapshot | None:
    """The cluster's pods and nodes, on the Kubernetes datastore (elsewhere there is no
    orchestrator to ask)."""
    from libcalico.datastore.kubernetes import KubernetesDatastore
    from libcalico.workloads import KubernetesWorkloads

    if not isinstance(store, KubernetesDatastore):
        return None
    return KubernetesWorkloads(store.client).snapshot()


def _release(opts: argparse.Namespace) -> int:
    from ipam_plugin.engine import IPAM, IPAMError

    address = str(_parse_ip(opts.ip))
    with open_datastore(opts.config) as store:
        try:
            unallocated = IPAM(store).release_ips([address])
        except IPAMError as err:
            raise CommandError(f"cannot release {address}: {err}") from err
    if unallocated:
        raise CommandError(f"IP address {address} is not assigned")
    print(f"Successfully released IP address {address}")
    return 0


def _configure(opts: argparse.Namespace) -> int:
    from calicoctl.resources import IPAM_CONFIG_NAME, IPAMCONFIGURATION, IPAMConfiguration
    from calicoctl.store import ResourceClient, WriteMode
    from libcalico.model import IPAMConfig, ObjectMeta

    if opts.strictaffinity is None and opts.max_blocks_per_host is None:
        raise CommandError("give --strictaffinity=true|false and/or --max-blocks-per-host=N")
    with open_datastore(opts.config) as store:
        client = ResourceClient(store)
        stored = client.find(IPAMCONFIGURATION, IPAM_CONFIG_NAME)
        resource = (
            stored.resource
            if stored
            else IPAMConfiguration(ObjectMeta(IPAM_CONFIG_NAME), IPAMConfig())
        )
        changes = []
        if opts.strictaffinity is not None:
            resource.config.strict_affinity = opts.strictaffinity == "true"
            changes.append(f"StrictAffinity to: {opts.strictaffinity}")
        if opts.max_blocks_per_host is not None:
            resource.config.max_blocks_per_host = opts.max_blocks_per_host
            changes.append(f"MaxBlocksPerHost to: {opts.max_blocks_per_host}")
        client.write([resource], WriteMode.APPLY)
    for change in changes:
        print(f"Successfully set {change}")
    return 0


def register(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    """Add `ipam`'s subcommands; each leaf sets `handler`."""
    sub = parser.add_subparsers(dest="ipam_command", metavar="COMMAND", required=True)

    show = sub.add_parser("show", parents=[common], help="IP usage per pool (and block)")
    show.add_argument("--show-blocks", action="store_true", help="add a row per block")
    show.add_argument(
        "--show-configuration", action="store_true", help="print the IPAM configuration"
    )
    show.add_argument("--ip", metavar="ADDR", help="who holds this address")
    show.set_defaults(handler=_show)

    check = sub.add_parser(
        "check", parents=[common], help="cross-check handles, blocks and affinities"
    )
    check.add_argument("-o", "--output", choices=("report", "json"), default="report")
    check.set_defaults(handler=_check)

    release = sub.add_parser("release", parents=[common], help="release one IP address")
    release.add_argument("--ip", metavar="ADDR", required=True)
    release.set_defaults(handler=_release)

    configure = sub.add_parser("configure", parents=[common], help="change the IPAM configuration")
    configure.add_argument("--strictaffinity", choices=("true", "false"))
    configure.add_argument("--max-blocks-per-host", type=int, metavar="N")
    configure.set_defaults(handler=_configure)

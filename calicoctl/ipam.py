"""`calicoctl ipam`: show / check / release / configure over the IPAM data."""

from __future__ import annotations

import argparse
import ipaddress

from calicoctl.config import open_datastore
from calicoctl.errors import CommandError
from ipam_plugin.inspect import assignment
from libcalico.datastore.base import Datastore
from libcalico.model import IPAddress, IPPool, ResourceListOptions

USAGE_HEADERS = ["GROUPING", "CIDR", "IPS TOTAL", "IPS IN USE", "IPS FREE"]
BORROWED_HEADERS = ["IP", "BORROWING-NODE", "BLOCK", "BLOCK OWNER", "TYPE", "ALLOCATED-TO"]


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
            # calicoctl lists a pool's blocks in the order of their CIDR strings.
            blocks = sorted(pool.blocks, key=lambda b: b.cidr)
            rows += [usage_row("Block", b.cidr, b.in_use, b.total) for b in blocks]
    return box_table(USAGE_HEADERS, rows)


def _borrowed_table(store: Datastore) -> str:
    """Addresses a node took from a block affine to another node (or to none)."""
    from calicoctl.tables import box_table
    from libcalico.model import BlockListOptions

    rows, unclassified = [], 0
    for kvp in store.list(BlockListOptions()):
        block = kvp.value
        owner = (block.affinity or "").removeprefix("host:")
        for ordinal in block.allocated_ordinals():
            attrs = block.attributes[block.allocations[ordinal]].secondary
            node = attrs.get("node")
            if node is None:
                unclassified += 1
                continue
            if node == owner:
                continue
            namespace = attrs.get("namespace", "")
            if "vmi" in attrs:
                kind, to = "vmi", f"{namespace}/{attrs['vmi']}"
            elif "pod" in attrs:
                kind, to = "pod", f"{namespace}/{attrs['pod']}"
            else:
                kind, to = attrs.get("type", ""), ""
            rows.append([str(block.ip(ordinal)), node, str(block.cidr), owner, kind, to])
    text = box_table(BORROWED_HEADERS, rows)
    if unclassified:
        text += (
            f"\nNote: found {unclassified} IP allocations without an explicit node association. "
            "Unable to determine if they are borrowed.\n"
        )
    return text


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
    address = parse_ip(text)
    owner = assignment(store, str(address))
    if owner is None:
        pools: list[IPPool] = [kvp.value for kvp in store.list(ResourceListOptions("IPPool"))]
        in_pool = any(address in pool.network for pool in pools)
        return f"{address} is not assigned" + ("" if in_pool else " (and is in no IP pool)")
    lines = [f"IP {address} is in use", f"Handle ID: {owner.handle_id or '<none>'}"]
    if owner.secondary:
        lines.append("Attributes:")
        lines += [f"  {key}: {value}" for key, value in sorted(owner.secondary.items())]
    else:
        lines.append("No attributes defined")
    return "\n".join(lines)


def parse_ip(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise CommandError(f"invalid IP address specified: {text}") from None


def _show(opts: argparse.Namespace) -> int:
    chosen = [opts.ip, opts.show_blocks, opts.show_borrowed, opts.show_configuration]
    if sum(bool(c) for c in chosen) > 1:
        raise CommandError(
            "give at most one of --ip, --show-blocks, --show-borrowed, --show-configuration"
        )
    with open_datastore(opts.config) as store:
        if opts.ip:
            print(describe_ip(store, opts.ip))
        elif opts.show_configuration:
            print(_configuration_table(store), end="")
        elif opts.show_borrowed:
            print(_borrowed_table(store), end="")
        else:
            print(_usage_table(store, opts.show_blocks), end="")
    return 0


def _check(opts: argparse.Namespace) -> int:
    from calicoctl.ipam_check import run_check, write_report

    with open_datastore(opts.config) as store:
        check = run_check(store, show_all=opts.show_all_ips, show_problems=opts.show_problem_ips)
    print(check.text)
    if opts.output:
        write_report(opts.output, check.report)
    return 0 if check.problems == 0 else 1


def _release(opts: argparse.Namespace) -> int:
    if bool(opts.ip) == bool(opts.from_report):
        raise CommandError("give --ip=IP, or --from-report=REPORT (one or more)")
    if opts.from_report:
        from calicoctl.ipam_check import release_from_reports

        with open_datastore(opts.config) as store:
            for line in release_from_reports(store, opts.from_report, opts.force):
                print(line)
        print("You may now unlock the data store.")
        return 0
    from ipam_plugin.engine import IPAM, IPAMError

    address = str(parse_ip(opts.ip))
    with open_datastore(opts.config) as store:
        try:
            unallocated = IPAM(store).release_ips([address])
        except IPAMError as err:
            raise CommandError(f"error: {err}") from err
    if unallocated:
        raise CommandError(f"IP address {address} is not assigned")
    print(f"Successfully released IP address {address}")
    return 0


def _configure(opts: argparse.Namespace) -> int:
    from calicoctl.kinds import kind_named
    from calicoctl.resources import IPAM_CONFIG_NAME, IPAMConfiguration
    from calicoctl.store import ResourceClient, WriteMode
    from libcalico.model import IPAMConfig, ObjectMeta

    if opts.strictaffinity is None and opts.max_blocks_per_host is None:
        raise CommandError("give --strictaffinity=true|false and/or --max-blocks-per-host=N")
    with open_datastore(opts.config) as store:
        client = ResourceClient(store)
        stored = client.find(kind_named("IPAMConfiguration"), IPAM_CONFIG_NAME)
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
            if opts.max_blocks_per_host < 0:
                raise CommandError("--max-blocks-per-host must not be negative")
            resource.config.max_blocks_per_host = opts.max_blocks_per_host
            changes.append(f"MaxBlocksPerHost to: {opts.max_blocks_per_host}")
        try:
            resource.validate()
        except ValueError as err:
            raise CommandError(f"error: {err}") from err
        client.write([resource], WriteMode.APPLY)
    for change in changes:
        print(f"Successfully set {change}")
    return 0


def register(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    """Add `ipam`'s subcommands; each leaf sets `handler`."""
    sub = parser.add_subparsers(dest="ipam_command", metavar="COMMAND")

    show = sub.add_parser("show", parents=[common], help="IP usage per pool (and block)")
    show.add_argument("--show-blocks", action="store_true", help="add a row per block")
    show.add_argument("--show-borrowed", action="store_true", help="addresses taken across nodes")
    show.add_argument(
        "--show-configuration", action="store_true", help="print the IPAM configuration"
    )
    show.add_argument("--ip", metavar="IP", help="whether this address is in use, and by whom")
    show.set_defaults(handler=_show)

    check = sub.add_parser(
        "check", parents=[common], help="cross-check blocks, handles, affinities and endpoints"
    )
    check.add_argument("-o", "--output", metavar="FILE", help="write a report for release")
    check.add_argument("--show-all-ips", action="store_true")
    check.add_argument("--show-problem-ips", action="store_true")
    check.add_argument("--kubeconfig", metavar="KUBECONFIG", help="accepted for calicoctl's sake")
    check.set_defaults(handler=_check)

    release = sub.add_parser("release", parents=[common], help="release addresses")
    release.add_argument("--ip", metavar="IP")
    release.add_argument("--from-report", metavar="REPORT", action="append", default=[])
    release.add_argument("--force", action="store_true")
    release.set_defaults(handler=_release)

    configure = sub.add_parser("configure", parents=[common], help="change the IPAM configuration")
    configure.add_argument("--strictaffinity", choices=("true", "false"))
    configure.add_argument("--max-blocks-per-host", type=int, metavar="N")
    configure.set_defaults(handler=_configure)

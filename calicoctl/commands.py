"""`calico ctl`: calicoctl's apply / create / replace / get / delete for IP pools,
IP reservations, the IPAM configuration and the cluster information."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from calicoctl.datastore import open_datastore
from calicoctl.errors import CommandError
from calicoctl.resources import (
    CLUSTERINFORMATION,
    IPAMCONFIGURATION,
    IPPOOL,
    IPRESERVATION,
    CtlResource,
    canonical_kind,
)
from calicoctl.store import ResourceClient, StoredResource, WriteMode
from libcalico.model import API_VERSION

OUTPUT_FORMATS = ("ps", "wide", "yaml", "json")


def _go_bool(value: bool) -> str:
    return "true" if value else "false"


def _go_bool_pointer(value: bool | None) -> str:
    """What Go's template prints for a *bool: its value, or `<nil>` when unset."""
    return "<nil>" if value is None else _go_bool(value)


@dataclass
class _Column:
    """One column of `ctl get`'s table; `wide_only` columns appear with `-o wide`."""

    header: str
    value: Callable[[Any], str]
    wide_only: bool = False


_NAME = _Column("NAME", lambda r: r.metadata.name)
_COLUMNS: dict[str, list[_Column]] = {
    IPPOOL: [
        _NAME,
        _Column("CIDR", lambda p: p.spec.cidr),
        _Column("NAT", lambda p: _go_bool(p.spec.nat_outgoing), wide_only=True),
        _Column("IPIPMODE", lambda p: p.spec.ipip_mode, wide_only=True),
        _Column("VXLANMODE", lambda p: p.spec.vxlan_mode, wide_only=True),
        _Column("DISABLED", lambda p: _go_bool(p.spec.disabled), wide_only=True),
        _Column("DISABLEBGPEXPORT", lambda p: _go_bool(p.spec.disable_bgp_export), True),
        _Column("SELECTOR", lambda p: p.spec.node_selector),
    ],
    IPRESERVATION: [_NAME, _Column("CIDRS", lambda r: ",".join(r.reserved_cidrs))],
    IPAMCONFIGURATION: [
        _NAME,
        _Column("STRICTAFFINITY", lambda c: _go_bool(c.config.strict_affinity)),
        _Column("MAXBLOCKSPERHOST", lambda c: str(c.config.max_blocks_per_host)),
        _Column("AUTOALLOCATEBLOCKS", lambda c: _go_bool(c.config.auto_allocate_blocks), True),
    ],
    CLUSTERINFORMATION: [
        _NAME,
        _Column("CLUSTERGUID", lambda i: str(i.spec.get("clusterGUID", ""))),
        _Column("CLUSTERTYPE", lambda i: str(i.spec.get("clusterType", ""))),
        _Column("CALICOVERSION", lambda i: str(i.spec.get("calicoVersion", ""))),
        _Column("DATASTOREREADY", lambda i: _go_bool_pointer(i.spec.get("datastoreReady"))),
    ],
}


def render(kind: str, found: list[StoredResource], output: str, single: bool) -> str:
    """calicoctl's output: a table, or the resource (one named) / a `<Kind>List`."""
    if output in ("yaml", "json"):
        from calicoctl.documents import dump_json, dump_yaml

        docs = [stored.to_json() for stored in found]
        doc = (
            docs[0] if single else {"apiVersion": API_VERSION, "kind": f"{kind}List", "items": docs}
        )
        return dump_yaml(doc) if output == "yaml" else dump_json(doc)
    from calicoctl.tables import column_table

    columns = [c for c in _COLUMNS[kind] if output == "wide" or not c.wide_only]
    rows = [[c.value(stored.resource) for c in columns] for stored in found]
    return column_table([c.header for c in columns], rows)


def _read_resources(path: str) -> list[CtlResource]:
    from calicoctl.documents import load_documents, source_name
    from calicoctl.resources import parse_resources

    return parse_resources(load_documents(path), source_name(path))


def success_message(past: str, kinds: list[str]) -> str:
    """`Successfully applied 2 'IPPool' resource(s)`, word for word as calicoctl says it."""
    if len(set(kinds)) == 1:
        return f"Successfully {past} {len(kinds)} '{kinds[0]}' resource(s)"
    return f"Successfully {past} {len(kinds)} resource(s)"


def _write(opts: argparse.Namespace, mode: WriteMode) -> int:
    resources = _read_resources(opts.filename)
    with open_datastore(opts.config) as store:
        ResourceClient(store).write(resources, mode)
    print(success_message(mode.past, [r.kind for r in resources]))
    return 0


def _get(opts: argparse.Namespace) -> int:
    kind = canonical_kind(opts.kind)
    with open_datastore(opts.config) as store:
        client = ResourceClient(store)
        found = [client.get(kind, opts.name)] if opts.name else client.list(kind)
    print(render(kind, found, opts.output, single=bool(opts.name)), end="")
    return 0


def _targets(opts: argparse.Namespace) -> list[tuple[str, str]]:
    if opts.filename:
        if opts.kind:
            raise CommandError("give either KIND NAME or -f FILE, not both")
        from calicoctl.documents import load_documents, source_name
        from calicoctl.resources import expand_lists, identity

        source = source_name(opts.filename)
        return [identity(doc, source) for doc in expand_lists(load_documents(opts.filename))]
    if not (opts.kind and opts.name):
        raise CommandError("delete needs KIND NAME or -f FILE")
    return [(canonical_kind(opts.kind), opts.name)]


def _delete(opts: argparse.Namespace) -> int:
    targets = _targets(opts)
    with open_datastore(opts.config) as store:
        client = ResourceClient(store)
        for done, (kind, name) in enumerate(targets):
            try:
                client.delete(kind, name, force=opts.force)
            except CommandError as err:
                if done:
                    raise CommandError(f"{err} ({done} resource(s) were deleted before)") from err
                raise
    print(success_message("deleted", [kind for kind, _ in targets]))
    return 0


def register(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    """Add `ctl`'s subcommands; each leaf sets `handler`."""
    sub = parser.add_subparsers(dest="ctl_command", metavar="COMMAND", required=True)
    descriptions = {
        WriteMode.APPLY: "create or update resources",
        WriteMode.CREATE: "create resources; refused if one exists",
        WriteMode.REPLACE: "update resources; refused if one does not exist",
    }
    for mode, description in descriptions.items():
        write = sub.add_parser(mode.value, parents=[common], help=description)
        write.add_argument("-f", "--filename", required=True, metavar="FILE", help="or - for stdin")
        write.set_defaults(handler=partial(_write, mode=mode))

    get = sub.add_parser("get", parents=[common], help="print resources")
    get.add_argument(
        "kind",
        metavar="KIND",
        help="ippools, ipreservations, ipamconfigs or clusterinformations",
    )
    get.add_argument("name", metavar="NAME", nargs="?")
    get.add_argument("-o", "--output", choices=OUTPUT_FORMATS, default="ps")
    get.set_defaults(handler=_get)

    delete = sub.add_parser("delete", parents=[common], help="delete resources")
    delete.add_argument("kind", metavar="KIND", nargs="?")
    delete.add_argument("name", metavar="NAME", nargs="?")
    delete.add_argument("-f", "--filename", metavar="FILE", help="delete what FILE describes")
    delete.add_argument(
        "--force",
        action="store_true",
        help="delete an IP pool even though addresses in it are still in use",
    )
    delete.set_defaults(handler=_delete)

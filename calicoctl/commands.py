"""calicoctl's resource commands: apply / create / replace / delete / get / patch / label /
validate, for every kind in `kinds`, with calicoctl's messages and output."""

from __future__ import annotations

import argparse
import json
from functools import partial
from typing import Any

from calicoctl.config import open_datastore
from calicoctl.errors import CommandError
from calicoctl.kinds import Kind, TableContext, kind_for, kind_named
from calicoctl.resources import (
    DEFAULT_NAMESPACE,
    CtlResource,
    failure,
    identity,
    parse_resources,
    resource_from_document,
)
from calicoctl.store import ResourceClient, StoredResource, WriteMode
from libcalico.model import API_VERSION, ValidationError

OUTPUT_FORMATS = ("ps", "wide", "yaml", "json")
_EXPORT_DROPS = ("uid", "resourceVersion", "creationTimestamp", "generation")


def success_message(past: str, kinds: list[str]) -> str:
    """`Successfully applied 2 'IPPool' resource(s)`, word for word as calicoctl says it."""
    if len(set(kinds)) == 1:
        return f"Successfully {past} {len(kinds)} '{kinds[0]}' resource(s)"
    return f"Successfully {past} {len(kinds)} resource(s)"


# ------------------------------------------------------------------- output


def _table_context(client: ResourceClient, kind: Kind) -> TableContext:
    """The cluster's AS number, which a Node without its own prints in parentheses."""
    if kind.name != "Node":
        return TableContext()
    found = client.find(kind_named("BGPConfiguration"), "default")
    asn = (found.resource.spec.get("asNumber") if found else None) or 64512
    return TableContext(global_as=str(asn))


def _list_revision(found: list[StoredResource]) -> str:
    revisions = [int(s.revision) for s in found if s.revision and s.revision.isdigit()]
    return str(max(revisions, default=0))


def render(
    kind: Kind,
    found: list[StoredResource],
    output: str,
    single: bool,
    ctx: TableContext,
    all_namespaces: bool = False,
    export: bool = False,
) -> str:
    """calicoctl's output: a table, or the resource (one named) / a `<Kind>List`."""
    if output in ("yaml", "json"):
        from calicoctl.documents import dump_json, dump_yaml

        docs = [stored.to_json() for stored in found]
        if export and single:
            for doc in docs:
                for name in _EXPORT_DROPS:
                    doc["metadata"].pop(name, None)
        doc: Any = (
            docs[0]
            if single and docs
            else {
                "kind": f"{kind.name}List",
                "apiVersion": API_VERSION,
                "metadata": {"resourceVersion": _list_revision(found)},
                "items": docs,
            }
        )
        return dump_yaml(doc) if output == "yaml" else dump_json(doc)
    from calicoctl.tables import column_table

    columns = kind.table_columns(output == "wide", all_namespaces)
    docs = [stored.to_json() for stored in found]
    rows = [[c.cell(doc, ctx) for c in columns] for doc in docs]
    return column_table([c.header for c in columns], rows)


# ------------------------------------------------------------------- writes


def _read_resources(opts: argparse.Namespace) -> list[CtlResource]:
    from calicoctl.documents import load_documents, source_name

    return parse_resources(
        load_documents(opts.filename), source_name(opts.filename), opts.namespace or ""
    )


def _write(opts: argparse.Namespace, mode: WriteMode) -> int:
    resources = _read_resources(opts)
    with open_datastore(opts.config) as store:
        ResourceClient(store).write(resources, mode)
    print(success_message(mode.past, [r.kind for r in resources]))
    return 0


def _validate(opts: argparse.Namespace) -> int:
    resources = _read_resources(opts)
    print(success_message("validated", [r.kind for r in resources]))
    return 0


# -------------------------------------------------------------------- reads


def _namespace(opts: argparse.Namespace, kind: Kind) -> str | None:
    """The namespace to look in: -n, else `default`; None with -A (every namespace)."""
    if not kind.namespaced:
        return ""
    if getattr(opts, "all_namespaces", False):
        return None
    return opts.namespace or DEFAULT_NAMESPACE


def _targets(opts: argparse.Namespace) -> list[tuple[Kind, str, str]]:
    """(kind, name, namespace) named by `KIND NAME...` or by the documents of -f."""
    if opts.filename:
        if opts.kind:
            raise CommandError("give either KIND [NAME...] or -f FILE, not both")
        from calicoctl.documents import load_documents, source_name
        from calicoctl.resources import expand_lists

        source = source_name(opts.filename)
        docs = expand_lists(load_documents(opts.filename))
        return [identity(doc, source, opts.namespace or "") for doc in docs]
    if not opts.kind:
        raise CommandError("give KIND [NAME...] or -f FILE")
    kind = kind_for(opts.kind)
    namespace = _namespace(opts, kind) or ""
    return [(kind, name, namespace) for name in opts.names]


def _get(opts: argparse.Namespace) -> int:
    try:
        targets = _targets(opts)
    except CommandError as err:
        raise CommandError(f"failed to get resources: {err}") from err
    with open_datastore(opts.config) as store:
        client = ResourceClient(store)
        if targets:
            kind = targets[0][0]
            if any(t[0] is not kind for t in targets):
                raise CommandError("get -f takes documents of one kind at a time")
            found = [client.get(k, name, ns) for k, name, ns in targets]
        else:
            kind = kind_for(opts.kind)
            found = client.list(kind, _namespace(opts, kind))
        ctx = _table_context(client, kind)
    single = len(targets) == 1
    all_namespaces = kind.namespaced and getattr(opts, "all_namespaces", False)
    print(render(kind, found, opts.output, single, ctx, all_namespaces, opts.export), end="")
    return 0


def _delete(opts: argparse.Namespace) -> int:
    targets = _targets(opts)
    if not targets:
        raise CommandError("delete needs KIND NAME... or -f FILE")
    deleted = []
    with open_datastore(opts.config) as store:
        client = ResourceClient(store)
        for kind, name, namespace in targets:
            try:
                client.delete(kind, name, namespace, force=opts.force)
            except CommandError as err:
                if opts.skip_not_exists and str(err).startswith("resource does not exist"):
                    deleted.append(kind.name)
                    continue
                done = f" ({len(deleted)} resource(s) were deleted before)" if deleted else ""
                raise CommandError(f"Failed to delete '{kind.name}' resource: {err}{done}") from err
            deleted.append(kind.name)
    print(success_message("deleted", deleted))
    return 0


# ------------------------------------------------------- read-modify-write


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 merge patch (what a strategic merge patch is for Calico's types): objects
    merge key by key, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out


def _rewrite(opts: argparse.Namespace, change: Any) -> str:
    """Read one resource, change its document, check and write it back (compare-and-swap
    on the revision read); returns the kind's name."""
    kind = kind_for(opts.kind)
    namespace = _namespace(opts, kind) or ""
    with open_datastore(opts.config) as store:
        client = ResourceClient(store)
        stored = client.get(kind, opts.name, namespace)
        doc = change(stored.to_json())
        try:
            resource = resource_from_document(doc, namespace)
        except (CommandError, ValidationError) as err:
            raise CommandError(
                f"creating resource from patched data: {failure(err, kind.name)}"
            ) from err
        client.write([resource], WriteMode.REPLACE)
    return kind.name


def _patch(opts: argparse.Namespace) -> int:
    if opts.type == "json":
        raise CommandError("patch type json (RFC 6902) is not supported; use strategic or merge")
    try:
        patch = json.loads(opts.patch)
    except ValueError as err:
        raise CommandError(f"performing {opts.type} merge patch: invalid JSON document") from err
    if not isinstance(patch, dict):
        raise CommandError(f"performing {opts.type} merge patch: the patch must be a JSON object")
    name = _rewrite(opts, lambda doc: _merge_patch(doc, patch))
    print(f"Successfully patched 1 '{name}' resource")
    return 0


def _label(opts: argparse.Namespace) -> int:
    key, sep, value = opts.label.partition("=")
    if opts.remove == bool(sep) or not key:
        raise CommandError(f"invalid label {opts.label}: give key=value, or key with --remove")
    what = f"{opts.kind} {opts.name}"
    outcome = []

    def change(doc: dict[str, Any]) -> dict[str, Any]:
        labels = dict(doc["metadata"].get("labels") or {})
        if opts.remove:
            if key not in labels:
                raise CommandError(f"cannot remove label of {what}, key {key} does not exist")
            del labels[key]
            outcome.append(f"Successfully removed label {key} from {what}")
        elif key in labels and not opts.overwrite:
            raise CommandError(
                f"failed to update label of {what}, key {key} is already present. "
                "please use '--overwrite' to set a new value"
            )
        else:
            verb = "updated" if key in labels else "set"
            labels[key] = value
            outcome.append(f"Successfully {verb} label {key} on {what}")
        doc["metadata"]["labels"] = labels
        return doc

    _rewrite(opts, change)
    print(outcome[0])
    return 0


# --------------------------------------------------------------- the tree


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the resource commands to calicoctl's tree; each leaf sets `handler`."""

    def namespace_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-n", "--namespace", metavar="NS", help="namespace of the resource")

    descriptions = {
        WriteMode.CREATE: "create resources by file or stdin; refused if one exists",
        WriteMode.REPLACE: "replace resources by file or stdin; refused if one does not exist",
        WriteMode.APPLY: "create resources, or replace those that exist",
    }
    for mode, description in descriptions.items():
        write = sub.add_parser(mode.value, parents=[common], help=description)
        write.add_argument("-f", "--filename", required=True, metavar="FILE", help="or - for stdin")
        namespace_options(write)
        write.set_defaults(handler=partial(_write, mode=mode))

    validate = sub.add_parser("validate", parents=[common], help="check resources, write nothing")
    validate.add_argument("-f", "--filename", required=True, metavar="FILE", help="or - for stdin")
    namespace_options(validate)
    validate.set_defaults(handler=_validate)

    patch = sub.add_parser("patch", parents=[common], help="change fields of a resource")
    patch.add_argument("kind", metavar="KIND")
    patch.add_argument("name", metavar="NAME")
    patch.add_argument("-p", "--patch", required=True, metavar="PATCH", help="a JSON object")
    patch.add_argument("-t", "--type", choices=("strategic", "merge", "json"), default="strategic")
    namespace_options(patch)
    patch.set_defaults(handler=_patch)

    delete = sub.add_parser("delete", parents=[common], help="delete resources")
    delete.add_argument("kind", metavar="KIND", nargs="?")
    delete.add_argument("names", metavar="NAME", nargs="*")
    delete.add_argument("-f", "--filename", metavar="FILE", help="delete what FILE describes")
    delete.add_argument("--skip-not-exists", action="store_true")
    delete.add_argument(
        "--force",
        action="store_true",
        help="delete an IP pool even though addresses in it are still in use",
    )
    namespace_options(delete)
    delete.set_defaults(handler=_delete)

    get = sub.add_parser("get", parents=[common], help="print resources")
    get.add_argument("kind", metavar="KIND", nargs="?", help="ippools, nodes, bgppeers, ...")
    get.add_argument("names", metavar="NAME", nargs="*")
    get.add_argument("-f", "--filename", metavar="FILE", help="get what FILE describes")
    get.add_argument("-o", "--output", choices=OUTPUT_FORMATS, default="ps")
    get.add_argument("-A", "--all-namespaces", action="store_true")
    get.add_argument("--export", action="store_true", help="leave out uid, resourceVersion, ...")
    namespace_options(get)
    get.set_defaults(handler=_get)

    label = sub.add_parser("label", parents=[common], help="add, change or remove a label")
    label.add_argument("kind", metavar="KIND")
    label.add_argument("name", metavar="NAME")
    label.add_argument("label", metavar="KEY[=VALUE]")
    label.add_argument("--overwrite", action="store_true")
    label.add_argument("--remove", action="store_true")
    namespace_options(label)
    label.set_defaults(handler=_label)

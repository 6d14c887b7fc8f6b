"""The `calico-ipam` executable: Calico IP pools, or host-local style ranges.

Pool mode (no `subnet`/`ranges` in `ipam`) runs Calico's block IPAM on the configured
datastore under the node-wide lock. Range mode keeps host-local's on-disk format in
`dataDir`, so it can share a directory with the Go host-local plugin.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

from cni_plugin.datastore import settings_for, translate_errors
from cni_plugin.netconf import IPAMConf, NetConf, load_with_logging
from cni_plugin.skel import Request
from cni_plugin.types import (
    ERR_INTERNAL,
    ERR_INVALID_CONFIG,
    ERR_NOT_AVAILABLE,
    ERR_TRY_AGAIN_LATER,
    CNIError,
    IPConfig,
    Result,
    Route,
)
from ipam_plugin.attachment import Attachment
from ipam_plugin.lock import IPAMLockTimeout, ipam_lock
from libcalico.datastore.base import NotFound

if TYPE_CHECKING:
    from ipam_plugin.engine import IPAM, BlockHints
    from libcalico.datastore.config import DatastoreSettings

COMPONENT = "ipam"
# A node's hints are ~60 bytes a block: far below this even with thousands of blocks.
MAX_HINTS_BYTES = 4 * 1024 * 1024
log = logging.getLogger(COMPONENT)


def _load(req: Request) -> tuple[NetConf, IPAMConf]:
    conf = load_with_logging(req.config, COMPONENT)
    if conf.ipam is None:
        raise CNIError(
            ERR_INVALID_CONFIG, "invalid network config: ipam: missing IPAM configuration"
        )
    return conf, conf.ipam


def _settings(req: Request, conf: NetConf) -> DatastoreSettings:
    """The datastore as the calling plugin resolves it: netconf keys, else the caller's
    environment."""
    return settings_for(conf.raw, req.environ)


@contextmanager
def _engine(settings: DatastoreSettings, conf: NetConf, locked: bool = False) -> Iterator[IPAM]:
    """The engine on the datastore, holding the node's IPAM lock when `locked` (with the
    node's block hints, kept beside the lock); datastore failures come out as CNI errors."""
    from ipam_plugin.engine import IPAM

    lock = ipam_lock(conf.ipam_lock_file, conf.ipam_lock_timeout) if locked else nullcontext()
    hints_path = conf.ipam_lock_file + ".hints"
    hints = _node_hints(hints_path, _hint_scope(settings)) if locked else nullcontext(None)
    try:
        with translate_errors(), settings.open() as store, lock, hints as node_hints:
            yield IPAM(store, hints=node_hints)
    except IPAMLockTimeout as err:
        raise CNIError(ERR_TRY_AGAIN_LATER, str(err), err.holder) from err


def _hint_scope(settings: DatastoreSettings) -> str:
    """Which datastore the hints' revisions belong to (never a credential)."""
    if settings.type == "local":
        return f"local {settings.local_path}"
    if settings.type == "etcdv3":
        return f"etcdv3 {settings.etcd_endpoints}"
    kubernetes = settings.kube_conf.get("kubernetes") or {}
    return f"kubernetes {kubernetes.get('kubeconfig', '')} {kubernetes.get('k8s_api_root', '')}"


@contextmanager
def _node_hints(path: str, scope: str) -> Iterator[BlockHints]:
    """The node's block hints (engine.BlockHints), read after the IPAM lock is taken and
    written back before it is released. A missing, unreadable, oversized or foreign-owned
    file means no hints, and a failed write is only logged: hints save reads, they never
    decide an address."""
    from ipam_plugin.engine import BlockHints

    hints = BlockHints(scope)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            text = f.read(MAX_HINTS_BYTES + 1)
            if os.fstat(f.fileno()).st_uid == os.geteuid() and len(text) <= MAX_HINTS_BYTES:
                hints = BlockHints.from_json(json.loads(text), scope)
    except (OSError, ValueError):
        pass  # none yet, or not ours to trust
    try:
        yield hints
    finally:
        if hints.changed:
            _write_hints(path, hints)


def _write_hints(path: str, hints: BlockHints) -> None:
    """Replace the file atomically (0600, never through a planted link)."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(hints.to_json(), f, separators=(",", ":"))
        os.replace(tmp, path)
    except OSError as err:
        fields = {"path": path, "error": str(err)}
        log.warning("Could not save IPAM block hints", extra={"fields": fields})
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _is_range_mode(ipam: IPAMConf) -> bool:
    return bool(ipam.raw.get("subnet") or ipam.raw.get("ranges"))


def cmd_add(req: Request) -> Result:
    conf, ipam = _load(req)
    who = Attachment.of(req, conf)
    if _is_range_mode(ipam):
        from ipam_plugin import range_mode

        if ipam.uses_pod_cidr():
            conf = _with_pod_cidrs(req, conf)
        return range_mode.add(req, conf, who)
    return _pool_add(req, conf, ipam, who)


def _with_pod_cidrs(req: Request, conf: NetConf) -> NetConf:
    """usePodCidr / usePodCidrIPv6 replaced by the Kubernetes Node's spec.podCIDRs (only
    ADD needs the ranges: DEL, CHECK and GC find addresses by container ID)."""
    from cni_plugin import k8s

    assert conf.ipam is not None
    with translate_errors(), k8s.client_for(conf, req) as client:
        ipam = k8s.resolve_pod_cidrs(conf, client)
    return dataclasses.replace(conf, ipam=IPAMConf(conf.ipam.type, ipam))


def _pool_add(req: Request, conf: NetConf, ipam: IPAMConf, who: Attachment) -> Result:
    from ipam_plugin.engine import IPAMError

    settings = _settings(req, conf)
    requested_ip = req.args.get("IP", "")
    with _engine(settings, conf, locked=True) as engine:
        if settings.type != "kubernetes":
            # No calico/node creates the Node here; in Kubernetes it is the real Node.
            engine.ensure_node(who.node)
        try:
            if requested_ip:
                ips = _assign_specific(engine, requested_ip, who)
            else:
                ips = _auto_assign(engine, ipam, who)
        except IPAMError as err:
            raise CNIError(_ipam_error_code(err), str(err)) from err
    log.info("Calico CNI IPAM assigned addresses", extra={"fields": {"IPs": [str(i) for i in ips]}})
    return Result(
        ips=[IPConfig(address=ip) for ip in ips],
        routes=[Route(dst=ip.network) for ip in ips],
    )


def _ipam_error_code(err: Exception) -> int:
    """A request naming an unusable pool or address is a config error; CAS exhaustion is
    transient; the rest (exhaustion, block limit) keep Calico's internal-error code."""
    from ipam_plugin.engine import IPAMRequestError, IPAMRetriesExhausted

    if isinstance(err, IPAMRequestError):
        return ERR_INVALID_CONFIG
    if isinstance(err, IPAMRetriesExhausted):
        return ERR_TRY_AGAIN_LATER
    return ERR_INTERNAL


def _assign_specific(engine, requested: str, who: Attachment) -> list:
    """CNI_ARGS IP=<ip>[,<ip>]: exactly these addresses, or none of them."""
    from ipam_plugin.engine import IPAMError

    assigned = []
    try:
        for text in requested.split(","):
            try:
                ip = ipaddress.ip_address(text.strip())
            except ValueError:
                raise CNIError(ERR_INVALID_CONFIG, f"invalid IP format: {text}") from None
            assigned.append(engine.assign_ip(str(ip), who.handle_id, who.attrs(), who.node))
    except (IPAMError, CNIError):
        if assigned:
            engine.release_ips([str(i.ip) for i in assigned])
        raise
    return assigned


def _requested_counts(ipam: IPAMConf) -> tuple[int, int]:
    """IPv4 unless assign_ipv4 is exactly "false"; IPv6 only if assign_ipv6 is exactly "true"."""
    num_v4 = 0 if ipam.raw.get("assign_ipv4") == "false" else 1
    num_v6 = 1 if ipam.raw.get("assign_ipv6") == "true" else 0
    return num_v4, num_v6


def _auto_assign(engine, ipam: IPAMConf, who: Attachment) -> list:
    from ipam_plugin.engine import AutoAssignRequest

    num_v4, num_v6 = _requested_counts(ipam)
    log.info("Calico CNI IPAM request count", extra={"fields": {"IPv4": num_v4, "IPv6": num_v6}})
    v4, v6 = engine.auto_assign(
        AutoAssignRequest(
            handle_id=who.handle_id,
            hostname=who.node,
            attrs=who.attrs(),
            num_v4=num_v4,
            num_v6=num_v6,
            ipv4_pools=list(ipam.raw.get("ipv4_pools") or []),
            ipv6_pools=list(ipam.raw.get("ipv6_pools") or []),
        )
    )
    short = [(family, r) for family, r in ((4, v4), (6, v6)) if len(r.ips) < r.requested]
    if short:
        # The dual-stack half failure: give back what the other family got.
        taken = [str(i.ip) for r in (v4, v6) for i in r.ips]
        if taken:
            engine.release_ips(taken)
        family, result = short[0]
        raise CNIError(
            ERR_INTERNAL,
            f"failed to request IPv{family} addresses: {result.shortfall_message(family)}",
        )
    return v4.ips + v6.ips


def cmd_del(req: Request) -> None:
    conf, ipam = _load(req)
    who = Attachment.of(req, conf)
    if _is_range_mode(ipam):
        from ipam_plugin import range_mode

        range_mode.delete(conf, who)
        return
    with _engine(_settings(req, conf), conf, locked=True) as engine:
        for handle in (who.handle_id, who.workload_id):
            try:
                released = engine.release_by_handle(handle)
                log.info(
                    "Released address using handleID",
                    extra={"fields": {"HandleID": handle, "IPs": [str(ip) for ip in released]}},
                )
            except NotFound:
                log.info(
                    "Asked to release address but it doesn't exist. Ignoring",
                    extra={"fields": {"HandleID": handle}},
                )


def cmd_check(req: Request) -> None:
    """The handle (or host-local file) still holds every address prevResult names."""
    conf, ipam = _load(req)
    who = Attachment.of(req, conf)
    prev = conf.prev()
    if _is_range_mode(ipam):
        from ipam_plugin import range_mode

        held = range_mode.held(conf, who)
    else:
        with _engine(_settings(req, conf), conf) as engine:
            try:
                held = engine.ips_by_handle(who.handle_id)
            except NotFound:
                held = []
    if not held:
        raise CNIError(ERR_INTERNAL, f"calico-ipam: no addresses are allocated to {who.handle_id}")
    missing = [
        str(ipc.address.ip) for ipc in (prev.ips if prev else []) if ipc.address.ip not in held
    ]
    if missing:
        raise CNIError(
            ERR_INTERNAL, f"calico-ipam: {', '.join(missing)} not allocated to {who.handle_id}"
        )


def cmd_status(req: Request) -> None:
    """Ready when the datastore answers and a pool can serve this node."""
    conf, ipam = _load(req)
    if _is_range_mode(ipam):
        from ipam_plugin import range_mode

        range_mode.status(conf)
        return
    node = conf.resolve_nodename()
    try:
        with _engine(_settings(req, conf), conf) as engine:
            pools = [p for p in engine.pools() if p.is_enabled()]
    except CNIError as err:
        raise CNIError(ERR_NOT_AVAILABLE, err.msg, err.details) from err
    counts = _requested_counts(ipam)
    for family in (f for f, n in zip((4, 6), counts, strict=True) if n):
        if not any(p.network.version == family for p in pools):
            raise CNIError(
                ERR_NOT_AVAILABLE,
                f"no enabled IPv{family} pool for node {node}",
                "create one with `calico ctl apply -f <ippool.yaml>`",
            )


def _valid_attachments(conf: NetConf) -> set[tuple[str, str]]:
    """`cni.dev/valid-attachments` (or the spec-1.1.0 tag's `cni.dev/attachments`).

    No list at all (cnitool sends none after DELing every cached attachment) means none
    is valid.
    """
    raw = conf.raw.get("cni.dev/valid-attachments", conf.raw.get("cni.dev/attachments")) or []
    return {(str(a.get("containerID", "")), str(a.get("ifname", ""))) for a in raw}


def cmd_gc(req: Request) -> None:
    """Release every allocation of this network on this node whose attachment is gone."""
    conf, ipam = _load(req)
    valid = _valid_attachments(conf)
    if _is_range_mode(ipam):
        from ipam_plugin import range_mode

        range_mode.gc(conf, valid)
        return
    node = conf.resolve_nodename()
    prefix = f"{conf.name}."
    valid_ids = {container_id for container_id, _ in valid}
    with _engine(_settings(req, conf), conf, locked=True) as engine:
        for handle in engine.list_handles():
            if not handle.startswith(prefix) or handle[len(prefix) :] in valid_ids:
                continue
            if engine.attrs_for_handle(handle).get("node") != node:
                continue
            released = engine.release_by_handle(handle)
            log.info(
                "GC released a stale handle",
                extra={"fields": {"HandleID": handle, "IPs": [str(ip) for ip in released]}},
            )


HANDLERS = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "STATUS": cmd_status, "GC": cmd_gc}

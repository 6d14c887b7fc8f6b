"""calico-ipam with `subnet`/`ranges`: host-local's semantics and on-disk format."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from cni_plugin.netconf import NetConf
from cni_plugin.skel import Request
from cni_plugin.types import (
    ERR_INTERNAL,
    ERR_INVALID_CONFIG,
    ERR_NOT_AVAILABLE,
    ERR_TRY_AGAIN_LATER,
    CNIError,
    IPAddress,
    IPConfig,
    Result,
    Route,
    parse_result,
)
from ipam_plugin import ranges
from ipam_plugin.attachment import Attachment


@contextmanager
def _range_errors() -> Iterator[None]:
    try:
        yield
    except ranges.RangeConfigError as err:
        raise CNIError(ERR_INVALID_CONFIG, str(err)) from err
    except ranges.LockTimeout as err:
        raise CNIError(ERR_TRY_AGAIN_LATER, str(err)) from err
    except ranges.AllocationError as err:
        prefix = (
            f"failed to allocate for range {err.range_set_index}: "
            if (err.range_set_index is not None)
            else ""
        )
        raise CNIError(ERR_INTERNAL, prefix + str(err)) from err
    except ranges.RangeError as err:
        raise CNIError(ERR_INTERNAL, str(err)) from err


def _store(conf: NetConf) -> ranges.RangeStore:
    assert conf.ipam is not None
    return ranges.RangeStore(conf.ipam.raw.get("dataDir"), conf.name)


def _requested_ips(req: Request, conf: NetConf) -> list[str]:
    """host-local collects them from CNI_ARGS IP=, args.cni.ips and runtimeConfig.ips."""
    requested = [ip for ip in req.args.get("IP", "").split(",") if ip]
    requested += list(conf.raw.get("args", {}).get("cni", {}).get("ips") or [])
    requested += list(conf.runtime_config.get("ips") or [])
    return requested


def add(req: Request, conf: NetConf, who: Attachment) -> Result:
    assert conf.ipam is not None
    with _range_errors():
        range_sets = ranges.parse_ranges(
            conf.ipam.raw, conf.runtime_config.get("ipRanges"), conf.cni_version
        )
        allocations = ranges.allocate(
            _store(conf), range_sets, who.container_id, who.ifname, _requested_ips(req, conf)
        )
    routes = parse_result({"routes": conf.ipam.raw.get("routes") or []}, "1.0.0").routes
    return Result(
        ips=[IPConfig(address=a.address, gateway=a.gateway) for a in allocations],
        routes=[Route(dst=r.dst, gw=r.gw) for r in routes],
    )


def delete(conf: NetConf, who: Attachment) -> None:
    with _range_errors():
        ranges.release(_store(conf), who.container_id, who.ifname)


def held(conf: NetConf, who: Attachment) -> list[IPAddress]:
    with _range_errors():
        return ranges.find(_store(conf), who.container_id, who.ifname)


def status(conf: NetConf) -> None:
    with _range_errors():
        store = _store(conf)
    if not os.access(store.directory, os.W_OK):
        raise CNIError(ERR_NOT_AVAILABLE, f"IPAM data directory {store.directory} is not writable")


def gc(conf: NetConf, valid: set[tuple[str, str]]) -> None:
    with _range_errors():
        ranges.gc(_store(conf), valid)

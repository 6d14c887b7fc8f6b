"""The `calico` CNI plugin's verbs, in the style of the reference ptp plugin.

ADD: IPAM first, then the dataplane; anything failing after a successful IPAM ADD
releases the addresses again. DEL: IPAM release first (it needs no netns), then the pod
interface. CHECK, STATUS and GC are real (Calico's own plugin has none of them).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import time
from typing import TYPE_CHECKING, Any

from cni_plugin import ipam_exec, workload
from cni_plugin.datastore import require_ready, settings_for, translate_errors
from cni_plugin.netconf import NetConf, load_with_logging, pod_cidr_version, subnet_holders
from cni_plugin.skel import Request
from cni_plugin.types import (
    ERR_INVALID_CONFIG,
    ERR_NOT_AVAILABLE,
    CNIError,
    IPConfig,
    IPNetwork,
    Result,
    Route,
)
from cni_plugin.workload import WorkloadID

if TYPE_CHECKING:
    from cni_plugin import k8s
    from libcalico.datastore.base import Datastore
    from libcalico.datastore.config import DatastoreSettings
    from libcalico.datastore.k8s_client import KubeClient

COMPONENT = "cni-plugin"
DEFAULT_ROUTES = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))

log = logging.getLogger(COMPONENT)


def _load(req: Request) -> NetConf:
    return load_with_logging(req.config, COMPONENT)


def _fields(req: Request, **extra: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"ContainerID": req.container_id}
    if req.args.get("K8S_POD_NAME"):
        fields["Namespace"] = req.args.get("K8S_POD_NAMESPACE", "")
        fields["Pod"] = req.args["K8S_POD_NAME"]
    fields.update(extra)
    return fields


def _ipam_type(conf: NetConf) -> str:
    if conf.ipam is None:
        raise CNIError(
            ERR_INVALID_CONFIG, "invalid network config: ipam: missing IPAM configuration"
        )
    return conf.ipam.type


def pod_routes(conf: NetConf, families: set[int]) -> list[IPNetwork]:
    """host-local's custom `ipam.routes` (gateway ignored), else the default routes."""
    custom = [
        ipaddress.ip_network(r["dst"], strict=False)
        for r in (conf.ipam.raw.get("routes") or [] if conf.ipam else [])
    ]
    routes = custom if custom else list(DEFAULT_ROUTES)
    if custom and conf.include_default_routes:
        routes += [d for d in DEFAULT_ROUTES if d not in routes]
    return [r for r in routes if r.version in families]


def _narrow(ip: Any) -> Any:
    """Calico programs and reports every pod address as /32 or /128."""
    return ipaddress.ip_interface(f"{ip.ip}/{ip.max_prefixlen}")


def _endpoint_store(settings: DatastoreSettings, conf: NetConf) -> Datastore | None:
    """The datastore the plugin records endpoints in: etcd, as real Calico does, and the
    local one (etcd's layout in SQLite) when it holds the pod's IPAM data too, so that
    `calicoctl ipam check` can match addresses with endpoints and a migration carries
    them. In the Kubernetes datastore the Pod is the endpoint."""
    local = settings.type == "local" and conf.ipam is not None and conf.ipam.type == "calico-ipam"
    return settings.open() if settings.type == "etcdv3" or local else None


def _kube_client(conf: NetConf, req: Request, settings: DatastoreSettings) -> KubeClient | None:
    """The API-server client when this call needs one: the Kubernetes datastore, a pod
    under `policy.type: k8s`, or host-local with usePodCidr (calico-ipam resolves its own)."""
    pod_cidr = (
        conf.ipam is not None and conf.ipam.type == "host-local" and conf.ipam.uses_pod_cidr()
    )
    k8s_policy = conf.policy_type == "k8s" and bool(req.args.get("K8S_POD_NAME"))
    if settings.type == "kubernetes" or k8s_policy or pod_cidr:
        from cni_plugin import k8s  # the API server client: only calls that need it import it

        return k8s.client_for(conf, req)
    return None


def _profiles(conf: NetConf, wid: WorkloadID) -> list[str]:
    return [f"kns.{wid.namespace}"] if conf.policy_type == "k8s" else [conf.name]


def cmd_add(req: Request) -> Result:
    from cni_plugin.dataplane import veth

    started = time.monotonic()
    conf = _load(req)
    conf.require_nodename_file()
    ipam_type = _ipam_type(conf)
    mtu = conf.resolve_mtu()
    host_ifname = veth.host_veth_name(req.args, req.container_id)
    wid = WorkloadID.of(conf.resolve_nodename(), req.args, req.container_id, req.ifname)
    log.info("Calico CNI ADD", extra={"fields": _fields(req, Node=wid.node)})
    settings = settings_for(conf.raw, req.environ)
    with translate_errors(), contextlib.ExitStack() as cleanup:
        store = _endpoint_store(settings, conf)
        kube = _kube_client(conf, req, settings)
        for opened in (store, kube):
            if opened is not None:
                cleanup.callback(opened.close)
        if store is not None:
            require_ready(store)
        pod_add = None
        if kube is not None:
            from cni_plugin import k8s

            pod_add = k8s.PodAdd.prepare(conf, req, kube, kdd=settings.type == "kubernetes")
        result = _add_with_ipam(req, conf, ipam_type, host_ifname, mtu, store, wid, pod_add)
    log.info(
        "Calico CNI ADD complete",
        extra={"fields": _fields(req, Duration=_since(started), Interface=host_ifname)},
    )
    return result


def _add_with_ipam(
    req: Request,
    conf: NetConf,
    ipam_type: str,
    host_ifname: str,
    mtu: int,
    store: Datastore | None,
    wid: WorkloadID,
    pod_add: k8s.PodAdd | None,
) -> Result:
    """Everything after IPAM ADD is undone (addresses released) when any step fails."""
    from cni_plugin.dataplane import veth

    ipam_req = pod_add.ipam_request(req) if pod_add else req
    static = pod_add.plan.static if pod_add else []
    if static:
        log.info("Using ipAddrsNoIpam addresses: %s", [str(ip) for ip in static])
        ipam_result = Result(ips=[IPConfig(address=ip) for ip in static])
    else:
        ipam_result = ipam_exec.add(ipam_type, ipam_req, conf.cni_version)
    try:
        ips = [_narrow(ipc.address) for ipc in ipam_result.ips]
        routes = pod_routes(conf, {ip.version for ip in ips})
        log.info(
            "Calico CNI using IPs: %s", [str(ip) for ip in ips], extra={"fields": _fields(req)}
        )
        interfaces = veth.setup_pod(
            veth.PodSpec(
                netns_path=req.netns,
                ifname=req.ifname,
                host_ifname=host_ifname,
                ips=ips,
                routes=routes,
                mtu=mtu,
                num_queues=conf.num_queues,
                allow_ip_forwarding=conf.allow_ip_forwarding,
                pod_mac=pod_add.plan.mac if pod_add else "",
            )
        )
        try:
            if pod_add is not None:
                pod_add.record(req.container_id, ips)
            if store is not None:
                if not conf.policy_type:
                    workload.ensure_profile(store, conf.name, wid.orchestrator)
                workload.write_endpoint(
                    store,
                    wid,
                    req.container_id,
                    host_ifname,
                    interfaces.pod.mac,
                    ips,
                    _profiles(conf, wid),
                    pod_add.pod if pod_add else None,
                )
        except BaseException:
            veth.teardown_pod(req.netns, req.ifname)
            raise
    except BaseException as exc:
        log.error("ADD failed after IPAM allocated addresses, releasing them: %s", exc)
        if not static:
            ipam_exec.release_after_failure(ipam_type, ipam_req)
        raise
    return Result(
        interfaces=[interfaces.host, interfaces.pod],
        ips=[IPConfig(address=ip, interface=1) for ip in ips],
        routes=[Route(dst=dst, gw=veth.GATEWAYS[dst.version]) for dst in routes],
        dns=ipam_result.dns,
    )


def _since(started: float) -> str:
    return f"{(time.monotonic() - started) * 1000:.1f}ms"


def _del_stdin(req: Request, conf: NetConf) -> bytes:
    """host-local releases by container ID; a usePodCidr subnet becomes a dummy CIDR (Calico)."""
    if conf.ipam is None or not conf.ipam.uses_pod_cidr():
        return req.stdin
    import json

    raw = json.loads(req.stdin)
    ipam = raw.get("ipam", {})
    for holder in subnet_holders(ipam):
        version = pod_cidr_version(holder)
        if version is not None:
            holder["subnet"] = "0.0.0.0/0" if version == 4 else "::/0"
    return json.dumps(raw).encode()


def cmd_del(req: Request) -> None:
    """IPAM first (it needs no netns), then the endpoint record, then the pod interface."""
    from cni_plugin.dataplane import veth

    started = time.monotonic()
    conf = _load(req)
    ipam_type = _ipam_type(conf)
    log.info("Calico CNI DEL", extra={"fields": _fields(req)})
    settings = settings_for(conf.raw, req.environ)
    pod = req.args.get("K8S_POD_NAME")
    if settings.type == "kubernetes" and pod:
        # First, as Calico does: a DEL that cannot reach the API server changes nothing.
        from cni_plugin import k8s

        with translate_errors(), k8s.client_for(conf, req) as kube:
            k8s.release_pod_ips(kube, req.args.get("K8S_POD_NAMESPACE", ""), pod, req.container_id)
    log.info("Releasing address using handleID", extra={"fields": _fields(req)})
    ipam_exec.exec_plugin(ipam_type, "DEL", req, stdin=_del_stdin(req, conf))
    with translate_errors():
        store = _endpoint_store(settings, conf)
        if store is not None:
            with store:
                wid = WorkloadID.of(conf.resolve_nodename(), req.args, req.container_id, req.ifname)
                workload.delete_endpoint(store, wid, req.container_id)
    if req.netns:
        veth.teardown_pod(req.netns, req.ifname)
    else:
        log.info("CNI_NETNS is empty: no interface to remove")
    log.info(
        "Teardown processing complete.", extra={"fields": _fields(req, Duration=_since(started))}
    )


def cmd_check(req: Request) -> None:
    from cni_plugin.dataplane import check, veth

    conf = _load(req)
    ipam_type = _ipam_type(conf)
    ipam_exec.exec_plugin(ipam_type, "CHECK", req)
    prev = conf.prev()
    if prev is None:
        raise CNIError(ERR_INVALID_CONFIG, "calico: Required prevResult missing")
    host = next((i for i in prev.interfaces if not i.sandbox), None)
    host_ifname = host.name if host else veth.host_veth_name(req.args, req.container_id)
    families = {ipc.address.version for ipc in prev.ips}
    check.check_pod(req.netns, req.ifname, host_ifname, prev, pod_routes(conf, families))


def cmd_status(req: Request) -> None:
    """Ready when calico/node's files are in place and the IPAM plugin says it is ready."""
    conf = _load(req)
    try:
        conf.require_nodename_file()
        conf.resolve_mtu()
        ipam_type = _ipam_type(conf)
        ipam_exec.find_plugin(ipam_type, req.path)
    except CNIError as err:
        raise CNIError(ERR_NOT_AVAILABLE, err.msg, err.details) from err
    ipam_exec.exec_plugin(ipam_type, "STATUS", req)


def cmd_gc(req: Request) -> None:
    """Pod interfaces vanish with their netns; what can leak is IPAM state, so GC delegates."""
    conf = _load(req)
    ipam_exec.exec_plugin(_ipam_type(conf), "GC", req)


HANDLERS = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "STATUS": cmd_status, "GC": cmd_gc}

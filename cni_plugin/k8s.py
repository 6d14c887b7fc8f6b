"""The plugin's Kubernetes path: the Pod, its Namespace and its Node as Calico reads them.

`CmdAddK8s`/`CmdDelK8s` (calico-behaviour.md §3.3-3.6): with `policy.type: k8s` the pod's
and namespace's `cni.projectcalico.org/*` annotations choose pools, families and fixed
addresses (pod > namespace > netconf); `usePodCidr` becomes the Node's `spec.podCIDRs`;
in the Kubernetes datastore the Pod is the workload endpoint, so ADD records the addresses
in annotations on its status (under a UID precondition, so a pod recreated with the same
name is never patched) and DEL blanks them only when the annotated container ID is this
sandbox's (calico#4710: a late DEL of an old sandbox must not undo the new one).

Annotations are user input: everything read from them is validated here, with Calico's
error texts, before any address is taken.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from cni_plugin.netconf import NetConf, pod_cidr_version, subnet_holders, uses_pod_cidr
from cni_plugin.skel import Request
from cni_plugin.types import ERR_INVALID_CONFIG, ERR_TRY_AGAIN_LATER, CNIError, IPInterface
from libcalico.datastore.base import Conflict, NotFound
from libcalico.datastore.k8s_client import (
    STRATEGIC_MERGE_PATCH,
    Invalid,
    KubeClient,
    open_client,
)

log = logging.getLogger("cni-plugin")

PREFIX = "cni.projectcalico.org/"
IPV4_POOLS = PREFIX + "ipv4pools"
IPV6_POOLS = PREFIX + "ipv6pools"
IP_FAMILIES = PREFIX + "ipFamilies"
IP_ADDRS = PREFIX + "ipAddrs"
IP_ADDRS_NO_IPAM = PREFIX + "ipAddrsNoIpam"
HW_ADDR = PREFIX + "hwAddr"
POD_IP = PREFIX + "podIP"
POD_IPS = PREFIX + "podIPs"
CONTAINER_ID = PREFIX + "containerID"
DELETE_ATTEMPTS = 6
_POOL_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_MAC = re.compile(r"^[0-9a-fA-F]{2}([:-][0-9a-fA-F]{2}){5}$")


def _invalid(message: str) -> CNIError:
    return CNIError(ERR_INVALID_CONFIG, message)


# ------------------------------------------------------------------- client


def client_for(conf: NetConf, req: Request) -> KubeClient:
    """Kubeconfig and overrides from the netconf, else the caller's environment."""
    return open_client(conf.raw, req.environ or None)


# ---------------------------------------------------------------- usePodCidr


def node_name(conf: NetConf) -> str:
    """`kubernetes.node_name`, else the Calico node name."""
    return (conf.raw.get("kubernetes") or {}).get("node_name") or conf.resolve_nodename()


def node_pod_cidrs(client: KubeClient, node: str) -> dict[int, str]:
    """The Node's `spec.podCIDRs` by IP version, with Calico's errors (k8s.go getPodCidrs)."""
    try:
        spec = client.get(f"/api/v1/nodes/{node}").get("spec") or {}
    except NotFound:
        raise _invalid(f"failed to get node {node}: nodes {node!r} not found") from None
    cidrs = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    if not cidrs:
        raise _invalid(f"no podCidr for node {node}")
    by_version: dict[int, str] = {}
    for text in cidrs:
        try:
            version = ipaddress.ip_network(text, strict=False).version
        except ValueError:
            raise _invalid(f"node {node} has an invalid podCIDR {text!r}") from None
        if version in by_version:
            raise _invalid("ClusterCIDR contains two ranges of the same type")
        by_version[version] = text
    return by_version


def with_pod_cidrs(ipam: dict[str, Any], pod_cidrs: dict[int, str]) -> dict[str, Any]:
    """A copy of `ipam` with every usePodCidr / usePodCidrIPv6 subnet replaced; every other
    key is kept (the delegate may read keys Calico does not know)."""
    out = json.loads(json.dumps(ipam))
    for holder in subnet_holders(out):
        version = pod_cidr_version(holder)
        if version is None:
            continue
        if version not in pod_cidrs:
            keyword = "usePodCidr" if version == 4 else "usePodCidrIPv6"
            raise _invalid(f"{keyword} found but there is no IPv{version} CIDR configured")
        holder["subnet"] = pod_cidrs[version]
    return out


def resolve_pod_cidrs(conf: NetConf, client: KubeClient) -> dict[str, Any]:
    """The netconf's `ipam` with the Node's podCIDRs substituted."""
    assert conf.ipam is not None
    return with_pod_cidrs(conf.ipam.raw, node_pod_cidrs(client, node_name(conf)))


# ------------------------------------------------------------ the pod itself


@dataclass
class Pod:
    """What ADD/DEL need of the Pod and its Namespace; the labels and service account are
    what a WorkloadEndpoint carries so that policy selectors match the pod."""

    namespace: str
    name: str
    uid: str
    annotations: dict[str, str] = field(default_factory=dict)
    namespace_annotations: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    service_account: str = ""

    @property
    def path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods/{self.name}"

    def annotation(self, name: str, inherited: bool = False) -> str | None:
        """The pod's value; with `inherited`, else the namespace's."""
        if name in self.annotations:
            return self.annotations[name]
        return self.namespace_annotations.get(name) if inherited else None


def read_pod(client: KubeClient, namespace: str, name: str, with_namespace: bool) -> Pod:
    try:
        obj = client.get(f"/api/v1/namespaces/{namespace}/pods/{name}")
    except NotFound:
        raise _invalid(f'pods "{name}" not found in namespace "{namespace}"') from None
    meta = obj["metadata"]
    pod = Pod(
        namespace,
        name,
        meta.get("uid", ""),
        dict(meta.get("annotations") or {}),
        labels=dict(meta.get("labels") or {}),
        service_account=str((obj.get("spec") or {}).get("serviceAccountName") or ""),
    )
    if with_namespace:
        ns_meta = client.get(f"/api/v1/namespaces/{namespace}")["metadata"]
        pod.namespace_annotations = dict(ns_meta.get("annotations") or {})
    return pod


def _json_list(name: str, text: str) -> list[str]:
    try:
        value = json.loads(text)
    except ValueError as err:
        raise _invalid(f"failed to parse '{text}' as JSON: {err}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _invalid(f'annotation "{name}" must be a JSON array of strings, got {text!r}')
    return value


def _pools(name: str, text: str, version: int) -> list[str]:
    """Pool CIDRs or names; a CIDR of the other family is refused as Calico does."""
    pools = _json_list(name, text)
    for pool in pools:
        try:
            network = ipaddress.ip_network(pool, strict=False)
        except ValueError:
            if not _POOL_NAME.match(pool):
                raise _invalid(f'error parsing pool "{pool}" from "{name}"') from None
            continue
        if network.version != version:
            raise _invalid(f'"{pool}" isn\'t a IPv{version} address')
    return pools


def _families(text: str) -> set[int]:
    families = set()
    for family in _json_list(IP_FAMILIES, text):
        if family not in ("IPv4", "IPv6"):
            raise _invalid(f'error parsing ipFamilies: unknown IP family "{family}"')
        families.add(4 if family == "IPv4" else 6)
    if not families:
        raise _invalid(f'annotation "{IP_FAMILIES}" specified but empty')
    return families


def _addresses(name: str, text: str) -> list[str]:
    """At most one IPv4 and one IPv6 address, each a plain IP."""
    texts = _json_list(name, text)
    if not texts:
        raise _invalid(f'annotation "{name}" specified but empty')
    seen: set[int] = set()
    addresses = []
    for item in texts:
        try:
            ip = ipaddress.ip_address(item)
        except ValueError:
            raise _invalid(f"invalid IP format: {item}") from None
        if ip.version in seen:
            raise _invalid(
                f'cannot have more than one IPv{ip.version} address for "{name}" annotation'
            )
        seen.add(ip.version)
        addresses.append(str(ip))
    return addresses


@dataclass
class AddressPlan:
    """Where the pod's addresses come from, decided from its annotations."""

    ipam: dict[str, Any]  # the `ipam` section passed to the IPAM plugin
    requested: list[str] = field(default_factory=list)  # ipAddrs: exactly these, via IPAM
    static: list[IPInterface] = field(default_factory=list)  # ipAddrsNoIpam: no IPAM at all
    mac: str = ""  # hwAddr


def plan_addresses(conf: NetConf, pod: Pod) -> AddressPlan:
    """Pools, families and fixed addresses from the annotations (pod > namespace > netconf)."""
    assert conf.ipam is not None
    ipam = json.loads(json.dumps(conf.ipam.raw))
    for annotation, key, version in ((IPV4_POOLS, "ipv4_pools", 4), (IPV6_POOLS, "ipv6_pools", 6)):
        text = pod.annotation(annotation, inherited=True)
        if text is not None:
            ipam[key] = _pools(annotation, text, version)
    families_text = pod.annotation(IP_FAMILIES, inherited=True)
    if families_text is not None:
        families = _families(families_text)
        ipam["assign_ipv4"] = "true" if 4 in families else "false"
        ipam["assign_ipv6"] = "true" if 6 in families else "false"
    plan = AddressPlan(ipam=ipam)
    addrs, no_ipam = pod.annotation(IP_ADDRS), pod.annotation(IP_ADDRS_NO_IPAM)
    if addrs is not None and no_ipam is not None:
        raise _invalid(
            "can't have both annotations: 'ipAddrs' and 'ipAddrsNoIpam' in use at the same time"
        )
    if (addrs is not None or no_ipam is not None) and conf.ipam.type != "calico-ipam":
        which = IP_ADDRS if addrs is not None else IP_ADDRS_NO_IPAM
        raise _invalid(f'annotation "{which}" needs ipam type calico-ipam')
    if addrs is not None:
        plan.requested = _addresses(IP_ADDRS, addrs)
    if no_ipam is not None:
        if not (conf.raw.get("feature_control") or {}).get("ip_addrs_no_ipam"):
            raise _invalid("requested feature is not enabled: ip_addrs_no_ipam")
        plan.static = [ipaddress.ip_interface(ip) for ip in _addresses(IP_ADDRS_NO_IPAM, no_ipam)]
    mac = pod.annotation(HW_ADDR)
    if mac is not None:
        if not _MAC.match(mac) or int(mac[:2], 16) & 1:
            raise _invalid(f'annotation "{HW_ADDR}": {mac!r} is not a unicast MAC address')
        plan.mac = mac.lower().replace("-", ":")
    return plan


@dataclass
class PodAdd:
    """The Kubernetes part of one ADD: the pod (read when policy or the datastore needs
    it), the plan, and whether the Pod itself records the addresses (`kdd`)."""

    client: KubeClient
    plan: AddressPlan
    pod: Pod | None = None
    kdd: bool = False

    @classmethod
    def prepare(cls, conf: NetConf, req: Request, client: KubeClient, kdd: bool) -> PodAdd:
        """Everything ADD learns from the API before taking an address. `kdd`: the
        Kubernetes datastore, where ClusterInformation gates ADD and the Pod is recorded."""
        assert conf.ipam is not None
        if kdd:
            from cni_plugin.datastore import require_ready
            from libcalico.datastore.kubernetes import KubernetesDatastore

            require_ready(KubernetesDatastore(client))
        namespace, name = req.args.get("K8S_POD_NAMESPACE", ""), req.args.get("K8S_POD_NAME")
        policy = conf.policy_type == "k8s"
        pod = read_pod(client, namespace, name, policy) if name and (policy or kdd) else None
        if policy and pod is not None:
            plan = plan_addresses(conf, pod)
        else:
            plan = AddressPlan(ipam=json.loads(json.dumps(conf.ipam.raw)))
        if conf.ipam.type == "host-local" and uses_pod_cidr(plan.ipam):
            plan.ipam = with_pod_cidrs(plan.ipam, node_pod_cidrs(client, node_name(conf)))
        return cls(client, plan, pod, kdd)

    def ipam_request(self, req: Request) -> Request:
        """The request the IPAM plugin gets: the planned `ipam` section and, for ipAddrs,
        `IP=<addresses>` in CNI_ARGS (calico-ipam assigns exactly those, or none)."""
        config = dict(req.config, ipam=self.plan.ipam)
        environ = dict(req.environ)
        if self.plan.requested:
            wanted = "IP=" + ",".join(self.plan.requested)
            args = environ.get("CNI_ARGS", "")
            environ["CNI_ARGS"] = f"{args};{wanted}" if args else wanted
        return dataclasses.replace(
            req, config=config, stdin=json.dumps(config).encode(), environ=environ
        )

    def record(self, container_id: str, ips: list[IPInterface]) -> None:
        if self.kdd and self.pod is not None:
            record_pod_ips(self.client, self.pod, container_id, ips)


# -------------------------------------------------- the Pod as the endpoint


def _patch_status(client: KubeClient, path: str, metadata: dict[str, Any]) -> None:
    """Patch the pod's status with `metadata` (holding its uid as a precondition); a pod
    deleted, recreated (the API server refuses a different uid as immutable) or changed
    meanwhile raises Conflict."""
    try:
        client.request("PATCH", path + "/status", {"metadata": metadata}, STRATEGIC_MERGE_PATCH)
    except Invalid as err:
        if "metadata.uid" in err.fields:
            raise Conflict(str(err)) from err
        raise


def record_pod_ips(client: KubeClient, pod: Pod, container_id: str, ips: list[IPInterface]) -> None:
    """Calico's KDD "write the workload endpoint": annotations on the pod's status, only on
    the pod whose UID this ADD read."""
    networks = [str(ip) for ip in ips]
    annotations = {
        POD_IP: networks[0] if networks else "",
        POD_IPS: ",".join(networks),
        CONTAINER_ID: container_id,
    }
    try:
        _patch_status(client, pod.path, {"uid": pod.uid, "annotations": annotations})
    except (NotFound, Conflict) as err:
        raise CNIError(
            ERR_TRY_AGAIN_LATER,
            f"pod {pod.namespace}/{pod.name} was deleted or recreated during ADD: {err}",
        ) from err
    log.info(
        "Wrote updated endpoint to datastore", extra={"fields": {"Pod": pod.name, "IPs": networks}}
    )


def release_pod_ips(client: KubeClient, namespace: str, name: str, container_id: str) -> None:
    """Blank podIP/podIPs unless a newer sandbox owns the pod (its containerID differs).

    Errors other than not-found propagate: a DEL that cannot tell whether it is stale must
    not clean anything up (Calico's rule against a false DEL)."""
    path = f"/api/v1/namespaces/{namespace}/pods/{name}"
    for _ in range(DELETE_ATTEMPTS):
        try:
            meta = client.get(path)["metadata"]
        except NotFound:
            log.warning("Pod does not exist: nothing to clear", extra={"fields": {"Pod": name}})
            return
        annotations = meta.get("annotations") or {}
        owner = annotations.get(CONTAINER_ID, "")
        if owner and owner != container_id:
            log.warning(
                "CNI_CONTAINERID does not match the pod's container ID: not clearing its IPs",
                extra={"fields": {"Pod": name, "PodContainerID": owner}},
            )
            return
        if not annotations.get(POD_IP) and not annotations.get(POD_IPS):
            return
        metadata = {
            "uid": meta["uid"],
            "resourceVersion": meta["resourceVersion"],
            "annotations": {POD_IP: "", POD_IPS: ""},
        }
        try:
            _patch_status(client, path, metadata)
            return
        except NotFound:
            return
        except Conflict:
            continue
    raise CNIError(
        ERR_TRY_AGAIN_LATER,
        "error deleting endpoint: endpoint was modified before it could be deleted: "
        f"{namespace}/{name}",
    )

"""Who asks for addresses: the identifiers Calico derives its IPAM handles and allocation
attributes from, shared by pool mode and range mode."""

from __future__ import annotations

import time
from dataclasses import dataclass

from cni_plugin.netconf import NetConf
from cni_plugin.skel import Request


@dataclass
class Attachment:
    """Who asks: the identifiers Calico derives its handle IDs from."""

    network: str
    container_id: str
    ifname: str
    namespace: str
    pod: str
    node: str

    @classmethod
    def of(cls, req: Request, conf: NetConf) -> Attachment:
        return cls(
            network=conf.name,
            container_id=req.container_id,
            ifname=req.ifname,
            namespace=req.args.get("K8S_POD_NAMESPACE", ""),
            pod=req.args.get("K8S_POD_NAME", ""),
            node=conf.resolve_nodename(),
        )

    @property
    def handle_id(self) -> str:
        return f"{self.network}.{self.container_id}"

    @property
    def workload_id(self) -> str:
        """The legacy handle Calico also releases on DEL."""
        return f"{self.namespace}.{self.pod}" if self.namespace and self.pod else self.container_id

    def attrs(self) -> dict[str, str]:
        attrs = {"node": self.node, "timestamp": _go_timestamp()}
        if self.pod:
            attrs.update(namespace=self.namespace, pod=self.pod)
        return attrs


def _go_timestamp() -> str:
    """UTC now in Go's default time format, as Calico stores it in allocation attributes."""
    ns = time.time_ns()
    fraction = f"{ns % 1_000_000_000:09d}".rstrip("0")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ns // 1_000_000_000))
    return f"{stamp}{'.' + fraction if fraction else ''} +0000 UTC"

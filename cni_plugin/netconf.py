"""The network configuration both executables read from stdin, with Calico's defaults.

Keys are matched case-insensitively (Go's encoding/json does, so conflists written for
real Calico may say `runtimeConfig` or `RuntimeConfig`), validated against
`netconf.schema.json`, and every key, known or not, stays in `raw` so it is passed on
unchanged to a delegated IPAM plugin.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from cni_plugin.schema_validator import SchemaValidator
from cni_plugin.types import (
    DEFAULT_VERSION,
    ERR_INVALID_CONFIG,
    ERR_TRY_AGAIN_LATER,
    CNIError,
    Result,
    parse_result,
)

DEFAULT_NODENAME_FILE = "/var/lib/calico/nodename"
DEFAULT_MTU_FILE = "/var/lib/calico/mtu"
DEFAULT_IPAM_LOCK_FILE = "/var/run/calico/ipam.lock"
# Calico waits for the node's IPAM lock forever; we give up (code 11) after this long.
DEFAULT_IPAM_LOCK_TIMEOUT_S = 60.0
_SCHEMA_PATH = os.path.join(os.path.dirname(__file__), "netconf.schema.json")


@cache
def _schema() -> dict[str, Any]:
    with open(_SCHEMA_PATH, encoding="utf-8") as f:
        return json.load(f)


@cache
def _validator() -> SchemaValidator:
    """Built once per process: the node agent validates every request with it."""
    # Not jsonschema, by measurement (2-vCPU VM): `import jsonschema` is 75-110 ms cumulative
    # in -X importtime, against ~1 ms for schema_validator on top of what this module already
    # imports; a process importing netconf and validating went from p50 227 ms to 103 ms.
    # Both calico and calico-ipam pay it on every ADD. The tests check the two agree here.
    return SchemaValidator(_schema())


def canonical_keys(obj: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Rename keys that match a schema property case-insensitively to the property's name."""
    props = schema.get("properties", {})
    by_lower = {name.lower(): name for name in props}
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = key if key in props else by_lower.get(key.lower(), key)
        if name != key and name in obj:
            name = key  # the exact spelling is present too: keep both, the exact one wins
        sub = props.get(name)
        if isinstance(value, dict) and sub and sub.get("type") == "object":
            value = canonical_keys(value, sub)
        out[name] = value
    return out


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """Canonicalise and validate; CNIError 7 naming the offending key on failure."""
    config = canonical_keys(config, _schema())
    err = _validator().first_error(config)
    if err is not None:
        where = ".".join(str(p) for p in err.path) or "(top level)"
        raise CNIError(ERR_INVALID_CONFIG, f"invalid network config: {where}: {err.message}")
    return config


@dataclass
class IPAMConf:
    type: str
    raw: dict[str, Any]

    def uses_pod_cidr(self) -> bool:
        return uses_pod_cidr(self.raw)


# The subnet keywords that name the Node's podCIDR of that IP version (host-local mode).
_POD_CIDR_KEYWORDS = {"usepodcidr": 4, "usepodcidripv6": 6}


def subnet_holders(ipam: dict[str, Any]) -> list[dict[str, Any]]:
    """`ipam` itself and every `ranges[][]` entry: the places a subnet can be named."""
    return [ipam, *(r for rs in ipam.get("ranges") or [] for r in rs)]


def pod_cidr_version(holder: dict[str, Any]) -> int | None:
    """4 or 6 when the holder's subnet is usePodCidr / usePodCidrIPv6, else None."""
    return _POD_CIDR_KEYWORDS.get(str(holder.get("subnet", "")).lower())


def uses_pod_cidr(ipam: dict[str, Any]) -> bool:
    return any(pod_cidr_version(holder) for holder in subnet_holders(ipam))


@dataclass
class NetConf:
    """The typed view of a netconf; `raw` is the whole canonicalised document."""

    raw: dict[str, Any]
    cni_version: str
    name: str
    type: str
    ipam: IPAMConf | None
    mtu: int = 0
    require_mtu_file: bool = False
    mtu_file_path: str = DEFAULT_MTU_FILE
    num_queues: int = 1
    nodename: str = ""
    nodename_file: str = DEFAULT_NODENAME_FILE
    nodename_file_optional: bool = False
    hostname: str = ""
    log_level: str = "info"
    log_file_path: str = ""
    log_file_max_size: int = 100
    log_file_max_count: int = 10
    allow_ip_forwarding: bool = False
    include_default_routes: bool = False
    ipam_lock_file: str = DEFAULT_IPAM_LOCK_FILE
    ipam_lock_timeout: float = DEFAULT_IPAM_LOCK_TIMEOUT_S
    policy_type: str = ""
    prev_result: dict[str, Any] | None = None
    runtime_config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, config: dict[str, Any]) -> NetConf:
        raw = validate(config)
        ipam = raw.get("ipam")
        return cls(
            raw=raw,
            cni_version=raw.get("cniVersion") or DEFAULT_VERSION,
            name=raw["name"],
            type=raw["type"],
            ipam=IPAMConf(type=ipam["type"], raw=ipam) if ipam else None,
            mtu=raw.get("mtu", 0),
            require_mtu_file=raw.get("require_mtu_file", False),
            mtu_file_path=raw.get("mtu_file_path") or DEFAULT_MTU_FILE,
            num_queues=max(raw.get("num_queues", 1), 1),
            nodename=raw.get("nodename", ""),
            nodename_file=raw.get("nodename_file") or DEFAULT_NODENAME_FILE,
            nodename_file_optional=raw.get("nodename_file_optional", False),
            hostname=raw.get("hostname", ""),
            log_level=raw.get("log_level") or "info",
            log_file_path=raw.get("log_file_path", ""),
            log_file_max_size=raw.get("log_file_max_size") or 100,
            log_file_max_count=raw.get("log_file_max_count") or 10,
            allow_ip_forwarding=raw.get("container_settings", {}).get("allow_ip_forwarding", False),
            include_default_routes=raw.get("include_default_routes", False),
            ipam_lock_file=raw.get("ipam_lock_file") or DEFAULT_IPAM_LOCK_FILE,
            ipam_lock_timeout=raw.get("ipam_lock_timeout_seconds") or DEFAULT_IPAM_LOCK_TIMEOUT_S,
            policy_type=raw.get("policy", {}).get("type", ""),
            prev_result=raw.get("prevResult"),
            runtime_config=raw.get("runtimeConfig") or {},
        )

    def prev(self) -> Result | None:
        """prevResult parsed in this config's version (libcni sends it converted)."""
        if not self.prev_result:
            return None
        return parse_result(self.prev_result, self.cni_version)

    def require_nodename_file(self) -> None:
        """Calico's check that calico/node has written the nodename file (unless optional)."""
        if self.nodename or self.nodename_file_optional:
            return
        if not os.path.exists(self.nodename_file):
            raise CNIError(
                ERR_TRY_AGAIN_LATER,
                f"stat {self.nodename_file}: no such file or directory: check that the "
                "calico/node container is running and has mounted /var/lib/calico/",
                "or set nodename, or nodename_file_optional: true, in the CNI config",
            )

    def resolve_nodename(self) -> str:
        """nodename → nodename_file (verbatim) → hostname (deprecated) → OS hostname."""
        if self.nodename:
            return self.nodename
        try:
            with open(self.nodename_file, encoding="utf-8") as f:
                name = f.read()
            if name:
                return name
        except OSError:
            pass
        if self.hostname:
            return self.hostname
        return os.uname().nodename.strip().lower()  # gethostname(2), without socket's import

    def resolve_mtu(self) -> int:
        """`mtu`, else the MTU file calico/node writes; 0 means the kernel default."""
        if self.mtu:
            return self.mtu
        try:
            with open(self.mtu_file_path, encoding="utf-8") as f:
                return int(f.read().strip())
        except (OSError, ValueError) as exc:
            if self.require_mtu_file:
                raise CNIError(
                    ERR_TRY_AGAIN_LATER,
                    f"failed to read MTU file: {exc}",
                    f"{self.mtu_file_path} is written by calico/node; set mtu in the CNI "
                    "config or require_mtu_file: false",
                ) from exc
            return 0


def load_with_logging(config: dict[str, Any], component: str) -> NetConf:
    """The netconf, with logging configured as it asks (level, rotating file) for `component`."""
    from cni_plugin import logs

    conf = NetConf.load(config)
    logs.setup(
        component,
        conf.log_level,
        conf.log_file_path,
        conf.log_file_max_size,
        conf.log_file_max_count,
    )
    return conf

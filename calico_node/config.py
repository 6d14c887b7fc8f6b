"""calico-node's settings, from the environment as real calico-node reads them.

Parsed and checked once at start: a bad value stops the daemon with one line naming the
variable, before anything is written.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from calico_node.paths import NodePaths
from libcalico.datastore.config import DatastoreSettings

BACKENDS = ("bird", "vxlan", "none")
_TRUE = ("true", "1", "yes", "on")


class ConfigError(Exception):
    """An environment variable with a value calico-node cannot use."""


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = env.get(name, "").strip().lower()
    return default if not value else value in _TRUE


def parse_as_number(text: str, name: str = "AS") -> int | None:
    """An AS number: plain (`64512`) or dotted (`1.10`, RFC 5396); None when empty."""
    text = text.strip()
    if not text:
        return None
    match = re.fullmatch(r"(\d+)(?:\.(\d+))?", text)
    if match:
        high, low = match.groups()
        value = int(high) if low is None else (int(high) << 16) + int(low)
        if (low is None and value < 2**32) or (
            low is not None and int(high) < 2**16 and int(low) < 2**16
        ):
            return value
    raise ConfigError(f"{name}={text!r} is not an AS number (0-4294967295 or A.B)")


ENCAP_MODES = {"": "Never", "off": "Never", "never": "Never", "always": "Always",
               "crosssubnet": "CrossSubnet", "cross-subnet": "CrossSubnet"}  # fmt: skip


@dataclass(frozen=True)
class PoolEnv:
    """The default pool of one family from CALICO_IPV4POOL_* / CALICO_IPV6POOL_*, checked
    even when the pool exists already (a typo must not wait for the next cluster)."""

    cidr: str  # "" when not set; "none" disables the default pool
    block_size: str
    ipip: str
    vxlan: str
    nat_outgoing: str
    node_selector: str
    disable_bgp_export: str

    @classmethod
    def from_env(cls, env: Mapping[str, str], family: int) -> PoolEnv:
        prefix = f"CALICO_IPV{family}POOL_"

        def get(name: str) -> str:
            return env.get(prefix + name, "").strip()

        env_ = cls(
            get("CIDR"),
            get("BLOCK_SIZE"),
            get("IPIP"),
            get("VXLAN"),
            get("NAT_OUTGOING"),
            get("NODE_SELECTOR"),
            get("DISABLE_BGP_EXPORT"),
        )
        for name, value in (("IPIP", env_.ipip), ("VXLAN", env_.vxlan)):
            if value.lower() not in ENCAP_MODES:
                raise ConfigError(f"{prefix}{name}={value!r} is not Always, CrossSubnet or Never")
        for name, value in (
            ("NAT_OUTGOING", env_.nat_outgoing),
            ("DISABLE_BGP_EXPORT", env_.disable_bgp_export),
        ):
            if value and value.lower() not in ("true", "false"):
                raise ConfigError(f"{prefix}{name}={value!r} is not true or false")
        if env_.block_size and not env_.block_size.isdigit():
            raise ConfigError(f"{prefix}BLOCK_SIZE={env_.block_size!r} is not a number")
        return env_

    def encapsulation(self, name: str) -> str:
        """Calico's mode for CALICO_IPV*POOL_IPIP / _VXLAN's value."""
        return ENCAP_MODES[(self.ipip if name == "IPIP" else self.vxlan).lower()]


@dataclass(frozen=True)
class NodeConfig:
    nodename_env: str  # NODENAME as given ("" : from the nodename file or the hostname)
    ip: str  # IP: "", "autodetect", "none", an address or a CIDR
    ip6: str
    ip_autodetection_method: str
    ip6_autodetection_method: str
    as_number: int | None
    networking_backend: str
    router_id: str
    cluster_type: str
    no_default_pools: bool
    disable_node_ip_check: bool
    pools: tuple[PoolEnv, PoolEnv]
    paths: NodePaths
    datastore: DatastoreSettings
    environ: Mapping[str, str] = field(repr=False, default_factory=dict)
    nodename: str = ""  # resolved by start-up

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> NodeConfig:
        env = dict(os.environ if env is None else env)
        backend = env.get("CALICO_NETWORKING_BACKEND", "").strip().lower() or "bird"
        if backend not in BACKENDS:
            raise ConfigError(
                f"CALICO_NETWORKING_BACKEND={backend!r} is not one of {', '.join(BACKENDS)}"
            )
        router_id = env.get("CALICO_ROUTER_ID", "").strip()
        if router_id and router_id != "hash":
            try:
                ipaddress.IPv4Address(router_id)
            except ValueError:
                raise ConfigError(
                    f"CALICO_ROUTER_ID={router_id!r} is neither an IPv4 address nor 'hash'"
                ) from None
        for name in ("IP", "IP6"):
            value = env.get(name, "").strip()
            if value not in ("", "autodetect", "none"):
                try:
                    ipaddress.ip_interface(value)
                except ValueError:
                    raise ConfigError(
                        f"{name}={value!r} is not an address, a CIDR, 'autodetect' or 'none'"
                    ) from None
        # calico-node's DATASTORE_TYPE defaults to kubernetes; ours to the local file, as
        # the CNI plugin and calicoctl here do.
        try:
            datastore = DatastoreSettings.resolve({}, env)
        except Exception as err:
            raise ConfigError(str(err)) from err
        return cls(
            nodename_env=env.get("NODENAME", "").strip(),
            ip=env.get("IP", "").strip(),
            ip6=env.get("IP6", "").strip(),
            ip_autodetection_method=env.get("IP_AUTODETECTION_METHOD", "").strip(),
            ip6_autodetection_method=env.get("IP6_AUTODETECTION_METHOD", "").strip(),
            as_number=parse_as_number(env.get("AS", "")),
            networking_backend=backend,
            router_id=router_id,
            cluster_type=env.get("CLUSTER_TYPE", "").strip(),
            no_default_pools=_flag(env, "NO_DEFAULT_POOLS", False),
            disable_node_ip_check=_flag(env, "DISABLE_NODE_IP_CHECK", False),
            pools=(PoolEnv.from_env(env, 4), PoolEnv.from_env(env, 6)),
            paths=NodePaths.from_env(env),
            datastore=datastore,
            environ=env,
        )

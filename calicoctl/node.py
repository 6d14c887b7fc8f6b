"""`calicoctl node`: `status` (node_status.py) and `checksystem`, which tells whether this
kernel has what Calico's dataplane needs.

checksystem reads the kernel's build configuration (`/proc/config.gz`, `/boot/config-*`, or
`--kernel-config FILE`, which is then the only source) and, as calicoctl does, the module
lists (`/lib/modules/<release>/modules.{dep,builtin}`, `/sys/module`); a feature is there
when any source has it. Missing encapsulations (ipip, vxlan, wireguard) are warnings, as
a cluster can run without them, and name the pool settings that cannot work.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import os
import re
from dataclasses import dataclass
from pathlib import Path

from calicoctl.errors import CommandError

MIN_KERNEL = (2, 6, 24)  # network namespaces and veth pairs


@dataclass(frozen=True)
class Feature:
    module: str
    option: str
    without: str = ""  # for an optional feature: what cannot work without it


REQUIRED = (
    Feature("veth", "CONFIG_VETH"),
    Feature("ip_set", "CONFIG_IP_SET"),
    Feature("ip_tables", "CONFIG_IP_NF_IPTABLES"),
    Feature("ip6_tables", "CONFIG_IP6_NF_IPTABLES"),
    Feature("ipt_REJECT", "CONFIG_IP_NF_TARGET_REJECT"),
    Feature("ipt_rpfilter", "CONFIG_IP_NF_MATCH_RPFILTER"),
    Feature("nf_conntrack_netlink", "CONFIG_NF_CT_NETLINK"),
    Feature("xt_addrtype", "CONFIG_NETFILTER_XT_MATCH_ADDRTYPE"),
    Feature("xt_conntrack", "CONFIG_NETFILTER_XT_MATCH_CONNTRACK"),
    Feature("xt_mark", "CONFIG_NETFILTER_XT_MARK"),
    Feature("xt_multiport", "CONFIG_NETFILTER_XT_MATCH_MULTIPORT"),
    Feature("xt_set", "CONFIG_NETFILTER_XT_SET"),
    Feature("xt_MASQUERADE", "CONFIG_NETFILTER_XT_TARGET_MASQUERADE"),
)
OPTIONAL = (
    Feature("ipip", "CONFIG_NET_IPIP", "IP pools with ipipMode Always or CrossSubnet"),
    Feature("vxlan", "CONFIG_VXLAN", "IP pools with vxlanMode Always or CrossSubnet"),
    Feature("wireguard", "CONFIG_WIREGUARD", "WireGuard encryption (wireguardEnabled)"),
)


def _result(name: str, outcome: str) -> str:
    """calicoctl's line layout for one check."""
    return f"\t\t{name:<20}\t\t\t\t\t{outcome}"


def _kernel_config(release: str, override: str | None) -> set[str]:
    """The options built in or as modules (`=y` / `=m`)."""
    if override:
        paths = [Path(override)]
    else:
        paths = [
            Path("/proc/config.gz"),
            Path(f"/boot/config-{release}"),
            Path("/usr/src/linux/.config"),
            Path(f"/lib/modules/{release}/build/.config"),
        ]
    for path in paths:
        try:
            raw = path.read_bytes()
        except OSError:
            if override:
                raise CommandError(f"cannot read the kernel config {override}") from None
            continue
        text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode(errors="replace")
        return {m.group(1) for m in re.finditer(r"^(CONFIG_\w+)=[ym]$", text, re.MULTILINE)}
    return set()


def _modules(release: str) -> set[str]:
    """Module names the module lists and /sys/module know."""
    names: set[str] = set()
    for listing in ("modules.dep", "modules.builtin"):
        try:
            text = Path(f"/lib/modules/{release}/{listing}").read_text()
        except OSError:
            continue
        names |= {m.group(1) for m in re.finditer(r"/([\w-]+)\.ko", text)}
    with contextlib.suppress(OSError):
        names |= set(os.listdir("/sys/module"))
    return {name.replace("-", "_") for name in names}


def _version_tuple(release: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", release)[:3])


def checksystem(opts: argparse.Namespace) -> int:
    release = os.uname().release
    config = _kernel_config(release, opts.kernel_config)
    modules = set() if opts.kernel_config else _modules(release)
    lines, failed = ["Checking kernel version..."], False
    if _version_tuple(release) >= MIN_KERNEL:
        lines.append(_result(release, "OK"))
    else:
        failed = True
        lines += [
            _result(release, "FAIL"),
            f"Minimum kernel version to run Calico is {'.'.join(map(str, MIN_KERNEL))}. "
            f"Detected kernel version: {release}",
        ]
    lines.append("Checking kernel modules...")
    for feature in (*REQUIRED, *OPTIONAL):
        if feature.option in config or feature.module.lower() in modules:
            lines.append(_result(feature.module, "OK"))
        elif feature.without:
            lines.append(
                f"WARNING: this kernel has no {feature.module} ({feature.option} is not set): "
                f"{feature.without} cannot work on this node"
            )
            lines.append(_result(feature.module, "MISSING"))
        else:
            failed = True
            lines.append(
                f"WARNING: Unable to detect the {feature.module} module as Loaded/Builtin module "
                f"or in the kernel config ({feature.option})"
            )
            lines.append(_result(feature.module, "FAIL"))
    print("\n".join(lines))
    if failed:
        raise CommandError(
            "system doesn't meet one or more minimum systems requirements to run Calico"
        )
    print("System meets minimum system requirements to run Calico!")
    return 0


def _status(opts: argparse.Namespace) -> int:
    from calicoctl import node_status

    return node_status.run(opts)


def register(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="node_command", metavar="COMMAND")
    status = sub.add_parser("status", parents=[common], help="this node's Calico processes and BGP")
    status.set_defaults(handler=_status, uses_datastore=False)
    check = sub.add_parser(
        "checksystem", parents=[common], help="whether this kernel can run a Calico node"
    )
    check.add_argument("-f", "--kernel-config", metavar="FILE", help="the kernel's build config")
    check.set_defaults(handler=checksystem, uses_datastore=False)

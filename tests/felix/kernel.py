"""Reading a test node's dataplane back the way an operator would (`ip`, `bridge`,
`iptables-save`, `ipset`), as plain values to assert on."""

from __future__ import annotations

import json
from typing import Any

from tests.harness import Netns, ip_json, sh


def vxlan_link(ns: Netns, name: str = "vxlan.calico") -> dict[str, Any] | None:
    out = sh("ip", "-j", "-d", "-n", ns.name, "link", "show", "dev", name, check=False)
    if out.returncode != 0:
        return None
    link = json.loads(out.stdout)[0]
    data = link["linkinfo"]["info_data"]
    return {
        "mtu": link["mtu"],
        "mac": link["address"],
        "up": "UP" in link["flags"],
        "vni": data["id"],
        "port": data["port"],
        "local": data.get("local") or data.get("local6"),
        "learning": data.get("learning"),
        "parent": data.get("link"),
    }


def addresses(ns: Netns, dev: str) -> list[str]:
    out = ip_json(ns.name, "addr", "show", "dev", dev)
    return sorted(
        f"{a['local']}/{a['prefixlen']}" for a in out[0]["addr_info"] if a["scope"] != "link"
    )


def neighbours(ns: Netns, dev: str = "vxlan.calico", family: int = 4) -> dict[str, str]:
    out = ip_json(ns.name, f"-{family}", "neigh", "show", "dev", dev)
    return {n["dst"]: n.get("lladdr", "") for n in out if "PERMANENT" in n.get("state", [])}


def fdb(ns: Netns, dev: str = "vxlan.calico") -> dict[str, str]:
    out = sh("bridge", "-j", "-n", ns.name, "fdb", "show", "dev", dev).stdout
    return {
        e["mac"]: e.get("dst", "")
        for e in json.loads(out or "[]")
        if "permanent" in e.get("state", "")
    }


def routes(ns: Netns, family: int = 4) -> set[str]:
    """Each main-table route as `ip route` prints it, minus the kernel's own."""
    text = sh("ip", f"-{family}", "-n", ns.name, "route", "show").stdout
    return {
        " ".join(line.split())
        for line in text.splitlines()
        if "proto kernel" not in line and not line.startswith(("default", "fe80::", "multicast"))
    }


def nat_rules(ns: Netns, family: int = 4) -> list[str]:
    save = "iptables-save" if family == 4 else "ip6tables-save"
    text = ns.exec(save, "-t", "nat").stdout
    return [line for line in text.splitlines() if line.startswith(("-A", ":cali"))]


def ipsets(ns: Netns) -> dict[str, set[str]]:
    text = ns.exec("ipset", "save").stdout
    sets: dict[str, set[str]] = {}
    for line in text.splitlines():
        words = line.split()
        if words[0] == "create":
            sets.setdefault(words[1], set())
        elif words[0] == "add":
            sets.setdefault(words[1], set()).add(words[2])
    return sets

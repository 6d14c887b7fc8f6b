"""natOutgoing as Felix renders it for iptables (calico-node.md §4).

ipsets (hash:net) `cali40masq-ipam-pools` (pools with natOutgoing), `cali40all-ipam-pools`
(every pool) and `cali40all-hosts-net` (every node's address); IPv6 `cali60...`. Table
nat: `POSTROUTING` jumps first to `cali-POSTROUTING`, which jumps to `cali-fip-snat` and
`cali-nat-outgoing` and masquerades host-sourced traffic leaving through a tunnel device;
`cali-nat-outgoing` holds one rule only while some pool has natOutgoing: source in a
masquerading pool and destination outside every pool -> MASQUERADE. So pod to pod is never
translated, and pod to anything else is.

Every rule carries a `cali:<hash>` comment of its content; the chains are compared by those
hashes and, when anything differs, rewritten in one `iptables-restore --noflush`
transaction (atomic: the chains are never seen half written). Sets change by filling a
temporary set and `swap`ping it in. Commands get argument lists, never a shell.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from calico_node.felix.config import FelixConfig
from calico_node.felix.model import NatSets

log = logging.getLogger("felix")

COMMAND_TIMEOUT_S = 30
CHAINS = ("cali-POSTROUTING", "cali-fip-snat", "cali-nat-outgoing")
TOP_CHAIN = "POSTROUTING"
_COMMENT = re.compile(r'--comment "?cali:([A-Za-z0-9_-]{16})"?')
_SET_KINDS = ("masq-ipam-pools", "all-ipam-pools", "all-hosts-net")


class NatError(Exception):
    """A command failed; the message has its one-line reason."""


@dataclass(frozen=True)
class Family:
    version: int

    @property
    def restore(self) -> str:
        return "iptables-restore" if self.version == 4 else "ip6tables-restore"

    @property
    def save(self) -> str:
        return "iptables-save" if self.version == 4 else "ip6tables-save"

    def set_name(self, kind: str) -> str:
        return f"cali{self.version}0{kind}"

    def temp_set_name(self, kind: str) -> str:
        return f"cali{self.version}t{kind}"

    @property
    def ipset_family(self) -> str:
        return "inet" if self.version == 4 else "inet6"


def _run(argv: list[str], stdin: str = "") -> str:
    if shutil.which(argv[0]) is None:
        raise NatError(f"{argv[0]} not found: natOutgoing cannot be programmed")
    proc = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
    )
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise NatError(f"{' '.join(argv)} failed (exit {proc.returncode}): {reason}")
    return proc.stdout


def _restore(family: Family, lines: list[str]) -> None:
    """One nat-table transaction: all of it applies, or none."""
    _run([family.restore, "--noflush", "-w", "10"], "\n".join([*lines, "COMMIT"]) + "\n")


def _hashed(chain: str, rules: list[str]) -> list[tuple[str, str]]:
    """(hash, rule with its `cali:` comment) for each rule, as Felix tags them."""
    tagged = []
    for index, rule in enumerate(rules):
        digest = hashlib.sha224(f"{chain}\0{index}\0{rule}".encode()).digest()
        tag = base64.urlsafe_b64encode(digest).decode()[:16]
        tagged.append((tag, f'-m comment --comment "cali:{tag}" {rule}'))
    return tagged


def desired_rules(nat: NatSets, config: FelixConfig) -> dict[str, list[str]]:
    """The rules of Felix's nat chains for one family (without comments)."""
    family = Family(nat.version)
    post = ["-j cali-fip-snat", "-j cali-nat-outgoing"]
    post += [
        f"-o {device} -m addrtype ! --src-type LOCAL --limit-iface-out "
        "-m addrtype --src-type LOCAL -j MASQUERADE --random-fully"
        for device in nat.tunnel_devices
    ]
    outgoing: list[str] = []
    if nat.masquerade:
        match = (
            f"-m set --match-set {family.set_name('masq-ipam-pools')} src "
            f"-m set ! --match-set {family.set_name('all-ipam-pools')} dst"
        )
        if config.nat_outgoing_exclusions == "IPPoolsAndHostIPs":
            match += f" -m set ! --match-set {family.set_name('all-hosts-net')} dst"
        if config.nat_outgoing_interface_filter:
            match = f"-o {config.nat_outgoing_interface_filter} {match}"
        address = config.nat_outgoing_address
        snat_here = address and (":" in address) == (nat.version == 6)
        ports = config.nat_port_range
        if snat_here:
            to = f"[{address}]" if nat.version == 6 else address
            action = f"-j SNAT --to-source {to}{':' + ports if ports else ''} --random-fully"
            port_action = action
        else:
            action = "-j MASQUERADE --random-fully"
            port_action = f"-j MASQUERADE --to-ports {ports} --random-fully"
        if ports:
            outgoing += [f"{match} -p {proto} {port_action}" for proto in ("tcp", "udp")]
        outgoing.append(f"{match} {action}")
    return {"cali-POSTROUTING": post, "cali-fip-snat": [], "cali-nat-outgoing": outgoing}


def _saved_rules(text: str) -> dict[str, list[tuple[str | None, str]]]:
    """iptables-save's nat table: chain -> [(cali hash or None, rule text after -A chain)]."""
    chains: dict[str, list[tuple[str | None, str]]] = {}
    for line in text.splitlines():
        if line.startswith(":"):
            chains.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            _, chain, rest = line.split(" ", 2)
            match = _COMMENT.search(rest)
            chains.setdefault(chain, []).append((match[1] if match else None, rest))
    return chains


class MasqManager:
    def apply(self, sets: Mapping[int, NatSets], config: FelixConfig) -> list[str]:
        fixed = []
        # One read serves both families: their set names never overlap.
        current = _saved_sets(_run(["ipset", "save"])) if sets else {}
        for version, nat in sets.items():
            family = Family(version)
            fixed += self._ipsets(family, nat, current)
            fixed += self._chains(family, desired_rules(nat, config))
        return fixed

    # -- ipsets

    def _ipsets(self, family: Family, nat: NatSets, current: Mapping[str, set[str]]) -> list[str]:
        """`current` is `ipset save` as `_saved_sets` parses it."""
        members = dict(zip(_SET_KINDS, (nat.masquerade, nat.all_pools, nat.hosts), strict=True))
        script, fixed = [], []
        for kind, wanted in members.items():
            name = family.set_name(kind)
            have = current.get(name)
            if have is not None and have == {str(ipaddress.ip_network(m)) for m in wanted}:
                continue
            create = f"hash:net family {family.ipset_family} maxelem 1048576"
            if have is None:
                script.append(f"create {name} {create}")
                script += [f"add {name} {m}" for m in wanted]
                fixed.append(f"created ipset {name} ({len(wanted)} members)")
                continue
            temp = family.temp_set_name(kind)
            script += [f"create {temp} {create} -exist", f"flush {temp}"]
            script += [f"add {temp} {m}" for m in wanted]
            script += [f"swap {temp} {name}", f"destroy {temp}"]
            fixed.append(f"ipset {name}: {sorted(have)} -> {list(wanted)}")
        if script:
            _run(["ipset", "restore"], "\n".join(script) + "\n")
        return fixed

    # -- chains

    def _chains(self, family: Family, rules: dict[str, list[str]]) -> list[str]:
        saved = _saved_rules(_run([family.save, "-t", "nat"]))
        tagged = {chain: _hashed(chain, chain_rules) for chain, chain_rules in rules.items()}
        (jump,) = _hashed(TOP_CHAIN, ["-j cali-POSTROUTING"])
        fixed = []
        rewrite = [
            chain
            for chain, want in tagged.items()
            if [h for h, _ in saved.get(chain, [])] != [h for h, _ in want] or chain not in saved
        ]
        top = saved.get(TOP_CHAIN, [])
        ours_at_top = [h for h, _ in top if h is not None]
        top_ok = ours_at_top == [jump[0]] and top and top[0][0] == jump[0]
        if not rewrite and top_ok:
            return fixed
        lines = ["*nat"]
        lines += [f":{chain} - [0:0]" for chain in CHAINS]
        for chain in CHAINS:
            lines += [f"-A {chain} {rule}" for _, rule in tagged[chain]]
        if not top_ok:
            lines += [f"-D {TOP_CHAIN} {rule}" for h, rule in top if h is not None]
            lines.append(f"-I {TOP_CHAIN} 1 {jump[1]}")
            fixed.append(f"IPv{family.version} nat {TOP_CHAIN}: jump to cali-POSTROUTING first")
        _restore(family, lines)
        fixed += [f"IPv{family.version} nat chain {c} rewritten" for c in rewrite]
        return fixed


def _saved_sets(text: str) -> dict[str, set[str]]:
    sets: dict[str, set[str]] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "create":
            sets.setdefault(words[1], set())
        elif len(words) >= 3 and words[0] == "add":
            # hash:net prints a host as a bare address; compare as networks
            sets.setdefault(words[1], set()).add(str(ipaddress.ip_network(words[2])))
    return sets


def remove_all() -> list[str]:
    """Uninstall: the jump, Felix's nat chains and its ipsets, both families."""
    removed = []
    for version in (4, 6):
        family = Family(version)
        try:
            saved = _saved_rules(_run([family.save, "-t", "nat"]))
        except NatError:
            continue
        ours = [c for c in CHAINS if c in saved]
        top = [rule for h, rule in saved.get(TOP_CHAIN, []) if h is not None]
        if ours or top:
            lines = ["*nat", *(f":{c} - [0:0]" for c in ours)]
            lines += [f"-D {TOP_CHAIN} {rule}" for rule in top]
            lines += [f"-X {c}" for c in ours]
            _restore(family, lines)
            removed += [f"IPv{version} nat chain {c}" for c in ours]
    try:
        present = _saved_sets(_run(["ipset", "save"]))
    except NatError:
        return removed
    names = [Family(v).set_name(k) for v in (4, 6) for k in _SET_KINDS]
    doomed = [n for n in names if n in present]
    if doomed:
        _run(["ipset", "restore"], "".join(f"destroy {n}\n" for n in doomed))
        removed += [f"ipset {n}" for n in doomed]
    return removed

"""The host MTU and the `mtu` file the CNI reads (calico-node.md §2.11).

Host MTU: the smallest MTU among up interfaces matching `mtuIfacePattern`, Felix's tunnel
devices excluded; none matching -> 1460, with a warning. The file holds the MTU new pods
get (the model's choice: the smallest enabled encapsulation's, else the host's), as bare
digits without a newline, mode 0644, replaced atomically so the CNI never reads half.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Mapping
from pathlib import Path

from calico_node.felix.model import FALLBACK_HOST_MTU, IPIP_DEVICE, VXLAN_DEVICE
from calico_node.felix.netlink import Link
from calico_node.paths import write_atomic

log = logging.getLogger("felix")

_OWN_DEVICES = {*VXLAN_DEVICE.values(), IPIP_DEVICE}


def host_mtu(links: Mapping[str, Link], pattern: str) -> int | None:
    """None when no interface matches (the caller warns and assumes 1460)."""
    matcher = re.compile(pattern)
    mtus = [
        link.mtu
        for name, link in links.items()
        if link.up and name not in _OWN_DEVICES and matcher.search(name)
    ]
    return min(mtus) if mtus else None


def detect(links: Mapping[str, Link], pattern: str, warned: set[str]) -> int:
    found = host_mtu(links, pattern)
    if found is not None:
        return found
    warning = (
        "Failed to auto-detect host MTU - no interfaces matched the MTU interface pattern "
        f"{pattern!r}; assuming {FALLBACK_HOST_MTU} (set mtuIfacePattern)"
    )
    if warning not in warned:
        log.warning("%s", warning)
        warned.add(warning)
    return FALLBACK_HOST_MTU


def write_file(path: Path, mtu: int) -> bool:
    """Write the file when its content differs; True when it did."""
    text = str(mtu)
    with contextlib.suppress(OSError):
        if path.read_text() == text:
            return False
    write_atomic(path, text)
    return True


def remove_file(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True

"""`calicoctl node status`: this node's calico-node and its BGP peers, from BIRD's socket.

The output is calicoctl v3.29's (calico-node.md §5.1): `Calico process is running.`, then
for each family a tablewriter table of the Calico peers (PEER ADDRESS, PEER TYPE, STATE,
SINCE, INFO) or `No IPv4 peers found.`. One BIRD 2 serves both families here, so both
sections come from `CALICO_RUN_DIR/bird.ctl`; "running" is decided per node by that
directory (calico-node's lock, BIRD's socket), not by a process scan, so simulated nodes
on one machine each report their own.
"""

from __future__ import annotations

import argparse
import os
import sys

from calico_node import birdctl
from calico_node.instance import locked_pid
from calico_node.paths import NodePaths
from calicoctl.errors import CommandError

HEADERS = ("Peer address", "Peer type", "State", "Since", "Info")
MAX_CELL = 30  # tablewriter's default wrap width


def _wrap(text: str) -> list[str]:
    """tablewriter's word wrap at 30 columns (a longer word stays whole)."""
    if len(text) <= MAX_CELL:
        return [text]
    lines: list[str] = []
    current = ""
    for word in text.split():
        if current and len(current) + 1 + len(word) > MAX_CELL:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    lines.append(current)
    return lines


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def table(rows: list[list[str]]) -> str:
    """olekukonko/tablewriter v0.0.5 with calicoctl's settings: borders, upper-case
    centred headers, left-aligned cells (numbers right-aligned), wrapped at 30."""
    headers = [h.upper() for h in HEADERS]
    wrapped = [[_wrap(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in wrapped:
        for i, lines in enumerate(row):
            widths[i] = max(widths[i], *(len(line) for line in lines))
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def centred(text: str, width: int) -> str:
        left = (width - len(text)) // 2
        return " " * left + text + " " * (width - len(text) - left)

    out = [
        rule,
        "| " + " | ".join(centred(h, w) for h, w in zip(headers, widths, strict=True)) + " |",
        rule,
    ]
    for row in wrapped:
        height = max(len(lines) for lines in row)
        for n in range(height):
            cells = []
            for lines, width in zip(row, widths, strict=True):
                text = lines[n] if n < len(lines) else ""
                cells.append(text.rjust(width) if _is_number(text) else text.ljust(width))
            out.append("| " + " | ".join(cells) + " |")
    out.append(rule)
    return "\n".join(out)


def report(paths: NodePaths) -> tuple[int, str]:
    """(exit code, what `calicoctl node status` prints); CommandError (stderr, exit 1)
    when no calico-node runs for `paths`."""
    if locked_pid(paths.daemon_lock) is None:
        raise CommandError("Calico process is not running.")
    out = ["Calico process is running."]
    try:
        peers = birdctl.peers(paths.bird_socket)
    except birdctl.BirdError as err:
        if not paths.bird_socket.exists():
            out += ["", "INFO: BIRDv4 process: 'bird' is not running."]
            out += ["", "INFO: BIRDv6 process: 'bird6' is not running."]
            out += ["", "The BGP backend process (BIRD) is not running.", ""]
            return 0, "\n".join(out) + "\n"
        return 1, "\n".join(
            out
        ) + f"\nError querying BIRD: unable to connect to BIRDv4 socket: {err}"
    for family in (4, 6):
        rows = [[p.address, p.type, p.state, p.since, p.info] for p in peers if p.family == family]
        out += ["", f"IPv{family} BGP status"]
        out.append(table(rows) if rows else f"No IPv{family} peers found.")
    out.append("")
    return 0, "\n".join(out) + "\n"


def run(opts: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise CommandError("This command must be run as root.")
    code, text = report(NodePaths.from_env())
    sys.stdout.write(text)
    return code

"""A client of BIRD's control socket (what `birdc` speaks), and the protocol table read
from it.

The protocol is line based: BIRD greets with `0001 BIRD <version> ready.`; each command
gets reply lines `<4-digit code><-| ><text>` (or a space and text continuing the previous
code), the last one with a space after its code. Codes 8xxx and 9xxx are errors. Used by
the daemon (reload, liveness, readiness) and by `calicoctl node status`; no process is
spawned for it.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path

TIMEOUT_S = 5.0
# calico-node.md §1.4: the protocol names are an API; other protocols are not peers.
PEER_NAME = re.compile(r"^(Global|Node|Mesh)_(.+)$")
PEER_TYPES = {"Mesh": "node-to-node mesh", "Global": "global", "Node": "node specific"}


class BirdError(Exception):
    """BIRD cannot be reached, or refused the command (the message says which)."""


@dataclass(frozen=True)
class Reply:
    code: int  # the code of the last line
    lines: list[tuple[int, str]]

    @property
    def ok(self) -> bool:
        return self.code < 8000

    def text(self) -> str:
        return "\n".join(text for _, text in self.lines)


class BirdControl:
    """One connection to a BIRD control socket."""

    def __init__(self, path: str | Path, timeout: float = TIMEOUT_S) -> None:
        self.path = str(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(self.path)
        except OSError as err:
            sock.close()
            raise BirdError(
                f"unable to connect to BIRD socket {self.path}: {err.strerror or err}"
            ) from err
        self._sock = sock
        self._reader = sock.makefile("rb")
        try:
            self.banner = self._reply()
        except BaseException:
            self.close()
            raise

    def _reply(self) -> Reply:
        lines: list[tuple[int, str]] = []
        code = 0
        while True:
            try:
                raw = self._reader.readline(1 << 20)
            except OSError as err:
                raise BirdError(f"BIRD socket {self.path}: {err}") from err
            if not raw.endswith(b"\n"):
                raise BirdError(f"BIRD socket {self.path} closed mid-reply")
            line = raw.rstrip(b"\n").decode(errors="replace")
            if line[:1] == " ":
                lines.append((code, line[1:]))
                continue
            if len(line) < 5 or not line[:4].isdigit() or line[4] not in "- ":
                raise BirdError(f"unexpected output line from BIRD: {line!r}")
            code = int(line[:4])
            lines.append((code, line[5:]))
            if line[4] == " ":
                return Reply(code, lines)

    def command(self, text: str) -> Reply:
        try:
            self._sock.sendall(text.encode() + b"\n")
        except OSError as err:
            raise BirdError(f"BIRD socket {self.path}: {err}") from err
        return self._reply()

    def close(self) -> None:
        self._reader.close()
        self._sock.close()

    def __enter__(self) -> BirdControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run(path: str | Path, command: str, timeout: float = TIMEOUT_S) -> Reply:
    """One command on a fresh connection."""
    with BirdControl(path, timeout) as bird:
        return bird.command(command)


@dataclass(frozen=True)
class Protocol:
    """One row of `show protocols`."""

    name: str
    proto: str
    table: str
    state: str
    since: str
    info: str


@dataclass(frozen=True)
class Peer:
    """A BGP protocol of Calico's naming, as `calicoctl node status` shows it."""

    address: str
    type: str  # node-to-node mesh | global | node specific
    state: str
    since: str
    info: str

    @property
    def established(self) -> bool:
        return self.info.split(" ", 1)[0] == "Established"

    @property
    def family(self) -> int:
        return 6 if ":" in self.address else 4


def parse_protocols(reply: Reply) -> list[Protocol]:
    """The rows of `show protocols` (BIRD 2's capitalised headings, BIRD 1's lower-case)."""
    headings = [text for code, text in reply.lines if code == 2002]
    if not headings or headings[0].lower().split() != [
        "name",
        "proto",
        "table",
        "state",
        "since",
        "info",
    ]:
        raise BirdError(f"unknown BIRD table output format: {headings[:1]}")
    rows = []
    for code, text in reply.lines:
        if code != 1002:
            continue
        fields = text.split()
        if len(fields) < 5:
            continue
        name, proto, table, state, since = fields[:5]
        rows.append(Protocol(name, proto, table, state, since, " ".join(fields[5:])))
    return rows


def peer_of(protocol: Protocol) -> Peer | None:
    """The Calico peer a BGP protocol is, None for every other protocol."""
    match = PEER_NAME.match(protocol.name)
    if protocol.proto != "BGP" or match is None:
        return None
    kind, suffix = match.groups()
    suffix = suffix.split("_port_", 1)[0]
    address = suffix.replace("_", ".") if suffix.count("_") == 3 else suffix.replace("_", ":")
    # BIRD 2 prints Since as `hh:mm:ss` with `timeformat protocol iso short` (bird.cfg).
    return Peer(address, PEER_TYPES[kind], protocol.state, protocol.since, protocol.info)


def peers(path: str | Path) -> list[Peer]:
    """Calico's BGP peers of the BIRD at `path`."""
    return [p for proto in parse_protocols(run(path, "show protocols")) if (p := peer_of(proto))]

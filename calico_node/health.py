"""Health: the daemon's status endpoint, and the probes Calico's DaemonSet runs.

`calico-node -felix-live -bird-live` and `calico-node -felix-ready -bird-ready` are separate
processes (kubelet's exec probes). The `-felix-*` checks ask the running daemon over a
root-only Unix socket in CALICO_RUN_DIR, which answers with one JSON document of its
state and closes: a socket rather than Felix's TCP port 9099, so that simulated nodes on
one machine never collide and the probe exercises the daemon itself. The `-bird-*` checks
talk to BIRD's own control socket, as calico-node's do (calico-node.md §5.5).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from calico_node import birdctl
from calico_node.paths import NodePaths

PROBE_TIMEOUT_S = 5.0
DEFAULT_THRESHOLD_S = 30.0


@dataclass
class Status:
    """What the daemon says of itself."""

    live: bool
    ready: bool
    reasons: list[str] = field(default_factory=list)
    nodename: str = ""
    pid: int = field(default_factory=os.getpid)


class HealthServer:
    """Answers each connection with `status()` as JSON, then closes it."""

    def __init__(self, path: Path, status: Callable[[], Status]) -> None:
        self.path = path
        self.status = status
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        listener.bind(str(tmp))
        os.chmod(tmp, 0o600)
        listener.listen(16)
        os.replace(tmp, self.path)
        self._listener = listener
        self._thread = threading.Thread(target=self._serve, name="health", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed by stop()
            with conn:
                try:
                    conn.settimeout(PROBE_TIMEOUT_S)
                    conn.sendall(json.dumps(asdict(self.status())).encode())
                except Exception:  # a probe that went away must not stop the endpoint
                    continue

    def stop(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        if self._thread is not None:
            self._thread.join(5)


def query(path: Path) -> dict[str, Any]:
    """The daemon's status; OSError/ValueError when it does not answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(PROBE_TIMEOUT_S)
        sock.connect(str(path))
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return json.loads(b"".join(chunks))


# ------------------------------------------------------------------ probes


def felix_problem(paths: NodePaths, want: str) -> str | None:
    """None when the daemon is `want` (live / ready), else why not."""
    try:
        status = query(paths.health_socket)
    except (OSError, ValueError) as err:
        return f"felix is not {want}: calico-node does not answer on {paths.health_socket}: {err}"
    if status.get(want):
        return None
    reasons = "; ".join(status.get("reasons") or []) or "not yet"
    return f"felix is not {want}: {reasons}"


def bird_live_problem(paths: NodePaths) -> str | None:
    try:
        reply = birdctl.run(paths.bird_socket, "show status")
    except birdctl.BirdError as err:
        return f"bird/confd is not live: {err}"
    banner = reply.lines[0][1] if reply.lines else ""
    if not banner.startswith("BIRD"):
        return f"bad response from bird: {reply.text()!r}"
    return None


def bird_ready_problem(paths: NodePaths, threshold_s: float) -> tuple[str | None, int]:
    """(why BIRD is not ready or None, how many peers are established)."""
    try:
        peers = birdctl.peers(paths.bird_socket)
        status = birdctl.run(paths.bird_socket, "show status")
    except birdctl.BirdError as err:
        return f"BIRD is not ready: Error querying BIRD: {err}", 0
    established = [p for p in peers if p.established]
    if not peers:
        return None, 0
    try:
        started = paths.nodename_file.stat().st_mtime
    except OSError:
        started = 0.0
    if time.time() - started < threshold_s:
        down = [p.address for p in peers if not p.established]
        if down:
            return f"BIRD is not ready: BGP not established with {','.join(down)}", len(established)
        if any(code == 24 for code, _ in status.lines):  # 0024: graceful restart in progress
            return "BIRD is not ready: graceful restart in progress", len(established)
        return None, len(established)
    if not established:
        down = ",".join(p.address for p in peers)
        return f"BIRD is not ready: BGP not established with {down}", 0
    return None, len(established)


def probe(paths: NodePaths, checks: list[str], threshold_s: float) -> tuple[int, list[str]]:
    """Run the checks Calico's flags name; (exit code, lines to print)."""
    problems: list[str] = []
    lines: list[str] = []
    for check in checks:
        if check == "felix-live":
            problem = felix_problem(paths, "live")
        elif check == "felix-ready":
            problem = felix_problem(paths, "ready")
        elif check == "bird-live":
            problem = bird_live_problem(paths)
        else:
            problem, established = bird_ready_problem(paths, threshold_s)
            lines.append(f"Number of node(s) with BGP peering established = {established}")
        if problem:
            problems.append(problem)
    lines += [f"calico/node is not ready: {p}" for p in problems]
    return (1 if problems else 0), lines

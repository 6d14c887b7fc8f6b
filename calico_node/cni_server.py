"""The node's CNI fast-path server (`calico agent`): it keeps the heavy imports warm and
serves the CNI executables' requests.

A one-shot plugin spends ~100 ms importing the standard library and its own modules before
doing anything (bench/README.md); the agent pays that once and serves each executable's
request over a root-only Unix socket, one thread per connection (wire format in
agent_client). A request runs the very code a one-shot plugin runs (`roles.execute` with
the request's environment and stdin); its log records go back to the caller's stderr. IPAM
type `calico-ipam` runs in-process, as in a one-shot plugin. Datastore clients stay open
between requests (datastore/kept.py); the data is not cached: pools, blocks and node labels
are read from the datastore every time, so they are never stale.

Node-wide IPAM serialisation is the same flock as in one-shot plugins: each request opens
the lock file itself, and flocks on separate open file descriptions exclude each other
within one process as they do across processes.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import fcntl
import importlib
import logging
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass

from cni_plugin import agent_client, logs, roles, skel
from libcalico.datastore.config import keep_clients_open

COMPONENT = "cni-agent"
DEFAULT_SOCKET = agent_client.DEFAULT_SOCKET.decode()
DEFAULT_DRAIN_S = 30.0
# The frame arrives right after connect; a client that stalls must not pin a thread.
RECEIVE_TIMEOUT_S = 5.0
MAX_REQUEST_BYTES = 16 * 1024 * 1024
# Everything a request may import lazily, imported once at start instead.
WARM_MODULES = (
    "cni_plugin.plugin",
    "cni_plugin.dataplane.veth",
    "cni_plugin.dataplane.check",
    "cni_plugin.k8s",
    "ipam_plugin.main",
    "ipam_plugin.engine",
    "ipam_plugin.range_mode",
    "libcalico.datastore.local",
    "libcalico.datastore.etcd",
    "libcalico.datastore.kubernetes",
)
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

log = logging.getLogger(COMPONENT)


class ServeError(Exception):
    """The server cannot start; printed as one line, exit 1."""


class BadRequest(Exception):
    """The bytes on the socket are not a request frame."""


@dataclass
class AgentRequest:
    """One decoded request frame."""

    role: str
    netns: bytes
    environ: dict[str, str]
    stdin: bytes

    @classmethod
    def decode(cls, body: bytes) -> AgentRequest:
        head, sep, stdin = body.partition(b"\0\0")
        fields = head.split(b"\0")
        if not sep or len(fields) < 3 or fields[0] != agent_client.MAGIC:
            raise BadRequest("not a calico agent request")
        role = fields[1].decode(errors="replace")
        if role not in roles.ROLES:
            raise BadRequest(f"unknown role {role!r}")
        environ = {}
        for item in fields[3:]:
            key, eq, value = item.partition(b"=")
            if not eq or not key:
                raise BadRequest("malformed environment entry")
            environ[os.fsdecode(key)] = os.fsdecode(value)
        return cls(role, fields[2], environ, stdin)


# ------------------------------------------------------------------ running one request

_request_environ: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "calico_request_environ", default=None
)


class RequestEnviron(MutableMapping[str, str]):
    """`os.environ` as the request served on this thread sees it: the caller's environment.

    The request's environment travels on skel.Request; this covers code that reads
    os.environ directly (datastore settings, FELIX_INTERFACEPREFIX), so it sees what it
    would see in a one-shot plugin. Outside a request it is the agent's own environment.
    """

    def __init__(self, own: MutableMapping[str, str]) -> None:
        self.own = own

    def _env(self) -> MutableMapping[str, str]:
        env = _request_environ.get()
        return self.own if env is None else env

    def __getitem__(self, key: str) -> str:
        return self._env()[key]

    def __setitem__(self, key: str, value: str) -> None:
        self._env()[key] = value

    def __delitem__(self, key: str) -> None:
        del self._env()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._env()))

    def __len__(self) -> int:
        return len(self._env())

    def copy(self) -> dict[str, str]:
        return dict(self._env())


@contextmanager
def _environ_of(environ: dict[str, str]) -> Iterator[None]:
    token = _request_environ.set(environ)
    try:
        yield
    finally:
        _request_environ.reset(token)


def execute(role: str, environ: dict[str, str], stdin: bytes) -> tuple[skel.Outcome, str]:
    """Run one request of `role` on this thread; returns its outcome and its stderr."""
    with _environ_of(environ):
        return roles.execute(role, environ, lambda: stdin)


def prepare_process() -> None:
    """Import what requests need, and make the process safe for concurrent requests."""
    for name in WARM_MODULES:
        importlib.import_module(name)
    if not isinstance(os.environ, RequestEnviron):
        # Python-level view only (B003): children started without env= still get the
        # agent's own environment; the IPAM exec passes the request's explicitly.
        os.environ = RequestEnviron(os.environ)  # type: ignore[assignment]  # noqa: B003
    roles.delegate_ipam_in_process()


# ------------------------------------------------------------------ the socket


def _check_directory(directory: str) -> None:
    """The socket's directory must not let anyone but root replace the socket."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.stat(directory)
    if st.st_uid != 0 or st.st_mode & 0o022:
        raise ServeError(
            f"calico agent: {directory} must be owned by root and not group/world-writable"
        )


def _hold_instance_lock(path: str) -> int:
    """One agent per socket: the flock is held for the agent's life, so a leftover socket
    file is known to be stale and can be removed."""
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ServeError(f"calico agent: another agent is serving {path}") from None
    return fd


def _listen(path: str) -> socket.socket:
    """Bind under a temporary name, make it 0600, then rename: the socket never exists at
    `path` with looser permissions, and a stale one is replaced atomically."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener.bind(tmp)
    os.chmod(tmp, 0o600)
    listener.listen(128)
    os.rename(tmp, path)
    return listener


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return _UCRED.unpack(creds)[1]


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = conn.recv(min(remaining, 1 << 20))
        if not chunk:
            raise BadRequest("connection closed mid-request")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _recv_frame(conn: socket.socket) -> bytes:
    head = b""
    while not head.endswith(b"\n"):
        byte = conn.recv(1)
        if not byte or len(head) > 20:
            raise BadRequest("malformed request header")
        head += byte
    if not head[:-1].isdigit() or int(head) > MAX_REQUEST_BYTES:
        raise BadRequest("malformed request header")
    return _recv_exact(conn, int(head))


# ------------------------------------------------------------------ the server


class Agent:
    """Accepts connections until stopped, then lets in-flight requests finish (bounded)."""

    def __init__(self, socket_path: str, drain_seconds: float = DEFAULT_DRAIN_S) -> None:
        self.socket_path = socket_path
        self.drain_seconds = drain_seconds
        self.netns = agent_client.netns_id()
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._threads: set[threading.Thread] = set()
        self._threads_lock = threading.Lock()

    def request_stop(self) -> None:
        """Safe from a signal handler: the byte on the pipe wakes the accept loop's select."""
        self._stopping = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def serve(self) -> None:
        _check_directory(os.path.dirname(self.socket_path) or ".")
        lock_fd = _hold_instance_lock(self.socket_path)
        try:
            listener = _listen(self.socket_path)
            log.info("serving CNI requests", extra={"fields": {"Socket": self.socket_path}})
            try:
                self._accept_until_stopped(listener)
            finally:
                listener.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.socket_path)  # from now on, clients work standalone
            self._drain()
        finally:
            os.close(lock_fd)

    def _accept_until_stopped(self, listener: socket.socket) -> None:
        while not self._stopping:
            readable, _, _ = select.select([listener, self._wake_r], [], [])
            if listener in readable and not self._stopping:
                conn, _ = listener.accept()
                thread = threading.Thread(target=self._connection, args=(conn,), daemon=True)
                with self._threads_lock:
                    self._threads.add(thread)
                thread.start()

    def _drain(self) -> None:
        with self._threads_lock:
            threads = list(self._threads)
        log.info("stopping: %d request(s) in flight", len(threads))
        deadline = time.monotonic() + self.drain_seconds
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        left = sum(t.is_alive() for t in threads)
        if left:
            log.error("%d request(s) still running after %.0fs; exiting", left, self.drain_seconds)

    def _connection(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._handle(conn)
        except OSError as exc:
            log.warning("connection dropped: %s", exc)
        except Exception:
            log.exception("request handling failed")
        finally:
            with self._threads_lock:
                self._threads.discard(threading.current_thread())

    def _handle(self, conn: socket.socket) -> None:
        uid = _peer_uid(conn)
        if uid != 0:
            log.warning("refused a client running as uid %d: root only", uid)
            conn.sendall(agent_client.REFUSED + b"permission denied: the agent serves root only")
            return
        conn.settimeout(RECEIVE_TIMEOUT_S)
        try:
            request = AgentRequest.decode(_recv_frame(conn))
        except BadRequest as exc:
            log.warning("bad request: %s", exc)
            conn.sendall(agent_client.REFUSED + f"bad request: {exc}".encode())
            return
        if request.netns != self.netns:
            conn.sendall(agent_client.NOT_MINE)
            return
        if self._stopping:
            conn.sendall(agent_client.REFUSED + b"the agent is stopping")
            return
        conn.sendall(agent_client.READY)
        if conn.recv(1) != agent_client.GO:
            return  # the client went its own way: nothing was done
        conn.settimeout(None)
        started = time.monotonic()
        log.debug("running CNI request", extra={"fields": _fields(request)})
        outcome, stderr = execute(request.role, request.environ, request.stdin)
        _log_served(request, outcome.code, started)  # before the reply: the caller may look
        head = b"%d %d\n" % (outcome.code, len(outcome.stdout))
        conn.sendall(head + outcome.stdout + stderr.encode("utf-8", "backslashreplace"))


def _fields(request: AgentRequest) -> dict[str, str]:
    return {
        "Role": request.role,
        "Command": request.environ.get("CNI_COMMAND", ""),
        "ContainerID": request.environ.get("CNI_CONTAINERID", ""),
    }


def _log_served(request: AgentRequest, code: int, started: float) -> None:
    duration = f"{(time.monotonic() - started) * 1000:.1f}ms"
    fields = {**_fields(request), "Code": code, "Duration": duration}
    log.info("served CNI request", extra={"fields": fields})


# ------------------------------------------------------------------ `calico agent`


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calico agent", description="Serve the CNI executables' requests on this node."
    )
    parser.add_argument(
        "--socket",
        default=os.environ.get(agent_client.SOCKET_ENV.decode()) or DEFAULT_SOCKET,
        help=f"Unix socket to serve (default: $CALICO_AGENT_SOCKET or {DEFAULT_SOCKET})",
    )
    parser.add_argument(
        "--drain-seconds",
        type=float,
        default=DEFAULT_DRAIN_S,
        help="on SIGTERM, how long in-flight requests may take to finish",
    )
    parser.add_argument("--log-level", default="info", help="debug, info or error")
    parser.add_argument("--log-file", default="", help="also log to this rotating file")
    return parser


def main(argv: list[str]) -> int:
    opts = build_parser().parse_args(argv)
    try:
        return run(opts)
    except ServeError as err:
        print(err, file=sys.stderr)
        return 1
    except OSError as err:  # the socket's directory or file cannot be made: one line
        print(f"calico agent: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def run(opts: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise ServeError("calico agent: must run as root (it serves root-only CNI requests)")
    logs.route_requests(COMPONENT, opts.log_level, opts.log_file)
    prepare_process()
    kept = keep_clients_open()
    agent = Agent(os.path.abspath(opts.socket), opts.drain_seconds)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: agent.request_stop())
    try:
        agent.serve()
    finally:
        kept.close()
    log.info("stopped")
    return 0

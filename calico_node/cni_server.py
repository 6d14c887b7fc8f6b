"""The node's CNI fast-path server (in calico-node, or alone as `calico agent`): it keeps
the heavy imports warm and serves the CNI executables' requests.

A one-shot plugin spends ~100 ms importing the standard library and its own modules before
doing anything (bench/README.md); the agent pays that once and serves each executable's
request over a root-only Unix socket, one thread per connection (wire format in
agent_client). A request runs the very code a one-shot plugin runs (`roles.execute` with
the request's environment and stdin); its log records go back to the caller's stderr. IPAM
type `calico-ipam` runs in-process, as in a one-shot plugin. Datastore clients stay open
between requests (datastore/kept.py). The server caches no data of its own: each request
reads pools and node labels, and the blocks it uses, from the datastore; the IPAM block
hints it shares with one-shot plugins (a file beside the IPAM lock) only choose which
block to read first, never an address.

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
from cni_plugin.dataplane import netns
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
    netns_fd: int | None = None  # CNI_NETNS as the client opened it

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


def execute(
    role: str, environ: dict[str, str], stdin: bytes, netns_fd: int | None = None
) -> tuple[skel.Outcome, str]:
    """Run one request of `role` on this thread; returns its outcome and its stderr."""
    with contextlib.ExitStack() as scope:
        scope.enter_context(_environ_of(environ))
        if netns_fd is not None and environ.get("CNI_NETNS"):
            scope.enter_context(netns.handed_over(environ["CNI_NETNS"], netns_fd))
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


_MAX_HEAD = 20


def _received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds += [int.from_bytes(data[i : i + 4], sys.byteorder) for i in range(0, usable, 4)]
    return fds


def _recv_frame(conn: socket.socket) -> tuple[bytes, list[int]]:
    """The request frame, and the descriptors that came with its first bytes (the caller
    closes them)."""
    data, fds = b"", []
    try:
        while b"\n" not in data:
            chunk, ancdata, _, _ = conn.recvmsg(
                65536, socket.CMSG_SPACE(4 * 4), socket.MSG_CMSG_CLOEXEC
            )
            fds += _received_fds(ancdata)
            if not chunk:
                raise BadRequest("connection closed mid-request")
            data += chunk
            if b"\n" not in data and len(data) > _MAX_HEAD:
                raise BadRequest("malformed request header")
        head, _, body = data.partition(b"\n")
        if not head.isdigit() or len(head) > _MAX_HEAD or int(head) > MAX_REQUEST_BYTES:
            raise BadRequest("malformed request header")
        size = int(head)
        while len(body) < size:
            chunk = conn.recv(min(size - len(body), 1 << 20))
            if not chunk:
                raise BadRequest("connection closed mid-request")
            body += chunk
        if len(body) > size:
            raise BadRequest("bytes after the request frame")
        return body, fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


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
        self._listener: socket.socket | None = None
        self._lock_fd: int | None = None

    def request_stop(self) -> None:
        """Safe from a signal handler: the byte on the pipe wakes the accept loop's select."""
        self._stopping = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def bind(self) -> None:
        """Take the socket (its directory checked, one server per socket): ServeError."""
        _check_directory(os.path.dirname(self.socket_path) or ".")
        self._lock_fd = _hold_instance_lock(self.socket_path)
        try:
            self._listener = _listen(self.socket_path)
        except BaseException:
            os.close(self._lock_fd)
            raise
        log.info("serving CNI requests", extra={"fields": {"Socket": self.socket_path}})

    def serve(self) -> None:
        """Accept until stopped, then drain (binding first if `bind` was not called)."""
        if self._listener is None:
            self.bind()
        assert self._listener is not None and self._lock_fd is not None
        try:
            try:
                self._accept_until_stopped(self._listener)
            finally:
                self._listener.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.socket_path)  # from now on, clients work standalone
            self._drain()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path + ".lock")  # still held: no successor has it yet
            os.close(self._lock_fd)

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
            body, fds = _recv_frame(conn)
        except BadRequest as exc:
            log.warning("bad request: %s", exc)
            conn.sendall(agent_client.REFUSED + f"bad request: {exc}".encode())
            return
        try:
            self._serve(conn, body, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def _serve(self, conn: socket.socket, body: bytes, fds: list[int]) -> None:
        try:
            request = AgentRequest.decode(body)
        except BadRequest as exc:
            log.warning("bad request: %s", exc)
            conn.sendall(agent_client.REFUSED + f"bad request: {exc}".encode())
            return
        if len(fds) > 1:
            conn.sendall(agent_client.REFUSED + b"bad request: more than one descriptor")
            return
        request.netns_fd = fds[0] if fds else None
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
        outcome, stderr = execute(request.role, request.environ, request.stdin, request.netns_fd)
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

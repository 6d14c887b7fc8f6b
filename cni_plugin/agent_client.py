"""The executables' fast path: hand the invocation to the node agent when one answers.

Only builtin modules (`_socket`, `posix`, `sys`) are imported, so a PyInstaller bundle
loads nothing from disk before the agent takes over (agent-prototype.md §3). For the same
reason there is no dataclass (dataclasses imports inspect) and no JSON: the frame below is
binary-safe as it is, with no escaping to get wrong.

One request per connection:

    client -> agent   b"<n>\\n" and n bytes: MAGIC \\0 role \\0 netns \\0 K=V \\0 ... \\0\\0 stdin
                      with CNI_NETNS opened and passed along as a descriptor (SCM_RIGHTS)
    agent -> client   READY, NOT_MINE (it serves another netns) or REFUSED + a message
    client -> agent   GO: from here on the agent owns the request
    agent -> client   b"<exit code> <stdout length>\\n", stdout, the request's stderr, EOF

The READY/GO exchange makes falling back safe: the agent runs nothing before GO, and the
client does the job itself only when it never sent GO.

The pod's netns travels as an open descriptor, not only as its path: an agent in another
mount namespace (calico-node in a container, or started under `ip netns exec`) does not
see the bind mounts of namespaces created after it started, but can use a descriptor.
`netns` in the frame is the caller's own netns (where the host-side veth goes), which the
agent must share.
"""

import _socket
import posix
import sys

# The roles a request may name: the CNI plugin and its IPAM plugin.
PLUGIN_ROLE = "calico"
IPAM_ROLE = "calico-ipam"
DEFAULT_SOCKET = b"/var/run/calico/cni-agent.sock"
SOCKET_ENV = b"CALICO_AGENT_SOCKET"
MAGIC = b"calico-cni-agent/1"
READY = b"R"
NOT_MINE = b"N"
REFUSED = b"E"
GO = b"G"
CONNECT_TIMEOUT_S = 0.1
# Long enough for a busy agent to start the connection's thread (tens of ms under load).
READY_TIMEOUT_S = 1.0
OWN_NETNS = b"/proc/self/ns/net"
# Calico's run directory; the socket lives there unless CALICO_AGENT_SOCKET says otherwise.
RUN_DIR_ENV = b"CALICO_RUN_DIR"
SOCKET_NAME = b"cni-agent.sock"


class Handoff:
    """How the hand-off went. `code` is the agent's exit code, or None when this process
    must do the job; `stdin` is what was already read from fd 0; `lost` means the agent
    took the request (GO) and went away without answering."""

    __slots__ = ("code", "lost", "stdin")

    def __init__(self, code: int | None = None, stdin: bytes | None = None, lost: bool = False):
        self.code = code
        self.stdin = stdin
        self.lost = lost


def netns_id(path: bytes = OWN_NETNS) -> bytes:
    """`<st_dev>:<st_ino>` of a network namespace: the agent must be in the caller's."""
    st = posix.stat(path)
    return b"%d:%d" % (st.st_dev, st.st_ino)


def encode_request(role: bytes, netns: bytes, environ: dict[bytes, bytes], stdin: bytes) -> bytes:
    fields = [MAGIC, role, netns]
    fields += [key + b"=" + value for key, value in environ.items()]
    body = b"\0".join(fields) + b"\0\0" + stdin
    return b"%d\n" % len(body) + body


def _read_stdin() -> bytes:
    if posix.isatty(0):
        return b""
    chunks = []
    while True:
        chunk = posix.read(0, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _recv_until_eof(sock: _socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def parse_reply(reply: bytes) -> tuple[int, bytes, bytes] | None:
    """(exit code, stdout, stderr) from a complete reply, None from a truncated one."""
    head, sep, rest = reply.partition(b"\n")
    parts = head.split(b" ")
    if not sep or len(parts) != 2 or not parts[0].isdigit() or not parts[1].isdigit():
        return None
    length = int(parts[1])
    if len(rest) < length:
        return None
    return int(parts[0]), rest[:length], rest[length:]


def _write_all(fd: int, data: bytes) -> None:
    try:
        while data:
            data = data[posix.write(fd, data) :]
    except OSError:
        pass  # a runtime that stopped reading gets what a one-shot plugin would: nothing


def _connect(path: bytes) -> _socket.socket | None:
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(CONNECT_TIMEOUT_S)
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    return sock


def socket_path(environ: dict[bytes, bytes]) -> bytes:
    """CALICO_AGENT_SOCKET, else cni-agent.sock in CALICO_RUN_DIR, else the default."""
    explicit = environ.get(SOCKET_ENV)
    if explicit:
        return explicit
    run_dir = environ.get(RUN_DIR_ENV)
    return run_dir.rstrip(b"/") + b"/" + SOCKET_NAME if run_dir else DEFAULT_SOCKET


def _open_netns() -> int | None:
    """CNI_NETNS opened for the agent, None when unset or unopenable (a DEL whose netns is
    gone: the agent then goes by the path, as a one-shot plugin would)."""
    path = posix.environ.get(b"CNI_NETNS")
    if not path:
        return None
    try:
        return posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC | posix.O_NONBLOCK)
    except OSError:
        return None


def _send_request(sock: _socket.socket, frame: bytes, netns_fd: int | None) -> None:
    if netns_fd is None:
        sock.sendall(frame)
        return
    rights = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, netns_fd.to_bytes(4, sys.byteorder))]
    sent = sock.sendmsg([frame], rights)  # the descriptor rides on the first bytes
    if sent < len(frame):
        sock.sendall(frame[sent:])


def hand_off(role: bytes) -> Handoff:
    """Send this invocation to the agent; print its answer and return its exit code."""
    sock = _connect(socket_path(posix.environ))
    if sock is None:
        return Handoff()
    try:
        try:
            stdin = _read_stdin()
        except OSError:
            return Handoff()  # let the plugin read (and report) it itself
        netns_fd = _open_netns()
        try:
            sock.settimeout(READY_TIMEOUT_S)
            frame = encode_request(role, netns_id(), posix.environ, stdin)
            _send_request(sock, frame, netns_fd)
            if sock.recv(1) != READY:
                return Handoff(stdin=stdin)
            sock.settimeout(None)
            sock.sendall(GO)
        except OSError:
            return Handoff(stdin=stdin)
        finally:
            if netns_fd is not None:
                posix.close(netns_fd)
        try:
            reply = parse_reply(_recv_until_eof(sock))
        except OSError:
            reply = None
    finally:
        sock.close()
    if reply is None:
        return Handoff(stdin=stdin, lost=True)
    code, out, err = reply
    _write_all(1, out)
    _write_all(2, err)
    return Handoff(code=code)


def exec_name() -> str:
    """The name we were invoked as (argv[0] of the link; CALICO_EXEC_NAME when a wrapper
    script runs the program, as the tests' source-tree wrappers do)."""
    name = posix.environ.get(b"CALICO_EXEC_NAME")
    return name.decode() if name else sys.argv[0].rpartition("/")[2]

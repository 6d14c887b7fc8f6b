"""A minimal HTTP/1.1 client connection on a plain socket (optionally TLS), keep-alive.

`http.client` would pull in `email.parser` and friends on every CNI invocation (tens of
milliseconds, see k8s_client.py); the API servers this talks to frame every response with
Content-Length or chunked encoding, which is all this handles.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ssl

_MAX_HEADER_LINES = 100
_MAX_LINE = 65537
# A watch stream's peer is declared dead after ~25 s of silence to keepalive probes.
_KEEPALIVE = ((socket.TCP_KEEPIDLE, 10), (socket.TCP_KEEPINTVL, 5), (socket.TCP_KEEPCNT, 3))


def authority(host: str, port: int | str) -> str:
    """`host:port`, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class URLParts:
    scheme: str
    host: str
    port: str  # as written; may be empty or not a number: the caller decides
    path: str  # from its first "/" ("" when none)


def split_url(url: str, default_scheme: str) -> URLParts | None:
    """An http(s) URL's parts, `default_scheme` when it names none; None when it is not
    http(s) or names no host. Parsed by hand: urllib.parse would cost every CNI call an
    import."""
    scheme, sep, rest = url.strip().partition("://")
    if not sep:
        scheme, rest = default_scheme, url.strip()
    netloc, slash, path = rest.partition("/")
    if netloc.startswith("["):
        host, _, port = netloc[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = netloc.partition(":")
    if scheme not in ("http", "https") or not host:
        return None
    return URLParts(scheme, host, port, slash + path)


class BadResponse(Exception):
    """The peer sent something that is not an HTTP/1.1 response we can frame."""


@dataclass
class Response:
    """Status, lower-cased headers and the whole body of one response."""

    status: int
    headers: dict[str, str]
    body: bytes


class Connection:
    """One open HTTP/1.1 connection; `keep_alive` is False once the peer said it closes.
    `request` reads whole responses; `stream` hands one over as it arrives (watches)."""

    def __init__(
        self,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        connect_timeout: float,
        request_timeout: float,
        server_hostname: str | None = None,
    ) -> None:
        sock = socket.create_connection((host, port), connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                sock.settimeout(connect_timeout)  # the handshake counts as connecting
                sock = tls.wrap_socket(sock, server_hostname=server_hostname or host)
            sock.settimeout(request_timeout)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._reader = sock.makefile("rb")
        self._host = authority(host, port)
        self.keep_alive = True

    def _send(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self._host}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        self._sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes = b""
    ) -> Response:
        self._send(method, path, headers, body)
        status = self._status_line()
        reply_headers = self._headers()
        if reply_headers.get("transfer-encoding", "").lower() == "chunked":
            reply = self._chunked_body()
        elif "content-length" in reply_headers:
            reply = self._exactly(int(reply_headers["content-length"]))
        elif status in (204, 304) or method == "HEAD":
            reply = b""
        else:
            raise BadResponse("response without a length")
        self.keep_alive = reply_headers.get("connection", "").lower() != "close"
        return Response(status, reply_headers, reply)

    def stream(
        self, method: str, path: str, headers: dict[str, str], body: bytes = b""
    ) -> tuple[int, Iterator[bytes]]:
        """Send a request whose response goes on (a watch): its status and its body's lines
        as they arrive. The socket then blocks without timeout (TCP keepalive finds a dead
        peer); `close` from another thread ends the iteration with an OSError."""
        self._send(method, path, headers, body)
        status = self._status_line()
        reply_headers = self._headers()
        self.keep_alive = False
        self._sock.settimeout(None)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in _KEEPALIVE:
            self._sock.setsockopt(socket.IPPROTO_TCP, option, value)
        if reply_headers.get("transfer-encoding", "").lower() == "chunked":
            return status, _lines(self._chunks())
        if "content-length" in reply_headers:
            return status, _lines(iter([self._exactly(int(reply_headers["content-length"]))]))
        return status, _lines(iter(self._reader.readline, b""))

    def _chunks(self) -> Iterator[bytes]:
        while size := int(self._line().split(b";", 1)[0], 16):
            yield self._exactly(size)
            self._line()

    def _line(self) -> bytes:
        line = self._reader.readline(_MAX_LINE)
        if not line.endswith(b"\n"):
            raise BadResponse("connection closed mid-response")
        return line.rstrip(b"\r\n")

    def _status_line(self) -> int:
        version, _, rest = self._line().partition(b" ")
        if not version.startswith(b"HTTP/1."):
            raise BadResponse(f"not an HTTP response: {version[:40]!r}")
        return int(rest[:3])

    def _headers(self) -> dict[str, str]:
        headers = {}
        for _ in range(_MAX_HEADER_LINES):
            line = self._line()
            if not line:
                return headers
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        raise BadResponse("too many header lines")

    def _chunked_body(self) -> bytes:
        chunks = []
        while size := int(self._line().split(b";", 1)[0], 16):
            chunks.append(self._exactly(size))
            self._line()
        while self._line():  # trailers
            pass
        return b"".join(chunks)

    def _exactly(self, size: int) -> bytes:
        data = self._reader.read(size)
        if len(data) != size:
            raise BadResponse("connection closed mid-body")
        return data

    def interrupt(self) -> None:
        """Wake a thread blocked reading a stream (from another thread)."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._reader.close()
        self._sock.close()


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Newline-delimited records from chunks that may split or join them."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        yield from (line for line in complete if line.strip())
    if pending.strip():
        yield pending


class KeptConnection:
    """Requests to one server over one kept-alive connection, opened on first use.

    A server may close an idle kept-alive connection at any time, so a request that fails on
    a reused connection is sent once more on a fresh one; a failure on a fresh connection
    reaches the caller. The callers' writes are compare-and-swap or creates, so a resend
    never applies twice.
    """

    def __init__(
        self,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        connect_timeout: float,
        request_timeout: float,
    ) -> None:
        self._address = (host, port)
        self._tls = tls
        self._timeouts = (connect_timeout, request_timeout)
        self._conn: Connection | None = None

    def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes = b""
    ) -> Response:
        """The response; OSError, ValueError or BadResponse when the server is unusable."""
        while True:
            reused = self._conn is not None
            try:
                conn = self._connection()
                reply = conn.request(method, path, headers, body)
            except (OSError, ValueError, BadResponse):
                self.close()
                if reused:
                    continue
                raise
            if not conn.keep_alive:
                self.close()
            return reply

    def _connection(self) -> Connection:
        if self._conn is None:
            self._conn = Connection(*self._address, self._tls, *self._timeouts)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

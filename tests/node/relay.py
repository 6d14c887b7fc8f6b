"""The host's loopback servers (etcd, the API server) seen at the same address from inside
the simulated nodes' network namespaces.

A node netns has its own loopback, so a daemon in it cannot reach the etcd the tests run on
the host's 127.0.0.1. The relay opens, inside each node netns, a listener on 127.0.0.1 at
the same port (a socket created while a thread is in a netns stays there), and pipes each
connection to the host's server: the daemons use the very endpoints and certificates the
tests use, and nothing is added to the host's own network. Stopping the server makes the
relay refuse, as the server would.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading

from cni_plugin.dataplane.netns import entered


class LoopbackRelay:
    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self._listeners: list[socket.socket] = []
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()

    def add_netns(self, netns_path: str) -> None:
        fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with entered(fd):
                listeners = []
                for port in self.ports:
                    listener = socket.socket(
                        socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC
                    )
                    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    listener.bind(("127.0.0.1", port))
                    listener.listen(64)
                    listeners.append((listener, port))
        finally:
            os.close(fd)
        for listener, port in listeners:
            self._listeners.append(listener)
            threading.Thread(target=self._accept, args=(listener, port), daemon=True).start()

    def _accept(self, listener: socket.socket, port: int) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", port), timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()  # the server is down: the client sees its connection end
                continue
            with self._lock:
                self._open.update((client, server))
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            for sock in (src, dst):
                if sock in self._open:
                    self._open.discard(sock)
                    sock.close()

    def drop_connections(self) -> None:
        """Cut every relayed connection (as a server that died would)."""
        with self._lock:
            open_now = list(self._open)
        for sock in open_now:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for listener in self._listeners:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        self._listeners.clear()
        self.drop_connections()

"""A real etcd for tests: Debian's `/usr/bin/etcd` on loopback, free ports, a temp data dir.

Three shapes, all started the same way: one plain member (`start_etcd`), one member that
requires client certificates made here with `openssl` (`start_etcd(tls=...)`), and a
three-member cluster (`start_etcd(members=3)`). Members are stopped by their own PID.

Use from any test module or conftest.py:

    from tests.etcd_fixture import etcd, etcd_tls, etcd_cluster  # noqa: F401

or call `start_etcd(tmp_dir, ...)` directly for a custom shape.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from libcalico.datastore.config import DatastoreSettings
from libcalico.datastore.etcd import EtcdDatastore

ETCD_BINARY = "/usr/bin/etcd"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


@dataclass
class TLSFiles:
    """PEM files of one test PKI: a CA, a server cert for 127.0.0.1, a client cert."""

    ca_cert: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_cert)
        context.load_cert_chain(self.client_cert, self.client_key)
        return context


@dataclass
class EtcdMember:
    """One etcd process and where it listens."""

    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    scheme: str
    process: subprocess.Popen[bytes] | None = None
    # How it was first started (set by `_spawn`), so `restart` starts it the same way.
    _initial_cluster: str = field(default="", repr=False)
    _token: str = field(default="", repr=False)
    _tls: TLSFiles | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def log_file(self) -> Path:
        return self.data_dir.parent / f"{self.name}.log"

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop this member by its PID (SIGKILL simulates a crash)."""
        if self.process is not None:
            stop_process(self.process, STOP_TIMEOUT, sig)

    def restart(self, wait: bool = True) -> None:
        """Start this stopped member again on its own data dir and ports, with the flags it
        was first started with (etcd ignores those naming the initial cluster once the data
        dir exists, so it rejoins as itself). With `wait`, return once it is healthy, which
        in a cluster needs a quorum of members running."""
        if self.is_running():
            raise RuntimeError(f"etcd {self.name} is still running")
        if not self._initial_cluster:
            raise RuntimeError(f"etcd {self.name} was never started")
        _spawn(self, self._initial_cluster, self._token, self._tls)
        if wait:
            wait_healthy(self, self._tls)


@dataclass
class EtcdCluster:
    """Running etcd members; `endpoints` is the comma-separated form Calico takes."""

    members: list[EtcdMember]
    tls: TLSFiles | None = None

    @property
    def endpoints(self) -> str:
        return ",".join(member.endpoint for member in self.members)

    @property
    def endpoint(self) -> str:
        return self.members[0].endpoint

    def netconf(self) -> dict[str, str]:
        """The netconf keys that point the plugin at this cluster."""
        conf = {"datastore_type": "etcdv3", "etcd_endpoints": self.endpoints}
        if self.tls:
            conf.update(
                etcd_ca_cert_file=self.tls.ca_cert,
                etcd_cert_file=self.tls.client_cert,
                etcd_key_file=self.tls.client_key,
            )
        return conf

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    # Raw gateway access, independent of the plugin's own client, for checking what it wrote.

    def raw(self, path: str, request: dict[str, Any]) -> dict[str, Any]:
        """POST `request` to the gateway `path` (e.g. /v3/kv/range) of a running member."""
        member = next(m for m in self.members if m.is_running())
        conn = _http_connection(member, self.tls)
        try:
            conn.request("POST", path, json.dumps(request), {"Content-Type": "application/json"})
            response = conn.getresponse()
            body = json.loads(response.read())
            if response.status != 200:
                raise RuntimeError(f"etcd {path} answered {response.status}: {body}")
            return body
        finally:
            conn.close()

    def raw_items(self, prefix: str = "/") -> dict[str, str]:
        """Every key under `prefix` with its value, as stored."""
        reply = self.raw("/v3/kv/range", {"key": _b64(prefix), "range_end": _prefix_end(prefix)})
        return {
            base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode()
            for kv in reply.get("kvs", [])
        }

    def raw_json(self, prefix: str = "/calico/") -> dict[str, Any]:
        """Every key under `prefix` with its JSON value, as stored."""
        return {key: json.loads(value) for key, value in self.raw_items(prefix).items()}

    def open_store(self) -> EtcdDatastore:
        """Through the plugin's own settings, as calico-ipam opens it."""
        store = DatastoreSettings.resolve(self.netconf(), environ={}).open()
        assert isinstance(store, EtcdDatastore)
        return store

    def raw_put(self, key: str, value: str) -> None:
        self.raw("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})

    def wipe(self) -> None:
        """Delete every key, so one cluster can serve many tests."""
        self.raw("/v3/kv/deleterange", {"key": _b64("\0"), "range_end": _b64("\0")})


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _prefix_end(prefix: str) -> str:
    raw = prefix.encode()
    return base64.b64encode(raw[:-1] + bytes([raw[-1] + 1])).decode()


def free_port() -> int:
    """A loopback port nobody listens on right now (etcd may still lose a race for it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_tls_files(directory: Path) -> TLSFiles:
    """A throwaway CA plus server (SAN 127.0.0.1, localhost) and client certificates."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = directory / "ca.key", directory / "ca.pem"
    _openssl(
        "req", "-x509", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-keyout", ca_key, "-out", ca_cert, "-days", "2", "-subj", "/CN=test-etcd-ca",
    )  # fmt: skip
    issued = {}
    for role, extensions in (
        # etcd 3.4's JSON gateway dials its own gRPC port presenting the server
        # certificate as a client certificate, so it needs clientAuth as well.
        (
            "server",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth",
        ),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        key, csr, cert = (directory / f"{role}.{ext}" for ext in ("key", "csr", "pem"))
        ext_file = directory / f"{role}.ext"
        ext_file.write_text(extensions + "\n")
        _openssl(
            "req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-keyout", key, "-out", csr, "-subj", f"/CN=test-etcd-{role}",
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial",
            "-out", cert, "-days", "2", "-extfile", ext_file,
        )  # fmt: skip
        issued[role] = (str(cert), str(key))
    return TLSFiles(str(ca_cert), *issued["server"], *issued["client"])


def _openssl(*args: object) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def start_etcd(directory: Path, members: int = 1, tls: TLSFiles | None = None) -> EtcdCluster:
    """Start `members` etcd processes forming one cluster and wait until it serves requests.

    With `tls`, clients must use https and present a certificate signed by `tls.ca_cert`.
    """
    scheme = "https" if tls else "http"
    cluster = EtcdCluster(
        [
            EtcdMember(f"m{i}", free_port(), free_port(), directory / f"m{i}.etcd", scheme)
            for i in range(members)
        ],
        tls,
    )
    initial = ",".join(f"{m.name}={m.peer_url}" for m in cluster.members)
    try:
        for member in cluster.members:
            _spawn(member, initial, f"test-{cluster.members[0].client_port}", tls)
        for member in cluster.members:
            wait_healthy(member, tls)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _spawn(member: EtcdMember, initial_cluster: str, token: str, tls: TLSFiles | None) -> None:
    member._initial_cluster, member._token, member._tls = initial_cluster, token, tls
    args = [
        ETCD_BINARY,
        f"--name={member.name}",
        f"--data-dir={member.data_dir}",
        f"--listen-client-urls={member.endpoint}",
        f"--advertise-client-urls={member.endpoint}",
        f"--listen-peer-urls={member.peer_url}",
        f"--initial-advertise-peer-urls={member.peer_url}",
        f"--initial-cluster={initial_cluster}",
        "--initial-cluster-state=new",
        f"--initial-cluster-token={token}",
        "--logger=zap",
        "--log-outputs=stderr",
        "--log-level=warn",
    ]
    if tls:
        args += [
            f"--cert-file={tls.server_cert}",
            f"--key-file={tls.server_key}",
            f"--trusted-ca-file={tls.ca_cert}",
            "--client-cert-auth",
        ]
    member.data_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(member.log_file, "wb") as log:
        member.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )


def wait_healthy(member: EtcdMember, tls: TLSFiles | None) -> None:
    """Poll `/health` until the member reports a working cluster (it has a leader)."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if not member.is_running():
            raise RuntimeError(f"etcd {member.name} exited:\n{_log_tail(member)}")
        if _health(member, tls):
            return
        time.sleep(0.05)
    raise RuntimeError(f"etcd {member.name} not healthy:\n{_log_tail(member)}")


def _log_tail(member: EtcdMember) -> str:
    return log_tail(member.log_file, 20)


def log_tail(log: Path, lines: int) -> str:
    """The last `lines` lines of a server's log, for a failure message."""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def stop_process(
    process: subprocess.Popen[bytes], timeout: float, sig: signal.Signals = signal.SIGTERM
) -> None:
    """Stop a server we started, by its PID: `sig`, then SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    os.kill(process.pid, sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()


def _http_connection(member: EtcdMember, tls: TLSFiles | None) -> http.client.HTTPConnection:
    if tls:
        return http.client.HTTPSConnection(
            "127.0.0.1", member.client_port, timeout=5, context=tls.client_context()
        )
    return http.client.HTTPConnection("127.0.0.1", member.client_port, timeout=5)


def _health(member: EtcdMember, tls: TLSFiles | None) -> bool:
    conn = _http_connection(member, tls)
    try:
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read()).get("health") == "true"
    except (OSError, ValueError, http.client.HTTPException):
        return False
    finally:
        conn.close()


# ----------------------------------------------------------------- pytest fixtures


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    """One plain-http member, fresh per test."""
    cluster = start_etcd(tmp_path / "etcd")
    yield cluster
    cluster.stop()


@pytest.fixture
def etcd_tls(tmp_path: Path) -> Iterator[EtcdCluster]:
    """One https member that requires a client certificate (see `cluster.tls`)."""
    cluster = start_etcd(tmp_path / "etcd", tls=make_tls_files(tmp_path / "pki"))
    yield cluster
    cluster.stop()


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """Three plain-http members forming one cluster."""
    cluster = start_etcd(tmp_path / "etcd", members=3)
    yield cluster
    cluster.stop()

"""The `etcdv3` datastore: Calico's keys and JSON values in a real etcd, through its gateway.

Client choice, measured on this 2-core VM while the team's tests ran (load average 6-50,
so compare the rows, not the absolute figures; cost-floor.md §6 has the quiet ones):

  extra import time on top of calico-ipam's own imports (min / p50 of 21 processes)
    etcd3gw.client (requests, futurist, ...)   181-280 / 408-491 ms
    http.client + base64                        32-41  /  65-68  ms
      of which ssl alone                        18-20  /  27-30  ms (email.parser: most else)
    this module, whole (socket already loaded)      6  /     19  ms
  put+get pair on one keep-alive connection, p50 of 500, the three clients interleaved
    etcd3gw 6.0 ms, http.client 2.6 ms, this module 1.9 ms

So this module speaks HTTP/1.1 to etcd's JSON gateway (`/v3/kv/range`, `/v3/kv/txn`,
base64 keys and values) over a plain `socket`, and imports `ssl` only for https
endpoints. Every request is a small POST whose response etcd frames with Content-Length
or chunked encoding; that is all the HTTP this needs.

One keep-alive connection per process. A connection failure moves to the next endpoint;
when every endpoint has failed on a fresh connection the operation raises
DatastoreUnavailable naming them. Each attempt is bounded (connect ~2 s, request ~5 s).
A request whose reply was lost may be sent again; every write is guarded by a compare,
so a resent write can only report Conflict/AlreadyExists (as a racing writer would),
never apply twice.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from libcalico.datastore.base import (
    AlreadyExists,
    Conflict,
    Datastore,
    DatastoreCorrupt,
    DatastoreError,
    DatastoreUnavailable,
    KVPair,
    NotFound,
)
from libcalico.datastore.http11 import (
    BadResponse,
    Connection,
    KeptConnection,
    authority,
    split_url,
)
from libcalico.model import (
    Key,
    ListOptions,
    decode_value,
    encode_value,
    key_from_path,
    key_path,
    list_matches,
    list_prefix,
)

if TYPE_CHECKING:
    import ssl

_JSON_HEADERS = {"Content-Type": "application/json"}
CONNECT_TIMEOUT = 2.0
REQUEST_TIMEOUT = 5.0
# gRPC codes etcd returns when this member cannot serve now (no leader, timeout):
# another member may, so they fail over like a refused connection.
_GRPC_UNAVAILABLE = {4, 14}
_ABSENT = {"target": "VERSION", "result": "EQUAL", "version": "0"}
_PRESENT = {"target": "VERSION", "result": "GREATER", "version": "0"}


@dataclass(frozen=True)
class Endpoint:
    """One etcd client URL."""

    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str, default_scheme: str = "http") -> Endpoint:
        """`https://10.0.0.1:2379`, or `10.0.0.1:2379` with `default_scheme` (etcd_scheme)."""
        parts = split_url(url, default_scheme or "http")
        if parts is None:
            raise DatastoreUnavailable(f"etcd endpoint {url!r} is not an http(s) URL")
        if not parts.port:
            return cls(parts.scheme, parts.host, 2379)
        if not parts.port.isdigit() or not 0 < int(parts.port) < 65536:
            raise DatastoreUnavailable(f"etcd endpoint {url!r} has a bad port")
        return cls(parts.scheme, parts.host, int(parts.port))

    @property
    def url(self) -> str:
        return f"{self.scheme}://{authority(self.host, self.port)}"


@dataclass(frozen=True)
class TLSFiles:
    """Client certificate, key and CA for https endpoints (each optional)."""

    cert_file: str = ""
    key_file: str = ""
    ca_cert_file: str = ""

    def context(self) -> ssl.SSLContext:
        import ssl  # only https endpoints pay for it (~20 ms)

        try:
            context = ssl.create_default_context(cafile=self.ca_cert_file or None)
            if self.cert_file:
                context.load_cert_chain(self.cert_file, self.key_file or None)
        except (OSError, ssl.SSLError) as err:
            raise DatastoreUnavailable(
                f"etcd TLS files unusable (cert {self.cert_file!r}, key {self.key_file!r}, "
                f"CA {self.ca_cert_file!r}): {err}"
            ) from err
        return context


class EtcdGateway:
    """POSTs JSON to etcd's gateway on one kept-alive connection, failing over in order."""

    def __init__(self, endpoints: list[Endpoint], tls: TLSFiles | None = None) -> None:
        if not endpoints:
            raise DatastoreUnavailable("no etcd endpoints configured")
        self.endpoints = endpoints
        self._tls = tls
        self._context: ssl.SSLContext | None = None
        self._current = 0
        self._http: KeptConnection | None = None  # to endpoints[_current]
        self.round_trips = 0

    def call(self, path: str, request: dict[str, Any]) -> dict[str, Any]:
        payload = json.dumps(request, separators=(",", ":")).encode()
        failures: dict[str, str] = {}
        while len(failures) < len(self.endpoints):
            endpoint = self.endpoints[self._current]
            try:
                reply = self._connection(endpoint).request("POST", path, _JSON_HEADERS, payload)
            except (OSError, ValueError, BadResponse) as err:
                self._next_endpoint(failures, endpoint, str(err) or type(err).__name__)
                continue
            self.round_trips += 1
            if reply.status == 200:
                return _json_reply(endpoint, path, reply.body)
            error = _error_reply(reply.body)
            if error.get("code") not in _GRPC_UNAVAILABLE and reply.status not in (503, 504):
                raise DatastoreError(
                    f"etcd at {endpoint.url} refused {path}: {error.get('message') or reply.status}"
                )
            self._next_endpoint(failures, endpoint, str(error.get("message") or reply.status))
        detail = "; ".join(f"{url}: {error}" for url, error in failures.items())
        raise DatastoreUnavailable(f"no etcd endpoint reachable ({detail})")

    def open_stream(self, path: str, request: dict[str, Any]) -> tuple[Connection, Any]:
        """A streaming POST (the watch) on its own connection, to the first endpoint that
        takes it: the connection and its response lines."""
        payload = json.dumps(request, separators=(",", ":")).encode()
        failures: dict[str, str] = {}
        for _ in self.endpoints:
            endpoint = self.endpoints[self._current]
            conn = None
            try:
                conn = Connection(
                    endpoint.host, endpoint.port, self._tls_context(endpoint),
                    CONNECT_TIMEOUT, REQUEST_TIMEOUT,
                )  # fmt: skip
                status, lines = conn.stream("POST", path, _JSON_HEADERS, payload)
                if status == 200:
                    return conn, lines
                why = f"HTTP {status}"
            except (OSError, ValueError, BadResponse) as err:
                why = str(err) or type(err).__name__
            if conn is not None:
                conn.close()
            failures[endpoint.url] = why
            self._current = (self._current + 1) % len(self.endpoints)
        detail = "; ".join(f"{url}: {error}" for url, error in failures.items())
        raise DatastoreUnavailable(f"no etcd endpoint reachable ({detail})")

    def _tls_context(self, endpoint: Endpoint) -> ssl.SSLContext | None:
        if endpoint.scheme != "https":
            return None
        if self._context is None:
            self._context = (self._tls or TLSFiles()).context()
        return self._context

    def _next_endpoint(self, failures: dict[str, str], endpoint: Endpoint, why: str) -> None:
        self.close()
        failures[endpoint.url] = why
        self._current = (self._current + 1) % len(self.endpoints)

    def _connection(self, endpoint: Endpoint) -> KeptConnection:
        if self._http is None:
            self._http = KeptConnection(
                endpoint.host,
                endpoint.port,
                self._tls_context(endpoint),
                CONNECT_TIMEOUT,
                REQUEST_TIMEOUT,
            )
        return self._http

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None


def _json_reply(endpoint: Endpoint, path: str, body: bytes) -> dict[str, Any]:
    try:
        return json.loads(body)
    except ValueError as err:
        raise DatastoreError(f"etcd at {endpoint.url} sent invalid JSON for {path}") from err


def _error_reply(body: bytes) -> dict[str, Any]:
    """The gateway's `{"error", "code", "message"}`, or the raw text of anything else."""
    try:
        reply = json.loads(body)
    except ValueError:
        reply = None
    if isinstance(reply, dict):
        return reply
    return {"message": body[:200].decode(errors="replace").strip()}


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def _prefix_end(prefix: str) -> str:
    """etcd's range_end for "every key starting with prefix"."""
    raw = prefix.encode()
    return base64.b64encode(raw[:-1] + bytes([raw[-1] + 1])).decode("ascii")


class EtcdDatastore(Datastore):
    """Calico's etcd v3 layout; CAS via txn on `version` (create) and `mod_revision`."""

    def __init__(self, endpoints: list[Endpoint], tls: TLSFiles | None = None) -> None:
        self._gateway = EtcdGateway(endpoints, tls)

    @property
    def round_trips(self) -> int:
        """HTTP requests answered so far; a bench divides it by the ADDs/DELs done."""
        return self._gateway.round_trips

    def _pair(self, key: Key, kv: dict[str, Any]) -> KVPair:
        path = key_path(key)
        try:
            value = decode_value(key, base64.b64decode(kv.get("value", "")).decode())
        except (ValueError, KeyError, TypeError) as err:
            raise DatastoreCorrupt(f"etcd key {path} does not hold a Calico object: {err}") from err
        return KVPair(key, value, kv["mod_revision"])

    def get(self, key: Key) -> KVPair:
        path = key_path(key)
        kvs = self._gateway.call("/v3/kv/range", {"key": _b64(path)}).get("kvs")
        if not kvs:
            raise NotFound(path)
        return self._pair(key, kvs[0])

    def list(self, options: ListOptions) -> list[KVPair]:
        return self.list_at(options)[0]

    def list_at(self, options: ListOptions, revision: str = "") -> tuple[list[KVPair], str]:
        """The pairs as of `revision` (now when ""), and the revision they are from."""
        prefix = list_prefix(options)
        request = {"key": _b64(prefix), "range_end": _prefix_end(prefix)}
        if revision:
            request["revision"] = revision
        reply = self._gateway.call("/v3/kv/range", request)
        pairs = []
        for kv in reply.get("kvs", []):
            key = key_from_path(base64.b64decode(kv["key"]).decode())
            if key is not None and list_matches(options, key):
                pairs.append(self._pair(key, kv))
        return pairs, revision or reply["header"]["revision"]

    @property
    def gateway(self) -> EtcdGateway:
        return self._gateway

    def _guarded(self, path: str, compare: dict[str, str], then: dict[str, Any]) -> str:
        """Run `then` on `path` if `compare` holds and return the new revision; otherwise
        raise Conflict (the key exists) or NotFound, learnt in the same round trip."""
        reply = self._gateway.call(
            "/v3/kv/txn",
            {
                "compare": [{"key": _b64(path), **compare}],
                "success": [then],
                "failure": [{"request_range": {"key": _b64(path), "keys_only": True}}],
            },
        )
        if reply.get("succeeded"):
            return reply["header"]["revision"]
        if reply["responses"][0]["response_range"].get("kvs"):
            raise Conflict(path)
        raise NotFound(path)

    @staticmethod
    def _unchanged_since(revision: str | None) -> dict[str, str]:
        """The compare for update/delete: same mod_revision, or (None) merely existing."""
        if revision is None:
            return _PRESENT
        return {"target": "MOD", "result": "EQUAL", "mod_revision": revision}

    def create(self, kvp: KVPair) -> KVPair:
        path = key_path(kvp.key)
        try:
            revision = self._guarded(path, _ABSENT, self._put(path, kvp))
        except Conflict as err:
            raise AlreadyExists(path) from err
        return KVPair(kvp.key, kvp.value, revision)

    def update(self, kvp: KVPair) -> KVPair:
        path = key_path(kvp.key)
        revision = self._guarded(path, self._unchanged_since(kvp.revision), self._put(path, kvp))
        return KVPair(kvp.key, kvp.value, revision)

    def delete(self, kvp: KVPair) -> None:
        path = key_path(kvp.key)
        remove = {"request_delete_range": {"key": _b64(path)}}
        self._guarded(path, self._unchanged_since(kvp.revision), remove)

    @staticmethod
    def _put(path: str, kvp: KVPair) -> dict[str, Any]:
        return {"request_put": {"key": _b64(path), "value": _b64(encode_value(kvp.value))}}

    def close(self) -> None:
        self._gateway.close()

"""Reaching the Kubernetes API server: credentials from a kubeconfig, JSON over HTTPS.

Client choice. The plugin is a fresh process per CNI call, so import time is paid on every
ADD and DEL. Measured on this 2-core VM while the team's tests ran (load average 18-50, so
compare rows, not absolute figures; 15 processes each, time of the import statement alone):

    import kubernetes (37.0.2: urllib3, six, dateutil, ...)   min 394 / p50 536 ms
    import kubernetes.client                                  min 376 / p50 538 ms
    import kubernetes.config (adds google-auth, ...)          min 493 / p50 642 ms
    import http.client, ssl                                   min  31 / p50  88 ms
    import json, socket, ssl, base64 (what this module uses)  min  28 / p50  42 ms
    import yaml (PyYAML; only for a kubeconfig in YAML)       min  21 / p50  53 ms

The official client would add roughly half a second to every pod start and stop (cost-floor.md
measured +470 ms on a quiet machine), for a handful of GET/PUT/POST/PATCH/DELETE requests
of small JSON documents. So this module speaks HTTP/1.1 itself (`http11.py`) on one
kept-alive TLS connection, and the datastore reuses it for all its requests.

Credentials are resolved the way Calico's CNI plugin does (`cni-plugin/pkg/k8s/k8s.go`
NewK8sClient, and libcalico-go's KUBECONFIG/K8S_* environment): the kubeconfig named by the
netconf's `kubernetes.kubeconfig`, else `KUBECONFIG`; overridden by `policy.k8s_api_root`,
`policy.k8s_auth_token`, `policy.k8s_client_certificate`, `policy.k8s_client_key`,
`policy.k8s_certificate_authority`, then `kubernetes.k8s_api_root`; with no kubeconfig at
all, the in-cluster service account. Every request is bounded (connect 2 s, reply 10 s).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from libcalico.datastore.base import (
    AlreadyExists,
    Conflict,
    DatastoreError,
    DatastoreUnavailable,
    InvalidDatastoreConfig,
    NotFound,
)
from libcalico.datastore.http11 import (
    BadResponse,
    Connection,
    KeptConnection,
    Response,
    authority,
    split_url,
)

if TYPE_CHECKING:
    import ssl

CONNECT_TIMEOUT = 2.0
REQUEST_TIMEOUT = 10.0
JSON = "application/json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
MERGE_PATCH = "application/merge-patch+json"
IN_CLUSTER_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
STALE_TOKEN_HINT = (
    "the API server rejected the credentials; the calico-cni-plugin service-account token "
    "in the kubeconfig is probably stale or revoked: let calico-node (or `calico install`) "
    "rewrite the kubeconfig with a fresh token"
)
MISSING_RIGHTS_HINT = (
    "the identity lacks RBAC rights: bind it to the calico-cni-plugin ClusterRole "
    "(conf/calico-cni-plugin-rbac.yaml)"
)


class Invalid(DatastoreError):
    """422: the API server refused the object; `fields` names what it refused."""

    def __init__(self, message: str, fields: list[str]) -> None:
        super().__init__(message)
        self.fields = fields


class KubeconfigError(DatastoreUnavailable):
    """The kubeconfig is missing or unusable (transient while the installer writes it)."""


@dataclass(frozen=True)
class ServerURL:
    """`https://host:port[/prefix]` of the API server."""

    scheme: str
    host: str
    port: int
    prefix: str = ""

    @classmethod
    def parse(cls, url: str) -> ServerURL:
        parts = split_url(url, "https")
        if parts is None or not (parts.port or "0").isdigit():
            raise KubeconfigError(f"Kubernetes API server {url!r} is not an http(s) URL")
        default_port = 443 if parts.scheme == "https" else 80
        port = int(parts.port) if parts.port else default_port
        return cls(parts.scheme, parts.host, port, parts.path.rstrip("/"))

    def __str__(self) -> str:
        return f"{self.scheme}://{authority(self.host, self.port)}{self.prefix}"


@dataclass
class KubeAccess:
    """Where the API server is and how to authenticate; `source` is named in errors."""

    server: str
    token: str = ""
    cert_file: str = ""
    key_file: str = ""
    cert_data: bytes = b""
    key_data: bytes = b""
    ca_file: str = ""
    ca_data: str = ""
    insecure: bool = False
    source: str = ""

    @classmethod
    def resolve(cls, conf: Mapping[str, Any], env: Mapping[str, str]) -> KubeAccess:
        """Netconf keys, then the K8S_* environment, over the kubeconfig (see module doc)."""
        kube = conf.get("kubernetes") or {}
        policy = conf.get("policy") or {}
        path = kube.get("kubeconfig") or conf.get("kubeconfig") or env.get("KUBECONFIG", "")
        access = cls.from_kubeconfig(path) if path else cls.in_cluster(env)
        api_root = (
            kube.get("k8s_api_root")
            or policy.get("k8s_api_root", "").split("/api/")[0]
            or env.get("K8S_API_ENDPOINT", "")
        )
        overrides = {
            "server": api_root,
            "token": policy.get("k8s_auth_token") or env.get("K8S_API_TOKEN", ""),
            "cert_file": policy.get("k8s_client_certificate") or env.get("K8S_CERT_FILE", ""),
            "key_file": policy.get("k8s_client_key") or env.get("K8S_KEY_FILE", ""),
            "ca_file": policy.get("k8s_certificate_authority") or env.get("K8S_CA_FILE", ""),
        }
        for name, value in overrides.items():
            if value:
                setattr(access, name, value)
        if env.get("K8S_INSECURE_SKIP_TLS_VERIFY", "").lower() == "true":
            access.insecure = True
        if not access.server:
            raise InvalidDatastoreConfig(
                "no Kubernetes API server configured (the Kubernetes datastore, policy.type "
                "k8s and usePodCidr need one)",
                "set kubernetes.kubeconfig in the CNI config (or KUBECONFIG), or "
                "kubernetes.k8s_api_root",
            )
        return access

    @classmethod
    def in_cluster(cls, env: Mapping[str, str]) -> KubeAccess:
        """The pod's service account, when running inside the cluster; else empty."""
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
        token_path = os.path.join(IN_CLUSTER_DIR, "token")
        if not (host and port and os.path.exists(token_path)):
            return cls(server="")
        return cls(
            server=f"https://{authority(host, port)}",
            token=_read_text(token_path, "in-cluster token").strip(),
            ca_file=os.path.join(IN_CLUSTER_DIR, "ca.crt"),
            source="in-cluster service account",
        )

    @classmethod
    def from_kubeconfig(cls, paths: str) -> KubeAccess:
        """The current context of the kubeconfig(s) at `paths` (colon-separated, as kubectl
        merges them: the first file naming a cluster, user or context wins)."""
        files = [p for p in paths.split(os.pathsep) if p]
        docs = [(p, _load_kubeconfig(p)) for p in files if len(files) == 1 or os.path.exists(p)]
        if not docs:
            raise KubeconfigError(f"kubeconfig {paths} does not exist")
        source = docs[0][0]
        current = next((d["current-context"] for _, d in docs if d.get("current-context")), "")
        context = _named(docs, "contexts", "context", current, source)
        cluster = _named(docs, "clusters", "cluster", context.get("cluster", ""), source)
        user = _named(docs, "users", "user", context.get("user", ""), source, optional=True)
        base = os.path.dirname(os.path.abspath(source))
        if "exec" in user or "auth-provider" in user:
            raise KubeconfigError(
                f"kubeconfig {source}: exec and auth-provider credentials are not supported; "
                "use a token or a client certificate"
            )
        token = user.get("token", "")
        if not token and user.get("tokenFile"):
            token = _read_text(_relative(base, user["tokenFile"]), "tokenFile").strip()
        return cls(
            server=cluster.get("server", ""),
            token=token,
            cert_file=_relative(base, user.get("client-certificate", "")),
            key_file=_relative(base, user.get("client-key", "")),
            cert_data=_b64(user.get("client-certificate-data", ""), source),
            key_data=_b64(user.get("client-key-data", ""), source),
            ca_file=_relative(base, cluster.get("certificate-authority", "")),
            ca_data=_b64(cluster.get("certificate-authority-data", ""), source).decode(),
            insecure=bool(cluster.get("insecure-skip-tls-verify", False)),
            source=source,
        )

    @property
    def described(self) -> str:
        return f"kubeconfig {self.source}" if self.source.startswith("/") else self.source

    def tls_context(self) -> ssl.SSLContext:
        import ssl

        try:
            if self.insecure:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            else:
                context = ssl.create_default_context(
                    cafile=self.ca_file or None, cadata=self.ca_data or None
                )
            if self.cert_file or self.cert_data:
                _load_client_cert(context, self)
        except (OSError, ssl.SSLError, ValueError) as err:
            raise KubeconfigError(
                f"TLS settings of {self.described or 'the Kubernetes client'} unusable: {err}"
            ) from err
        return context


def _read_text(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as err:
        raise KubeconfigError(f"cannot read {what} {path}: {err.strerror}") from err


def _load_kubeconfig(path: str) -> dict[str, Any]:
    text = _read_text(path, "kubeconfig")
    try:
        doc = json.loads(text) if text.lstrip().startswith("{") else _yaml(text)
    except ValueError as err:
        raise KubeconfigError(f"kubeconfig {path} is not valid YAML/JSON: {err}") from err
    if not isinstance(doc, dict):
        raise KubeconfigError(f"kubeconfig {path} is not a kubeconfig document")
    return doc


def _yaml(text: str) -> Any:
    import yaml  # only YAML kubeconfigs pay for it

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        return yaml.load(text, Loader=loader)
    except yaml.YAMLError as err:
        raise ValueError(str(err)) from err


def _named(
    docs: list[tuple[str, dict[str, Any]]],
    section: str,
    field: str,
    name: str,
    source: str,
    optional: bool = False,
) -> dict[str, Any]:
    for _, doc in docs:
        for entry in doc.get(section) or []:
            if isinstance(entry, dict) and entry.get("name") == name:
                return entry.get(field) or {}
    if optional:
        return {}
    raise KubeconfigError(f"kubeconfig {source} has no {field} named {name!r}")


def _relative(base: str, path: str) -> str:
    return os.path.join(base, path) if path and not os.path.isabs(path) else path


def _b64(text: str, source: str) -> bytes:
    import base64

    try:
        return base64.b64decode(text, validate=True) if text else b""
    except ValueError as err:
        raise KubeconfigError(f"kubeconfig {source}: a *-data field is not base64") from err


def _load_client_cert(context: ssl.SSLContext, access: KubeAccess) -> None:
    """ssl loads client certificates only from files: inline data goes through memfds."""
    if access.cert_file:
        context.load_cert_chain(access.cert_file, access.key_file or None)
        return
    fds = [os.memfd_create("kube-client-cert"), os.memfd_create("kube-client-key")]
    try:
        for fd, data in zip(fds, (access.cert_data, access.key_data), strict=True):
            os.write(fd, data)
        cert, key = (f"/proc/self/fd/{fd}" for fd in fds)
        context.load_cert_chain(cert, key if access.key_data else None)
    finally:
        for fd in fds:
            os.close(fd)


class KubeClient:
    """JSON requests to one API server on a kept-alive connection; errors as datastore
    errors (404 NotFound, 409 Conflict/AlreadyExists, 401/403 and unreachable
    DatastoreUnavailable, which the plugins report as CNI code 11)."""

    def __init__(self, access: KubeAccess) -> None:
        self.access = access
        self.server = ServerURL.parse(access.server)
        self._http: KeptConnection | None = None
        self._tls_context: ssl.SSLContext | None = None
        self.round_trips = 0

    def get(self, path: str, query: str = "") -> dict[str, Any]:
        return self.request("GET", path + (f"?{query}" if query else ""))

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = JSON
    ) -> dict[str, Any]:
        """Send `body` as JSON; the decoded reply, or the datastore error for its status."""
        payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = self._headers()
        if body is not None:
            headers["Content-Type"] = content_type
        reply = self._send(method, self.server.prefix + path, headers, payload)
        if 200 <= reply.status < 300:
            try:
                return json.loads(reply.body) if reply.body else {}
            except ValueError as err:
                raise DatastoreError(f"{method} {path}: the API server sent invalid JSON") from err
        raise self._error(method, path, reply)

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": JSON, "User-Agent": "calico-cni-python"}
        if self.access.token:
            headers["Authorization"] = f"Bearer {self.access.token}"
        return headers

    def stream(self, path: str, query: str) -> tuple[Connection, Iterator[bytes]]:
        """A GET whose response goes on (a watch), on a connection of its own: the
        connection (to interrupt and close) and the response's lines."""
        conn = None
        try:
            tls = self._tls() if self.server.scheme == "https" else None
            conn = Connection(
                self.server.host, self.server.port, tls, CONNECT_TIMEOUT, REQUEST_TIMEOUT
            )
            status, lines = conn.stream(
                "GET", f"{self.server.prefix}{path}?{query}", self._headers()
            )
        except (OSError, ValueError, BadResponse) as err:
            if conn is not None:
                conn.close()
            raise DatastoreUnavailable(
                f"Kubernetes API server {self.server} unreachable: {err or type(err).__name__}"
            ) from err
        if status != 200:
            body = b"\n".join(lines) if status < 500 else b""
            conn.close()
            raise self._error("GET", path, Response(status, {}, body))
        return conn, lines

    def _tls(self) -> ssl.SSLContext:
        if self._tls_context is None:
            self._tls_context = self.access.tls_context()
        return self._tls_context

    def _send(self, method: str, path: str, headers: dict[str, str], payload: bytes) -> Response:
        try:
            reply = self._connection().request(method, path, headers, payload)
        except (OSError, ValueError, BadResponse) as err:
            raise DatastoreUnavailable(
                f"Kubernetes API server {self.server} unreachable: {err or type(err).__name__}"
            ) from err
        self.round_trips += 1
        return reply

    def _connection(self) -> KeptConnection:
        if self._http is None:
            tls = self._tls() if self.server.scheme == "https" else None
            self._http = KeptConnection(
                self.server.host, self.server.port, tls, CONNECT_TIMEOUT, REQUEST_TIMEOUT
            )
        return self._http

    def _error(self, method: str, path: str, reply: Response) -> DatastoreError:
        status = _status_object(reply.body)
        message = status.get("message") or reply.body[:200].decode(errors="replace").strip()
        what = f"{method} {path}"
        if reply.status == 404:
            return NotFound(f"{what}: {message}")
        if reply.status == 409:
            exists = status.get("reason") == "AlreadyExists"
            return (AlreadyExists if exists else Conflict)(f"{what}: {message}")
        if reply.status == 422:
            causes = (status.get("details") or {}).get("causes") or []
            return Invalid(f"{what}: {message}", [str(c.get("field", "")) for c in causes])
        if reply.status in (401, 403):
            # An API server with anonymous access on answers a rejected token with a 403
            # for system:anonymous: to the operator that is the same stale credential.
            anonymous = reply.status == 403 and '"system:anonymous"' in message
            if reply.status == 401 or anonymous:
                reason, hint = "Unauthorized", STALE_TOKEN_HINT
            else:
                reason, hint = f"Forbidden: {message}", MISSING_RIGHTS_HINT
            return DatastoreUnavailable(
                f"connection is unauthorized: {reason} ({self.access.described or 'no kubeconfig'}"
                f", API server {self.server}): {hint}"
            )
        if reply.status == 429 or reply.status >= 500:
            return DatastoreUnavailable(f"{what}: API server answered {reply.status}: {message}")
        return DatastoreError(f"{what}: API server refused ({reply.status}): {message}")

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def __enter__(self) -> KubeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _status_object(body: bytes) -> dict[str, Any]:
    """The metav1.Status the API server sends with errors, or {}."""
    try:
        doc = json.loads(body)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def open_client(conf: Mapping[str, Any], env: Mapping[str, str] | None = None) -> KubeClient:
    """A client for the API server the netconf (or environment) points at; connects lazily."""
    return KubeClient(KubeAccess.resolve(conf, os.environ if env is None else env))

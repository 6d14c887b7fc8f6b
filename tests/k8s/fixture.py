"""A real kube-apiserver on loopback, with Calico's CRDs and the CNI plugin's role applied.

The Kubernetes datastore depends on API-server semantics a fake would only imitate:
resourceVersion compare-and-swap, CRD schema pruning and defaulting, strategic-merge
patches of pods/status and RBAC denials. So tests get the real thing: an etcd (from
`tests.etcd_fixture`) and the kube-apiserver that `apiserver.sh` builds and caches.

    with kube_apiserver(tmp_dir) as cluster:
        cluster.cni.request("GET", "/apis/crd.projectcalico.org/v1/ipamblocks")

Identities are served from a static token file: `admin` (system:masters), the CNI
plugin's service account, which holds only the `calico-cni-plugin` ClusterRole,
calico-kube-controllers' and calico-node's service accounts with their roles, and any
`users` a caller
adds (the cluster fixture's kubelets, scheduler, controller manager and kube-proxies).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.etcd_fixture import (
    EtcdCluster,
    free_port,
    log_tail,
    make_tls_files,
    start_etcd,
    stop_process,
)

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = Path(__file__).with_name("apiserver.sh")
KUBE_BUILD = Path(__file__).with_name("kube-build.sh")
CALICO_MANIFESTS = [
    *sorted((REPO / "conf" / "crds").glob("*.yaml")),
    REPO / "conf" / "calico-cni-plugin-rbac.yaml",
    REPO / "conf" / "calico-kube-controllers-rbac.yaml",
    REPO / "conf" / "calico-node-rbac.yaml",
]
BUILD_REQUESTED = os.environ.get("CALICO_BUILD_APISERVER") == "1"
CNI_USER = "system:serviceaccount:kube-system:calico-cni-plugin"
KUBE_CONTROLLERS_USER = "system:serviceaccount:kube-system:calico-kube-controllers"
CALICO_NODE_USER = "system:serviceaccount:kube-system:calico-node"
SERVICE_ACCOUNT_GROUPS = ("system:serviceaccounts", "system:serviceaccounts:kube-system")
START_TIMEOUT = 90.0
STOP_TIMEOUT = 15.0
REQUEST_TIMEOUT = 30.0

JSON = "application/json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"

# kind -> (plural, namespaced) for what the Calico manifests contain.
_RESOURCES = {
    "CustomResourceDefinition": ("customresourcedefinitions", False),
    "ClusterRole": ("clusterroles", False),
    "ClusterRoleBinding": ("clusterrolebindings", False),
    "ServiceAccount": ("serviceaccounts", True),
}


def apiserver_binary() -> Path:
    """Where apiserver.sh caches the binary for its pinned version (built or not)."""
    out = subprocess.run([BUILD_SCRIPT, "path"], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def apiserver_available() -> bool:
    """True when the binary is cached or CALICO_BUILD_APISERVER=1 asks us to build it."""
    return BUILD_REQUESTED or apiserver_binary().is_file()


def ensure_apiserver() -> Path:
    """The cached binary, building it first (minutes, once per version) when missing."""
    out = subprocess.run([BUILD_SCRIPT, "build"], check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class User:
    """An identity the token file serves: its user name and groups."""

    name: str
    groups: tuple[str, ...] = ()


def kube_binaries(*commands: str) -> dict[str, Path]:
    """Cached Kubernetes commands (kubectl, kubelet, crictl, ...), building the missing
    ones first (minutes, once per version)."""
    out = subprocess.run(
        [KUBE_BUILD, "build", *commands], check=True, stdout=subprocess.PIPE, text=True
    )
    return dict(zip(commands, (Path(line) for line in out.stdout.split()), strict=True))


class ApiError(Exception):
    """A non-2xx answer; `status` is what RBAC and CAS checks look at (403, 404, 409, 422)."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


@dataclass
class ApiClient:
    """Bearer-token HTTPS requests with the stdlib, enough for fixtures and assertions."""

    server: str
    token: str
    ssl_context: ssl.SSLContext

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = JSON
    ) -> dict[str, Any]:
        """Send `body` as JSON and decode the JSON answer; raise ApiError unless 2xx."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.server + path,
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {self.token}",
                "Accept": JSON,
                "Content-Type": content_type,
            },
        )
        try:
            with urllib.request.urlopen(
                req, context=self.ssl_context, timeout=REQUEST_TIMEOUT
            ) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            raise ApiError(err.code, err.read().decode(errors="replace")) from None
        return json.loads(raw) if raw.strip().startswith(b"{") else {"raw": raw.decode()}

    def create(self, collection: str, obj: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", collection, obj)

    def is_allowed(self, verb: str, resource: str, group: str = "") -> bool:
        """Ask the server whether this identity may `verb` `resource` (SelfSubjectAccessReview)."""
        review = self.create(
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SelfSubjectAccessReview",
                "spec": {
                    "resourceAttributes": {"verb": verb, "resource": resource, "group": group}
                },
            },
        )
        return bool(review["status"].get("allowed"))


@dataclass
class KubeCluster:
    """A running API server and what a test needs to talk to it as admin or as the CNI."""

    server: str
    ca_path: Path
    admin_kubeconfig: Path
    cni_kubeconfig: Path
    admin_token: str
    cni_token: str
    pids: list[int] = field(default_factory=list)
    tokens: dict[str, str] = field(default_factory=dict)  # user name -> token
    service_account_key: Path | None = None  # what signs service-account tokens
    # calico-node's service account, with conf/calico-node-rbac.yaml's rights.
    node_kubeconfig: Path | None = None

    def kubeconfig(self, user: str, path: Path) -> Path:
        """Write a kubeconfig (mode 0600) for one of the token file's users."""
        _write_kubeconfig(path, self, user.rsplit(":", 1)[-1], self.tokens[user])
        return path

    def client(self, token: str) -> ApiClient:
        return ApiClient(self.server, token, ssl.create_default_context(cafile=self.ca_path))

    @property
    def admin(self) -> ApiClient:
        return self.client(self.admin_token)

    @property
    def cni(self) -> ApiClient:
        return self.client(self.cni_token)

    def create_namespace(self, name: str, labels: dict[str, str] | None = None) -> dict:
        return self.admin.create(
            "/api/v1/namespaces",
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": name, "labels": labels or {}},
            },
        )

    def create_node(
        self, name: str, pod_cidrs: list[str] | None = None, labels: dict[str, str] | None = None
    ) -> dict:
        """A Node as kube-controller-manager leaves it: podCIDR is the first of podCIDRs."""
        spec: dict[str, Any] = {}
        if pod_cidrs:
            spec = {"podCIDR": pod_cidrs[0], "podCIDRs": pod_cidrs}
        return self.admin.create(
            "/api/v1/nodes",
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name, "labels": labels or {}},
                "spec": spec,
            },
        )

    def create_pod(
        self,
        namespace: str,
        name: str,
        node_name: str,
        labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None,
    ) -> dict:
        """A Pod already scheduled to `node_name`, as the CNI plugin finds it during ADD."""
        return self.admin.create(
            f"/api/v1/namespaces/{namespace}/pods",
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name,
                    "labels": labels or {},
                    "annotations": annotations or {},
                },
                "spec": {
                    "nodeName": node_name,
                    "containers": [{"name": "main", "image": "registry.invalid/pause"}],
                },
            },
        )


@contextmanager
def kube_apiserver(directory: Path, users: Sequence[User] = ()) -> Iterator[KubeCluster]:
    """Start etcd and kube-apiserver under `directory`, apply Calico's manifests, yield.

    Everything started here is stopped by its PID on exit, also when start-up fails.
    """
    binary = ensure_apiserver()
    directory.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        etcd = start_etcd(directory / "etcd")
        stack.callback(etcd.stop)
        tls = make_tls_files(directory / "pki")
        everyone = [
            User("admin", ("system:masters",)),
            User(CNI_USER, SERVICE_ACCOUNT_GROUPS),
            User(KUBE_CONTROLLERS_USER, SERVICE_ACCOUNT_GROUPS),
            User(CALICO_NODE_USER, SERVICE_ACCOUNT_GROUPS),
            *users,
        ]
        issued = {user.name: secrets.token_hex(16) for user in everyone}
        tokens = directory / "tokens.csv"
        tokens.write_text(
            "".join(
                f'{issued[user.name]},{user.name},{user.name},"{",".join(user.groups)}"\n'
                for user in everyone
            )
        )
        tokens.chmod(0o600)
        admin_token, cni_token = issued["admin"], issued[CNI_USER]
        port = free_port()
        process = _spawn_apiserver(
            binary, directory, port, etcd, tls.server_cert, tls.server_key, tokens
        )
        stack.callback(stop_process, process, STOP_TIMEOUT)
        server = f"https://127.0.0.1:{port}"
        cluster = KubeCluster(
            server=server,
            ca_path=Path(tls.ca_cert),
            admin_kubeconfig=directory / "admin.kubeconfig",
            cni_kubeconfig=directory / "cni.kubeconfig",
            admin_token=admin_token,
            cni_token=cni_token,
            pids=[*(m.process.pid for m in etcd.members if m.process), process.pid],
            tokens=issued,
            service_account_key=Path(tls.server_key),
            node_kubeconfig=directory / "calico-node.kubeconfig",
        )
        log = directory / "kube-apiserver.log"
        _wait_for("kube-apiserver /readyz", process, log, lambda: _ready(cluster.admin))
        apply_manifests(cluster.admin, CALICO_MANIFESTS)
        _wait_for("Calico CRDs established", process, log, lambda: _crds_established(cluster))
        _wait_for(
            "calico-cni-plugin role bound",
            process,
            log,
            lambda: cluster.cni.is_allowed("create", "ipamblocks", "crd.projectcalico.org"),
        )
        _write_kubeconfig(cluster.admin_kubeconfig, cluster, "admin", admin_token)
        _write_kubeconfig(cluster.cni_kubeconfig, cluster, "calico", cni_token)
        _write_kubeconfig(cluster.node_kubeconfig, cluster, "calico-node", issued[CALICO_NODE_USER])
        yield cluster


def apply_manifests(client: ApiClient, paths: list[Path]) -> None:
    """Create every object of these YAML files, in order (CRDs before anything using them)."""
    for path in paths:
        for obj in yaml.safe_load_all(path.read_text()):
            if obj:
                client.create(_collection(obj), obj)


def _collection(obj: dict[str, Any]) -> str:
    plural, namespaced = _RESOURCES[obj["kind"]]
    api_version = obj["apiVersion"]
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    if namespaced:
        prefix += f"/namespaces/{obj['metadata']['namespace']}"
    return f"{prefix}/{plural}"


def _spawn_apiserver(
    binary: Path,
    directory: Path,
    port: int,
    etcd: EtcdCluster,
    cert: str,
    key: str,
    tokens: Path,
) -> subprocess.Popen[bytes]:
    args = [
        str(binary),
        f"--etcd-servers={etcd.endpoints}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--secure-port={port}",
        f"--tls-cert-file={cert}",
        f"--tls-private-key-file={key}",
        f"--cert-dir={directory / 'certs'}",
        f"--token-auth-file={tokens}",
        "--authorization-mode=Node,RBAC",
        # The serving key pair doubles as the service-account keys: no test relies on SA JWTs.
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={cert}",
        f"--service-account-signing-key-file={key}",
        "--service-cluster-ip-range=10.96.0.0/16",
        # The `kubernetes` Service's endpoint cannot be loopback; nothing here needs it.
        "--endpoint-reconciler-type=none",
        # No controller-manager creates "default" service accounts, which this plugin requires.
        "--disable-admission-plugins=ServiceAccount",
        "--profiling=false",
    ]
    with open(directory / "kube-apiserver.log", "wb") as log:
        return subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )


def _wait_for(
    what: str, process: subprocess.Popen[bytes], log: Path, ready: Callable[[], bool]
) -> None:
    """Poll `ready` until true; fail with the server log if the server dies or time runs out."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"kube-apiserver exited waiting for {what}:\n{log_tail(log, 40)}")
        try:
            if ready():
                return
        except (OSError, ApiError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}:\n{log_tail(log, 40)}")


def _ready(client: ApiClient) -> bool:
    return client.request("GET", "/readyz").get("raw") == "ok"


def _crds_established(cluster: KubeCluster) -> bool:
    crds = cluster.admin.request("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions")[
        "items"
    ]
    calico = [crd for crd in crds if crd["spec"]["group"] == "crd.projectcalico.org"]
    return bool(calico) and all(
        any(
            c["type"] == "Established" and c["status"] == "True"
            for c in crd.get("status", {}).get("conditions", [])
        )
        for crd in calico
    )


def _write_kubeconfig(path: Path, cluster: KubeCluster, user: str, token: str) -> None:
    """A kubeconfig shaped like the one Calico's installer writes (cluster `local`)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "local",
                "cluster": {
                    "server": cluster.server,
                    "certificate-authority-data": base64.b64encode(
                        cluster.ca_path.read_bytes()
                    ).decode(),
                },
            }
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": f"{user}-context", "context": {"cluster": "local", "user": user}}],
        "current-context": f"{user}-context",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)

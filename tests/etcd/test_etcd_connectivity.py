"""Reaching etcd: settings from netconf and environment, TLS, failover, etcd down."""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator

import pytest

from libcalico.datastore.base import DatastoreUnavailable, KVPair, NotFound
from libcalico.datastore.config import DatastoreSettings
from libcalico.datastore.etcd import Endpoint, EtcdDatastore
from libcalico.model import HandleKey, IPAMHandle
from tests.etcd_fixture import EtcdCluster, free_port

HANDLE = HandleKey("k8s-pod-network.c1")


def open_with(conf: dict[str, str], environ: dict[str, str] | None = None) -> EtcdDatastore:
    store = DatastoreSettings.resolve(conf, environ={} if environ is None else environ).open()
    assert isinstance(store, EtcdDatastore)
    return store


def round_trip(store: EtcdDatastore, count: int = 1) -> None:
    """Write then read back, proving the store reaches a working etcd."""
    created = store.create(KVPair(HandleKey(f"probe-{count}"), IPAMHandle({"10.0.0.0/26": count})))
    assert store.get(created.key) == created


# ------------------------------------------------------------------ settings


def test_endpoints_alone_select_etcd_and_failover_order(etcd: EtcdCluster) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    settings = DatastoreSettings.resolve({"etcd_endpoints": f"{dead},{etcd.endpoint}"}, {})
    assert settings.type == "etcdv3"
    with settings.open() as store:
        round_trip(store)


def test_environment_is_read_like_calico_and_netconf_wins(etcd_tls: EtcdCluster) -> None:
    assert etcd_tls.tls is not None
    environ = {
        "ETCD_ENDPOINTS": etcd_tls.endpoint.removeprefix("https://"),
        "ETCD_SCHEME": "https",
        "ETCD_CA_CERT_FILE": etcd_tls.tls.ca_cert,
        "ETCD_CERT_FILE": "/nonexistent/cert.pem",
        "ETCD_KEY_FILE": etcd_tls.tls.client_key,
    }
    with open_with({"etcd_cert_file": etcd_tls.tls.client_cert}, environ) as store:
        round_trip(store)
    with open_with({}, environ) as store, pytest.raises(DatastoreUnavailable) as err:
        store.get(HANDLE)
    assert "/nonexistent/cert.pem" in str(err.value)


def test_endpoint_urls() -> None:
    assert Endpoint.parse("10.0.0.1:2379") == Endpoint("http", "10.0.0.1", 2379)
    assert Endpoint.parse("10.0.0.1:2379", "https") == Endpoint("https", "10.0.0.1", 2379)
    assert Endpoint.parse("http://etcd.example") == Endpoint("http", "etcd.example", 2379)
    assert Endpoint.parse(" https://[fd00::1]:4001 ").url == "https://[fd00::1]:4001"
    assert Endpoint.parse("https://etcd-0:2379/").url == "https://etcd-0:2379"
    for bad in ("ftp://10.0.0.1:2379", "http://:2379", "http://10.0.0.1:99999", "etcd:x"):
        with pytest.raises(DatastoreUnavailable) as err:
            Endpoint.parse(bad)
        assert bad in str(err.value)


# ----------------------------------------------------------------------- TLS


def test_https_with_client_certificate_from_netconf(etcd_tls: EtcdCluster) -> None:
    assert etcd_tls.tls is not None
    conf = {
        "datastore_type": "etcdv3",
        "etcd_endpoints": etcd_tls.endpoint.removeprefix("https://"),
        "etcd_scheme": "https",
        "etcd_ca_cert_file": etcd_tls.tls.ca_cert,
        "etcd_cert_file": etcd_tls.tls.client_cert,
        "etcd_key_file": etcd_tls.tls.client_key,
    }
    with open_with(conf) as store:
        round_trip(store, 1)
        round_trip(store, 2)
        assert store.round_trips == 4


def test_https_without_client_certificate_is_unavailable(etcd_tls: EtcdCluster) -> None:
    assert etcd_tls.tls is not None
    conf = {"etcd_endpoints": etcd_tls.endpoint, "etcd_ca_cert_file": etcd_tls.tls.ca_cert}
    with open_with(conf) as store, pytest.raises(DatastoreUnavailable) as err:
        store.get(HANDLE)
    assert etcd_tls.endpoint in str(err.value)
    assert "CERTIFICATE" in str(err.value).upper()


def test_https_with_an_untrusted_server_is_unavailable(etcd_tls: EtcdCluster) -> None:
    assert etcd_tls.tls is not None
    conf = {
        "etcd_endpoints": etcd_tls.endpoint,
        "etcd_cert_file": etcd_tls.tls.client_cert,
        "etcd_key_file": etcd_tls.tls.client_key,
    }  # no CA: the system store does not trust the test CA
    with open_with(conf) as store, pytest.raises(DatastoreUnavailable) as err:
        store.get(HANDLE)
    assert etcd_tls.endpoint in str(err.value)
    assert "certificate verify failed" in str(err.value)


def test_missing_tls_files_are_named(etcd_tls: EtcdCluster) -> None:
    conf = {"etcd_endpoints": etcd_tls.endpoint, "etcd_ca_cert_file": "/nonexistent/ca.pem"}
    with open_with(conf) as store, pytest.raises(DatastoreUnavailable) as err:
        store.get(HANDLE)
    assert "/nonexistent/ca.pem" in str(err.value)


# ------------------------------------------------------------------ failover


def test_cluster_member_killed_mid_session_fails_over(etcd_cluster: EtcdCluster) -> None:
    with open_with(etcd_cluster.netconf()) as store:
        round_trip(store, 1)  # connected to the first member
        etcd_cluster.members[0].stop(signal.SIGKILL)
        round_trip(store, 2)
        kvp = store.get(HandleKey("probe-1"))
        store.update(kvp)
        etcd_cluster.members[1].stop(signal.SIGKILL)
        # Two of three members gone: no quorum, so no member can serve.
        with pytest.raises(DatastoreUnavailable) as err:
            store.get(HandleKey("probe-1"))
    for member in etcd_cluster.members:
        assert member.endpoint in str(err.value)


# ------------------------------------------------------------- etcd is down


def test_stopped_etcd_is_unavailable_naming_every_endpoint(etcd: EtcdCluster) -> None:
    other = f"http://127.0.0.1:{free_port()}"
    with open_with({"etcd_endpoints": f"{etcd.endpoint},{other}"}) as store:
        with pytest.raises(NotFound):
            store.get(HANDLE)
        etcd.stop()
        with pytest.raises(DatastoreUnavailable) as err:
            store.get(HANDLE)
    assert etcd.endpoint in str(err.value) and other in str(err.value)


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts TCP connections and never answers: a hung etcd."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


def test_a_hung_etcd_times_out_instead_of_blocking_the_cni_call(silent_server: str) -> None:
    with (
        open_with({"etcd_endpoints": silent_server}) as store,
        pytest.raises(DatastoreUnavailable) as err,
    ):
        store.get(HANDLE)
    assert silent_server in str(err.value)
    assert "timed out" in str(err.value)

"""Fixtures for the etcd datastore tests: a real etcd from tests/etcd_fixture.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.etcd_fixture import EtcdCluster, etcd, etcd_cluster, etcd_tls, start_etcd

__all__ = ["etcd", "etcd_cluster", "etcd_tls", "shared_etcd"]


@pytest.fixture(scope="module")
def shared_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One member for a whole module; tests that use it start from an empty keyspace."""
    cluster = start_etcd(tmp_path_factory.mktemp("etcd"))
    yield cluster
    cluster.stop()


@pytest.fixture
def clean_etcd(shared_etcd: EtcdCluster) -> EtcdCluster:
    shared_etcd.wipe()
    return shared_etcd

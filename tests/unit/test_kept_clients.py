"""The node agent's kept datastore clients: reused for the same datastore, never for
another file, a rotated certificate, or after a failure."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from libcalico.datastore import config
from libcalico.datastore.base import Datastore, DatastoreUnavailable, KVPair, NotFound
from libcalico.datastore.config import DatastoreSettings
from libcalico.datastore.kept import KeptClients
from libcalico.model import IPAMConfig, IPAMConfigKey


@pytest.fixture
def kept(monkeypatch: pytest.MonkeyPatch) -> Iterator[KeptClients]:
    monkeypatch.setattr(config, "_kept", None)
    pool = config.keep_clients_open()
    yield pool
    pool.close()


def local(path: Path) -> DatastoreSettings:
    return DatastoreSettings.resolve({"datastore_type": "local", "local_datastore_path": str(path)})


def inner(store: Datastore) -> Datastore:
    client = store._client  # type: ignore[attr-defined]
    assert client is not None
    return client


def test_the_same_file_reuses_the_client_and_sees_every_write(
    kept: KeptClients, tmp_path: Path
) -> None:
    db = tmp_path / "calico.db"
    local(db).open().close()  # creates the file: only an existing file has an identity
    first = local(db).open()
    first.create(KVPair(IPAMConfigKey(), IPAMConfig(strict_affinity=True)))
    client = inner(first)
    first.close()
    second = local(db).open()
    assert inner(second) is client
    assert second.get(IPAMConfigKey()).value.strict_affinity is True
    second.close()


def test_a_file_moved_aside_gets_a_new_client(kept: KeptClients, tmp_path: Path) -> None:
    db = tmp_path / "calico.db"
    local(db).open().close()
    store = local(db).open()
    store.create(KVPair(IPAMConfigKey(), IPAMConfig(strict_affinity=True)))
    old = inner(store)
    store.close()
    os.rename(db, tmp_path / "calico.db.broken")
    local(db).open().close()  # the operator's fresh, empty file
    fresh = local(db).open()
    assert inner(fresh) is not old
    with pytest.raises(NotFound):
        fresh.get(IPAMConfigKey())
    fresh.close()


def test_a_client_that_failed_is_closed_not_kept(kept: KeptClients, tmp_path: Path) -> None:
    class Failing(Datastore):
        def get(self, key):  # type: ignore[no-untyped-def]
            raise DatastoreUnavailable("down")

        list = create = update = delete = get

        def close(self) -> None:
            closed.append(self)

    closed: list[Datastore] = []
    store = kept.borrow(("x",), Failing)
    failed = inner(store)
    with pytest.raises(DatastoreUnavailable):
        store.get(IPAMConfigKey())
    store.close()
    assert closed == [failed]
    assert inner(kept.borrow(("x",), Failing)) is not failed


def test_idle_clients_are_bounded(tmp_path: Path) -> None:
    closed: list[int] = []

    class Counting(Datastore):
        def __init__(self, n: int) -> None:
            self.n = n

        def get(self, key):  # type: ignore[no-untyped-def]
            raise NotImplementedError

        list = create = update = delete = get

        def close(self) -> None:
            closed.append(self.n)

    pool = KeptClients(max_idle=2)
    borrowed = [pool.borrow((n,), lambda n=n: Counting(n)) for n in range(4)]
    for store in borrowed:
        store.close()
    assert closed == [0, 1]  # the oldest idle clients went
    pool.close()
    assert sorted(closed) == [0, 1, 2, 3]


def test_one_shot_processes_keep_nothing(tmp_path: Path) -> None:
    assert config._kept is None
    db = tmp_path / "calico.db"
    store = local(db).open()
    assert type(store).__name__ == "LocalDatastore"
    store.close()

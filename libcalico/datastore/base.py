"""The datastore interface every backend (local SQLite, etcd v3, Kubernetes) implements.

Like host-local's Store, but key/value with compare-and-swap: the IPAM engine's
correctness across processes and nodes rests entirely on `update`/`delete` refusing a
stale `revision`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from libcalico.model import Key, ListOptions

# One read of a batch: a key (answered with its pair, or None when missing) or list
# options (answered with the list).
Read = Key | ListOptions


@dataclass
class KVPair:
    """A key, its value, and the revision CAS compares against."""

    key: Key
    value: Any
    revision: str | None = None


# What `read_many` answers for one Read.
Answer = KVPair | list[KVPair] | None


class DatastoreError(Exception):
    """Base of every datastore failure."""


class NotFound(DatastoreError):
    """The key does not exist."""


class AlreadyExists(DatastoreError):
    """`create` of a key that exists."""


class Conflict(DatastoreError):
    """Compare-and-swap failed: the object changed since it was read."""


class DatastoreUnavailable(DatastoreError):
    """The datastore cannot be reached or used now (CNI code 11, try again later)."""


class DatastoreCorrupt(DatastoreUnavailable):
    """The datastore's storage is damaged and needs an operator."""


class InvalidDatastoreConfig(DatastoreError):
    """The settings that choose and reach the datastore are wrong; `hint` says how to
    mend them."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


class Datastore(ABC):
    @abstractmethod
    def get(self, key: Key) -> KVPair:
        """Return the current value and revision; raise NotFound."""

    @abstractmethod
    def list(self, options: ListOptions) -> list[KVPair]:
        """All pairs selected by `options`, in key order (etcd's order)."""

    def read_many(self, reads: Sequence[Read]) -> list[Answer]:
        """Answer several gets and lists, in order, in as few round trips as the backend
        allows (etcd: one transaction per 128 reads). Not necessarily one snapshot: the
        writes that follow are compare-and-swap, which is what keeps them correct."""
        answers: list[Answer] = []
        for read in reads:
            if isinstance(read, ListOptions):
                answers.append(self.list(read))
                continue
            try:
                answers.append(self.get(read))
            except NotFound:
                answers.append(None)
        return answers

    def revisions(self, keys: Sequence[Key]) -> dict[Key, str]:
        """The current revision of each key that exists, where the backend can tell it
        without the value: whether a remembered object changed, whether a key is free."""
        pairs = self.read_many(keys)
        return {kvp.key: kvp.revision for kvp in pairs if isinstance(kvp, KVPair)}

    @abstractmethod
    def create(self, kvp: KVPair) -> KVPair:
        """Store a new key; raise AlreadyExists. Returns the pair with its revision."""

    @abstractmethod
    def update(self, kvp: KVPair) -> KVPair:
        """Replace the value if the stored revision is `kvp.revision`; raise Conflict/NotFound."""

    @abstractmethod
    def delete(self, kvp: KVPair) -> None:
        """Remove the key if the stored revision is `kvp.revision` (None: unconditionally)."""

    @abstractmethod
    def close(self) -> None:
        """Release connections."""

    def __enter__(self) -> Datastore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Seeding and inspecting a local (SQLite) Calico datastore from tests, through the library."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from queue import Empty
from typing import Any

from ipam_plugin import inspect
from ipam_plugin.engine import IPAM
from libcalico.datastore.base import KVPair, NotFound
from libcalico.datastore.local import LocalDatastore
from libcalico.model import (
    IPAMConfig,
    IPAMConfigKey,
    IPPool,
    IPPoolSpec,
    IPReservation,
    ObjectMeta,
    ResourceKey,
)
from tests.harness import CNIResult, bin_dir, calico_conf, run_plugin


@dataclass
class LocalStore:
    path: str

    def _open(self) -> LocalDatastore:
        return LocalDatastore(self.path)

    def add_pool(self, name: str, cidr: str, **spec: Any) -> None:
        pool = IPPool(
            metadata=ObjectMeta(name, {}), spec=IPPoolSpec.from_json({"cidr": cidr, **spec})
        )
        with self._open() as store:
            store.create(KVPair(ResourceKey("IPPool", name), pool))

    def add_reservation(self, name: str, cidrs: list[str]) -> None:
        with self._open() as store:
            reservation = IPReservation(metadata=ObjectMeta(name, {}), reserved_cidrs=cidrs)
            store.create(KVPair(ResourceKey("IPReservation", name), reservation))

    def set_config(self, **fields: Any) -> None:
        with self._open() as store:
            store.create(KVPair(IPAMConfigKey(), IPAMConfig(**fields)))

    def handles(self) -> list[str]:
        with self._open() as store:
            return IPAM(store).list_handles()

    def ips_of(self, handle: str) -> list[str]:
        with self._open() as store:
            try:
                return sorted(str(ip) for ip in IPAM(store).ips_by_handle(handle))
            except NotFound:
                return []

    def in_use(self) -> int:
        with self._open() as store:
            return sum(p.in_use for p in inspect.pool_usage(store))

    def block_affinities(self) -> dict[str, str]:
        """Block CIDR → its `affinity` (host:<node>)."""
        with self._open() as store:
            return {b.cidr: b.affinity for b in inspect.block_usage(store)}

    def release(self, ip: str) -> None:
        with self._open() as store:
            IPAM(store).release_ips([ip])

    def consistency(self) -> inspect.ConsistencyReport:
        with self._open() as store:
            return inspect.check_consistency(store)


def results_of_processes(target: Callable[..., None], argsets: list[tuple]) -> list[Any]:
    """Run `target(*args, queue)` in one spawned process per argset; each puts one result.

    Asserts every process exited 0; returns the results in completion order.
    """
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=target, args=(*args, queue)) for args in argsets]
    for worker in workers:
        worker.start()
    results: list[Any] = []
    deadline = time.monotonic() + 300
    while len(results) < len(workers):
        try:
            results.append(queue.get(timeout=1))
        except Empty:
            # A worker that died before putting its result (its traceback is on stderr).
            failed = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
            assert not failed, f"worker processes exited with {failed}"
            assert time.monotonic() < deadline, "workers gave no result in 300 s"
    for worker in workers:
        worker.join()
        assert worker.exitcode == 0
    return results


def local_ipam_conf(store: LocalStore, lock_dir: str, **extra: Any) -> dict[str, Any]:
    """A cniVersion 1.0.0 calico + calico-ipam netconf on `store`, its node lock in
    `lock_dir` (each test its own)."""
    return calico_conf(
        "1.0.0",
        {"type": "calico-ipam"},
        local_datastore_path=store.path,
        ipam_lock_file=f"{lock_dir}/ipam.lock",
        **extra,
    )


def run_ipam(
    command: str, conf: dict[str, Any], container_id: str, cni_path: Path | None = None
) -> CNIResult:
    """The calico-ipam of `cni_path` (ours by default) called on its own, as the calico
    plugin delegates to it: the pod's netns is never entered, so none is made."""
    directory = cni_path or bin_dir()
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": "/var/run/netns/unused",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "",
        "CNI_PATH": str(directory),
    }
    return run_plugin([str(directory / "calico-ipam")], env, conf)

"""A lone simulated node for Felix's managers: a netns with `eth0` on 172.31.5.2/24 to a
fabric netns, a worker thread inside it, and a CALICO_LIB_DIR of its own."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.felix.netns_support import NetnsThread, underlay
from tests.harness import Netns


@dataclass
class LoneNode:
    netns: Netns
    fabric: Netns
    worker: NetnsThread
    lib_dir: Path


@pytest.fixture
def lone_node(tmp_path: Path) -> Iterator[LoneNode]:
    if os.geteuid() != 0:
        pytest.fail("network namespace tests need root")
    node_ns, fabric = Netns.create("fx-node"), Netns.create("fx-fab")
    worker = None
    try:
        underlay(node_ns, fabric, "172.31.5.2/24", "172.31.5.1/24")
        worker = NetnsThread(node_ns)
        yield LoneNode(node_ns, fabric, worker, tmp_path)
    finally:
        if worker is not None:
            worker.close()
        node_ns.delete()
        fabric.delete()

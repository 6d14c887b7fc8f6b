"""Shared fixtures: the plugin binaries on a CNI_PATH, simulated nodes and pods."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import agent_fixture
from tests.harness import GO_PLUGIN_DIR, Node, bin_dir


@pytest.fixture(scope="session")
def cni_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A CNI bin dir as an operator lays it out: our launchers symlinked, Go plugins beside."""
    src = bin_dir()
    if not (src / "calico").exists():
        pytest.exit(f"{src}/calico is missing: run `make build` first", returncode=3)
    path = tmp_path_factory.mktemp("cni-bin")
    for name in ("calico", "calico-ipam"):
        (path / name).symlink_to(src / name)
    for name in ("host-local", "portmap", "ptp"):
        (path / name).symlink_to(GO_PLUGIN_DIR / name)
    return str(path)


@pytest.fixture(scope="session", autouse=True)
def host_agent(request: pytest.FixtureRequest) -> Iterator[None]:
    """Under CALICO_TEST_VIA_AGENT=1, an agent in the host netns for runs outside any node."""
    if agent_fixture.enabled() and os.geteuid() == 0:
        agent_fixture.start_for(os.path.join(request.getfixturevalue("cni_path"), "calico"))
    yield
    agent_fixture.stop_for()


@pytest.fixture
def node(cni_path: str) -> Iterator[Node]:
    if os.geteuid() != 0:
        pytest.fail("network namespace tests need root")
    n = Node.create(cni_path)
    try:
        yield n
    finally:
        n.destroy()


@pytest.fixture
def ipam_dir(tmp_path: Path) -> str:
    return str(tmp_path / "ipam")

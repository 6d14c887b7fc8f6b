"""How a one-shot `calico` runs its `calico-ipam` delegate: in its own process when
CNI_PATH's calico-ipam is this very program (a second bundle start would only cost time),
exec'd when it is any other file. Either way the result and the datastore agree."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.harness import Node, pod_args
from tests.ipam_support import LocalStore, local_ipam_conf

# `2024-05-01 12:34:56.789 [INFO][4242] ipam/main.py 123: msg`
LOG_LINE = re.compile(r"\[[A-Z]+\]\[(\d+)\] ([\w-]+)/")


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    s = LocalStore(str(tmp_path / "calico.db"))
    s.add_pool("default-ipv4-ippool", "10.246.0.0/16", blockSize=26)
    return s


def pids_by_component(stderr: str) -> dict[str, set[int]]:
    pids: dict[str, set[int]] = {}
    for pid, component in LOG_LINE.findall(stderr):
        pids.setdefault(component, set()).add(int(pid))
    return pids


def foreign_ipam_dir(node: Node, tmp_path: Path) -> str:
    """A CNI bin dir whose calico-ipam is a wrapper script, so not the calico beside it."""
    directory = tmp_path / "foreign-bin"
    directory.mkdir()
    wrapper = directory / "calico-ipam"
    real = os.path.join(node.cni_path.split(":")[0], "calico-ipam")
    wrapper.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    return f"{directory}:{node.cni_path}"


@pytest.mark.parametrize("layout", ["same-program", "foreign-file"])
def test_ipam_delegate_in_process_only_when_it_is_this_program(
    node: Node, store: LocalStore, tmp_path: Path, layout: str
) -> None:
    env = {"CALICO_AGENT_SOCKET": str(tmp_path / "no-agent.sock")}  # always standalone
    if layout == "foreign-file":
        env["CNI_PATH"] = foreign_ipam_dir(node, tmp_path)
    pod = node.new_pod()
    args = pod_args("deleg")
    conf = local_ipam_conf(store, str(tmp_path))

    added = node.run("ADD", conf, "ctr-deleg", pod.path, args=args, env=env)
    assert added.code == 0, added
    pids = pids_by_component(added.stderr)
    assert pids.keys() >= {"cni-plugin", "ipam"}, added.stderr
    assert len(pids["cni-plugin"]) == 1 and len(pids["ipam"]) == 1
    same_process = pids["cni-plugin"] == pids["ipam"]
    assert same_process is (layout == "same-program"), added.stderr
    assert [f"{ip}/32" for ip in store.ips_of("k8s-pod-network.ctr-deleg")] == [
        ip["address"] for ip in added.json["ips"]
    ]

    deleted = node.run("DEL", conf, "ctr-deleg", pod.path, args=args, env=env)
    assert (deleted.code, deleted.stdout) == (0, ""), deleted
    assert store.ips_of("k8s-pod-network.ctr-deleg") == []
    assert node.host_veths() == []

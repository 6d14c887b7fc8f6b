"""The node agent (`calico agent`) on a simulated node: requests really go through it, the
executables fall back cleanly when it is gone, and no request is ever left half-done."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import stat
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.agent_fixture import AgentProcess
from tests.harness import CNIResult, Node, pod_args, run_plugin, wait_for
from tests.ipam_support import LocalStore, local_ipam_conf
from tests.root.checks import expected_host_veth

NOBODY = 65534
# A child that connects as `nobody` and prints what happened.
CONNECT_AS_NOBODY = """
import _socket, sys
s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print("connect:", exc.strerror)
    raise SystemExit
body = b"calico-cni-agent/1\\0calico\\0" + b"0:0" + b"\\0\\0"
s.sendall(b"%d\\n" % len(body) + body)
print("reply:", s.recv(200).decode())
"""


@pytest.fixture
def agent(node: Node) -> Iterator[AgentProcess]:
    """An agent in the node's netns; at debug level it logs each request it starts."""
    calico = os.path.join(node.cni_path, "calico")
    proc = AgentProcess.start(calico, node.netns.path, ["--log-level", "debug"])
    try:
        yield proc
    finally:
        proc.remove()


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    s = LocalStore(str(tmp_path / "calico.db"))
    s.add_pool("default-ipv4-ippool", "10.244.0.0/16", blockSize=26)
    return s


def ipam_conf(store: LocalStore, tmp_path: Path) -> dict[str, Any]:
    return local_ipam_conf(store, str(tmp_path), log_level="info")


def handle(container_id: str) -> str:
    return f"k8s-pod-network.{container_id}"


def running(agent: AgentProcess) -> int:
    return agent.log().count("running CNI request")


def hold_lock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_requests_go_through_the_agent_and_ipam_runs_in_process(
    node: Node, agent: AgentProcess, store: LocalStore, tmp_path: Path
) -> None:
    conf = ipam_conf(store, tmp_path)
    pod = node.new_pod()
    add = node.run("ADD", conf, "ctr-a", pod.path, args=pod_args("a"), env=agent.env())
    assert add.code == 0, add
    served = agent.served()
    assert len(served) == 1 and 'Command="ADD"' in served[0] and 'Role="calico"' in served[0]
    # The IPAM ran inside the agent: no second request, yet its log reached the caller.
    assert "ipam/main.py" in add.stderr and "cni-plugin/plugin.py" in add.stderr
    assert [f"{ip}/32" for ip in store.ips_of(handle("ctr-a"))] == [
        ip["address"] for ip in add.json["ips"]
    ]
    assert expected_host_veth("default", "a") in node.host_veths()

    deleted = node.run("DEL", conf, "ctr-a", pod.path, args=pod_args("a"), env=agent.env())
    assert (deleted.code, deleted.stdout) == (0, ""), deleted
    assert len(agent.served()) == 2
    assert node.host_veths() == [] and store.ips_of(handle("ctr-a")) == []


@pytest.mark.parametrize(
    ("binary", "command", "env", "stdin"),
    [
        ("calico", "VERSION", {}, '{"cniVersion": "0.4.0"}'),
        ("calico-ipam", "VERSION", {}, ""),
        ("calico", "ADD", {}, "{not json"),
        ("calico", "ADD", {"CNI_IFNAME": ""}, '{"cniVersion": "1.0.0", "name": "n"}'),
        ("calico-ipam", "FROB", {}, "{}"),
        ("calico", "DEL", {}, '{"cniVersion": "1.0.0", "name": "n", "type": "calico"}'),
    ],
)
def test_same_answer_with_and_without_the_agent(
    node: Node, agent: AgentProcess, binary: str, command: str, env: dict, stdin: str
) -> None:
    pod = node.new_pod()

    def run(socket_path: str) -> CNIResult:
        full = {"CALICO_AGENT_SOCKET": socket_path, **env}
        return node.run(command, stdin, "ctr-x", pod.path, env=full, binary=binary)

    via_agent = run(agent.socket)
    assert len(agent.served()) == 1
    standalone = run(str(agent.directory / "absent.sock"))
    assert len(agent.served()) == 1
    assert (via_agent.code, via_agent.stdout) == (standalone.code, standalone.stdout)
    assert "Traceback" not in via_agent.stderr + standalone.stderr


def test_a_client_in_another_netns_does_it_itself(node: Node, agent: AgentProcess) -> None:
    """The agent works on its own netns' links: a caller from elsewhere must not use it."""
    calico = os.path.join(node.cni_path, "calico")
    result = run_plugin([calico], {"CNI_COMMAND": "VERSION", **agent.env()}, None)
    assert result.code == 0 and result.json["cniVersion"] == "1.1.0", result
    assert agent.served() == []


def test_socket_is_root_only(node: Node, agent: AgentProcess) -> None:
    sock = Path(agent.socket)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700

    def connect_as_nobody() -> str:
        done = subprocess.run(
            ["/usr/bin/python3", "-I", "-S", "-c", CONNECT_AS_NOBODY, str(sock)],
            user=NOBODY,
            group=NOBODY,
            extra_groups=[],
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout

    assert connect_as_nobody().startswith("connect: Permission denied")
    # Even with the file opened up, the agent checks the peer's credentials itself.
    os.chmod(sock.parent, 0o711)
    os.chmod(sock, 0o666)
    reply = connect_as_nobody()
    assert reply.startswith("reply: Epermission denied"), reply
    assert f"refused a client running as uid {NOBODY}" in agent.log()
    assert agent.served() == []


def framed(body: bytes) -> bytes:
    return b"%d\n" % len(body) + body


@pytest.mark.parametrize(
    "frame",
    [
        b"garbage\n",
        b"x" * 64,
        framed(b"hello"),
        framed(b"not-the-magic\0calico\x000:0\0\0{}"),
        framed(b"calico-cni-agent/1\0nope\x000:0\0\0{}"),
        framed(b"calico-cni-agent/1\0calico\x000:0\0=nokey\0\0{}"),
    ],
)
def test_malformed_request_gets_an_error_and_the_agent_keeps_serving(
    node: Node, agent: AgentProcess, frame: bytes
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.settimeout(30)
        raw.connect(agent.socket)
        raw.sendall(frame)
        reply = raw.recv(200)
    assert reply.startswith(b"Ebad request"), reply
    bad_json = node.run("ADD", "{oops", "ctr-1", "/var/run/netns/x", env=agent.env())
    assert bad_json.code == 1 and bad_json.json["code"] == 6, bad_json
    assert len(agent.served()) == 1


def test_sigterm_finishes_requests_in_flight(
    node: Node, agent: AgentProcess, store: LocalStore, tmp_path: Path
) -> None:
    conf = ipam_conf(store, tmp_path)
    pods = {f"ctr-{i}": node.new_pod() for i in range(4)}
    lock = hold_lock(tmp_path / "ipam.lock")  # the ADDs queue behind it, inside the agent
    try:
        with ThreadPoolExecutor(len(pods)) as pool:
            adds = {
                cid: pool.submit(
                    node.run, "ADD", conf, cid, pod.path, args=pod_args(cid), env=agent.env()
                )
                for cid, pod in pods.items()
            }
            wait_for(lambda: running(agent) == len(pods), "the ADDs to reach the agent")
            agent.signal(signal.SIGTERM)
            wait_for(lambda: "stopping: 4 request(s) in flight" in agent.log(), "the drain")
            assert not os.path.exists(agent.socket)  # new callers already work standalone
            later = node.run("VERSION", "", env=agent.env())
            assert later.code == 0 and agent.served() == [], later
            os.close(lock)
            lock = -1
            results = {cid: future.result() for cid, future in adds.items()}
    finally:
        if lock >= 0:
            os.close(lock)
    assert agent.wait() == 0
    assert all(r.code == 0 for r in results.values()), results
    assert len(agent.served()) == len(pods)
    for cid, pod in pods.items():
        assert node.run("DEL", conf, cid, pod.path, args=pod_args(cid)).code == 0
    assert node.host_veths() == [] and store.handles() == []


def test_agent_killed_after_taking_an_add_reports_try_again_and_leaves_nothing(
    node: Node, agent: AgentProcess, store: LocalStore, tmp_path: Path
) -> None:
    conf = ipam_conf(store, tmp_path)
    pod = node.new_pod()
    lock = hold_lock(tmp_path / "ipam.lock")
    try:
        with ThreadPoolExecutor(1) as pool:
            add = pool.submit(
                node.run, "ADD", conf, "ctr-k", pod.path, args=pod_args("k"), env=agent.env()
            )
            wait_for(lambda: running(agent) == 1, "the ADD to reach the agent")
            agent.signal(signal.SIGKILL)
            agent.wait()
            os.close(lock)  # the client's undo (a standalone DEL) needs the lock
            lock = -1
            result = add.result()
    finally:
        if lock >= 0:
            os.close(lock)
    assert result.code == 1 and result.json["code"] == 11, result
    assert "went away" in result.json["msg"]
    assert node.host_veths() == [] and store.ips_of(handle("ctr-k")) == []
    retried = node.run("ADD", conf, "ctr-k", pod.path, args=pod_args("k"), env=agent.env())
    assert retried.code == 0, retried  # the stale socket refuses: standalone does it
    assert node.run("DEL", conf, "ctr-k", pod.path, args=pod_args("k")).code == 0


def test_agent_killed_during_a_burst_of_adds(
    node: Node, agent: AgentProcess, store: LocalStore, tmp_path: Path
) -> None:
    conf = ipam_conf(store, tmp_path)
    pods = {f"burst-{i}": node.new_pod() for i in range(20)}

    def add(cid: str) -> CNIResult:
        return node.run("ADD", conf, cid, pods[cid].path, args=pod_args(cid), env=agent.env())

    with ThreadPoolExecutor(len(pods)) as pool:
        futures = {cid: pool.submit(add, cid) for cid in pods}
        wait_for(
            lambda: len(agent.served()) >= 3 or all(f.done() for f in futures.values()),
            "a few ADDs to complete",
        )
        agent.signal(signal.SIGKILL)
        agent.wait()
        results = {cid: f.result() for cid, f in futures.items()}

    veths = set(node.host_veths())
    failed = [cid for cid, r in results.items() if r.code != 0]
    for cid, result in results.items():
        ips = store.ips_of(handle(cid))
        if result.code == 0:
            assert expected_host_veth("default", cid) in veths, result
            assert [f"{ip}/32" for ip in ips] == [i["address"] for i in result.json["ips"]]
        else:
            assert result.json["code"] == 11, result
            assert expected_host_veth("default", cid) not in veths, result
            assert ips == [], result

    agent.launch()  # over the stale socket it left behind
    for cid in failed:  # the runtime retries: the restarted agent does them
        assert add(cid).code == 0
    assert len(agent.served()) >= len(failed)
    for cid, pod in pods.items():
        deleted = node.run("DEL", conf, cid, pod.path, args=pod_args(cid), env=agent.env())
        assert deleted.code == 0, deleted
    assert node.host_veths() == [] and store.handles() == []


def test_restart_over_a_stale_socket_and_one_agent_per_socket(
    node: Node, agent: AgentProcess
) -> None:
    agent.signal(signal.SIGKILL)
    agent.wait()
    assert os.path.exists(agent.socket)  # stale: nobody listens
    agent.launch()
    version = node.run("VERSION", json.dumps({"cniVersion": "1.0.0"}), env=agent.env())
    assert version.code == 0 and len(agent.served()) == 1, version

    second = node.netns.exec(
        os.path.join(node.cni_path, "calico"), "agent", "--socket", agent.socket, check=False
    )
    assert second.returncode == 1, second
    assert f"another agent is serving {agent.socket}" in second.stderr
    assert node.run("VERSION", "", env=agent.env()).code == 0
    assert len(agent.served()) == 2

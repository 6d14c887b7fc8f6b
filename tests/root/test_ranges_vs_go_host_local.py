"""Our range allocator and Go's host-local share one dataDir without ever colliding.

Runs the Debian `containernetworking-plugins` binary directly as the oracle: host-local
ignores the netns, so nothing here needs a network namespace.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ipam_plugin.ranges import RangeStore, allocate, find, parse_ranges, release

HOST_LOCAL = Path("/usr/lib/cni/host-local")
NETWORK = "mynet"
SUBNET_V4 = "10.77.0.0/24"
SUBNET_V6 = "2001:db8:77::/64"

pytestmark = pytest.mark.skipif(
    not os.access(HOST_LOCAL, os.X_OK),
    reason=f"Go host-local oracle {HOST_LOCAL} is not installed "
    "(Debian package containernetworking-plugins)",
)


def ipam_conf(data_dir: Path, *subnets: str) -> dict:
    return {
        "type": "host-local",
        "ranges": [[{"subnet": s}] for s in subnets],
        "dataDir": str(data_dir),
    }


def go_request(
    command: str, data_dir: Path, container_id: str, *subnets: str
) -> tuple[dict[str, str], str]:
    """Environment and stdin for one host-local call. Its skel insists on CNI_NETNS even
    though host-local never opens it."""
    netconf = {
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "type": "ptp",
        "ipam": ipam_conf(data_dir, *subnets or (SUBNET_V4,)),
    }
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": str(HOST_LOCAL.parent),
        "CNI_NETNS": "/proc/self/ns/net",
    }
    return env, json.dumps(netconf)


def run_go(
    command: str, data_dir: Path, container_id: str, *subnets: str
) -> subprocess.CompletedProcess:
    env, stdin = go_request(command, data_dir, container_id, *subnets)
    return subprocess.run(
        [str(HOST_LOCAL)],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def go_add(data_dir: Path, container_id: str, *subnets: str) -> list[str]:
    done = run_go("ADD", data_dir, container_id, *subnets)
    assert done.returncode == 0, done.stdout + done.stderr
    return [entry["address"] for entry in json.loads(done.stdout)["ips"]]


def go_del(data_dir: Path, container_id: str) -> None:
    done = run_go("DEL", data_dir, container_id)
    assert done.returncode == 0, done.stdout + done.stderr


def py_add(data_dir: Path, container_id: str, *subnets: str) -> list[str]:
    range_sets = parse_ranges(ipam_conf(data_dir, *subnets or (SUBNET_V4,)), None, "1.0.0")
    got = allocate(RangeStore(data_dir, NETWORK), range_sets, container_id, "eth0", [])
    return [str(a.address) for a in got]


def py_del(data_dir: Path, container_id: str) -> None:
    release(RangeStore(data_dir, NETWORK), container_id, "eth0")


def network_files(data_dir: Path) -> dict[str, bytes]:
    directory = data_dir / NETWORK
    return {name: (directory / name).read_bytes() for name in os.listdir(directory)}


def ip_files(data_dir: Path) -> dict[str, bytes]:
    return {
        name: content
        for name, content in network_files(data_dir).items()
        if name != "lock" and not name.startswith("last_reserved_ip.")
    }


def test_parallel_adds_and_dels_from_both_plugins_never_collide(tmp_path):
    owners = [f"go-{i}" for i in range(40)] + [f"py-{i}" for i in range(40)]
    interleaved = [owner for pair in zip(owners[:40], owners[40:], strict=True) for owner in pair]

    def add(owner: str) -> tuple[str, str]:
        adder = go_add if owner.startswith("go-") else py_add
        (address,) = adder(tmp_path, owner)
        return owner, address

    with ThreadPoolExecutor(max_workers=16) as pool:
        allocated = dict(pool.map(add, interleaved))

    addresses = [ipaddress.ip_interface(a) for a in allocated.values()]
    assert len(set(addresses)) == 80
    assert all(a.network == ipaddress.ip_network(SUBNET_V4) for a in addresses)
    assert ipaddress.ip_interface("10.77.0.1/24") not in addresses
    assert ip_files(tmp_path) == {
        str(ipaddress.ip_interface(address).ip): f"{owner}\r\neth0".encode()
        for owner, address in allocated.items()
    }

    def delete(owner: str) -> None:
        (go_del if owner.startswith("go-") else py_del)(tmp_path, owner)

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(delete, interleaved))
    assert sorted(network_files(tmp_path)) == ["last_reserved_ip.0", "lock"]


def test_a_file_written_by_go_is_byte_identical_to_ours(tmp_path):
    go_dir, py_dir = tmp_path / "go", tmp_path / "py"
    assert go_add(go_dir, "same-container", SUBNET_V4, SUBNET_V6) == py_add(
        py_dir, "same-container", SUBNET_V4, SUBNET_V6
    )
    go_files, py_files = network_files(go_dir), network_files(py_dir)
    assert sorted(go_files) == sorted(py_files)
    assert go_files == py_files
    assert go_files["2001:db8:77::2"] == b"same-container\r\neth0"


def test_each_plugin_releases_and_finds_what_the_other_allocated(tmp_path):
    (go_address,) = go_add(tmp_path, "by-go")
    (py_address,) = py_add(tmp_path, "by-py")
    assert (go_address, py_address) == ("10.77.0.2/24", "10.77.0.3/24")

    store = RangeStore(tmp_path, NETWORK)
    assert [str(ip) for ip in find(store, "by-go", "eth0")] == ["10.77.0.2"]
    assert run_go("CHECK", tmp_path, "by-py").returncode == 0
    assert run_go("CHECK", tmp_path, "nobody").returncode != 0

    go_del(tmp_path, "by-py")
    assert release(store, "by-go", "eth0") == 1
    assert ip_files(tmp_path) == {}


def test_round_robin_and_duplicate_detection_span_both_plugins(tmp_path):
    assert py_add(tmp_path, "first") == ["10.77.0.2/24"]
    assert go_add(tmp_path, "second") == ["10.77.0.3/24"]
    assert py_add(tmp_path, "third") == ["10.77.0.4/24"]

    duplicate = run_go("ADD", tmp_path, "first")
    assert duplicate.returncode != 0
    assert "10.77.0.2 has been allocated to first, duplicate allocation is not allowed" in (
        duplicate.stdout
    )


def blocked_flock_waiters(inode: int) -> set[int]:
    """PIDs waiting ("->") for a flock on this inode, from /proc/locks."""
    waiters = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if (
            len(fields) > 6
            and fields[1:3] == ["->", "FLOCK"]
            and int(fields[6].rsplit(":", 1)[1]) == inode
        ):
            waiters.add(int(fields[5]))
    return waiters


def test_go_waits_for_the_lock_we_hold(tmp_path):
    store = RangeStore(tmp_path, NETWORK)
    env, stdin = go_request("ADD", tmp_path, "waiting")
    with store.locked():
        go = subprocess.Popen(
            [str(HOST_LOCAL)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
        )
        go.stdin.write(stdin)
        go.stdin.close()
        inode = store.lock_path.stat().st_ino
        deadline = time.monotonic() + 30
        while go.pid not in blocked_flock_waiters(inode) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert go.pid in blocked_flock_waiters(inode), "Go host-local never waited on our lock"
        assert go.poll() is None
        assert ip_files(tmp_path) == {}
    assert go.wait(timeout=60) == 0
    assert json.loads(go.stdout.read())["ips"][0]["address"] == "10.77.0.2/24"

"""calico-ipam's node hints (`<ipam_lock_file>.hints`): private, shared by every call on the
node, and never trusted: a damaged, planted or lying file costs reads, not addresses."""

from __future__ import annotations

import ipaddress
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ALL_VERSIONS, calico_conf, result_ips
from tests.ipam_support import LocalStore, run_ipam

NODE = "hints-node"


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    store = LocalStore(str(tmp_path / "calico.db"))
    store.add_pool("hints", "10.63.0.0/26", blockSize=29)  # 8 blocks of 8
    return store


def conf_for(store: LocalStore, tmp_path: Path, version: str = "1.0.0") -> dict[str, Any]:
    return calico_conf(
        version,
        {"type": "calico-ipam"},
        nodename=NODE,
        local_datastore_path=store.path,
        ipam_lock_file=str(tmp_path / "ipam.lock"),
    )


def add(conf: dict[str, Any]) -> str:
    result = run_ipam("ADD", conf, f"ctr-{uuid.uuid4().hex[:8]}")
    assert result.code == 0, result
    assert "Traceback" not in result.stderr
    [address] = result_ips(result.json, conf["cniVersion"])
    return address.split("/")[0]


def hints_file(tmp_path: Path) -> Path:
    return tmp_path / "ipam.lock.hints"


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_add_and_del_keep_the_nodes_hints_beside_its_lock(
    store: LocalStore, tmp_path: Path, version: str
) -> None:
    conf = conf_for(store, tmp_path, version)
    result = run_ipam("ADD", conf, "ctr-1")
    assert result.code == 0, result
    [address] = result_ips(result.json, version)
    block = str(ipaddress.ip_interface(address).network)
    path = hints_file(tmp_path)
    assert path.stat().st_mode & 0o777 == 0o600
    stored = json.loads(path.read_text())
    assert stored["scope"] == f"local {store.path}"
    assert stored["hosts"][NODE]["4"]["blocks"][block][1] == 7  # free after the ADD
    assert run_ipam("DEL", conf, "ctr-1").code == 0
    stored = json.loads(path.read_text())
    assert stored["hosts"][NODE]["4"]["blocks"][block][1] == 8
    assert store.handles() == []
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "content",
    [b"", b"not json", b"\xff\xfe", b"[]", b'{"scope": 1, "hosts": []}', b'{"hosts": {"x": 5}}'],
    ids=["empty", "text", "binary", "list", "wrong-types", "no-scope"],
)
def test_a_damaged_hints_file_is_replaced(
    store: LocalStore, tmp_path: Path, content: bytes
) -> None:
    conf = conf_for(store, tmp_path)
    hints_file(tmp_path).write_bytes(content)
    first, second = add(conf), add(conf)
    assert first != second
    assert json.loads(hints_file(tmp_path).read_text())["hosts"][NODE]
    assert store.consistency().ok


def test_a_planted_link_is_neither_read_nor_written_through(
    store: LocalStore, tmp_path: Path
) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("precious")
    hints_file(tmp_path).symlink_to(target)
    add(conf_for(store, tmp_path))
    assert target.read_text() == "precious"
    assert not hints_file(tmp_path).is_symlink()
    assert hints_file(tmp_path).stat().st_mode & 0o777 == 0o600


def test_lying_hints_never_hand_out_a_taken_address(store: LocalStore, tmp_path: Path) -> None:
    conf = conf_for(store, tmp_path)
    taken = {add(conf) for _ in range(12)}  # two blocks: one full, one with 4 free
    scope = f"local {store.path}"
    blocks = {str(ipaddress.ip_interface(f"{ip}/29").network) for ip in taken}
    lies = {cidr: ["1", 8] for cidr in [*blocks, "10.63.0.56/29"]}  # all "empty"
    doc = {
        "scope": scope,
        "hosts": {NODE: {"4": {"selection": "", "reserved": "", "blocks": lies}}},
    }
    hints_file(tmp_path).write_text(json.dumps(doc))
    more = [add(conf) for _ in range(6)]
    assert not taken & set(more)
    assert len(set(more)) == 6
    assert store.consistency().ok
    assert os.path.exists(hints_file(tmp_path))


def planted(store: LocalStore, padding: int = 0) -> str:
    """A well-formed hints file for this datastore naming a host of the planter's."""
    blocks = {f"10.99.{i // 256}.{i % 256}/32": ["1", 0] for i in range(padding)}
    stored = {"selection": "", "reserved": "", "blocks": blocks}
    return json.dumps({"scope": f"local {store.path}", "hosts": {"planted": {"4": stored}}})


def test_hints_are_kept_across_calls(store: LocalStore, tmp_path: Path) -> None:
    """The control for the two tests below: a file of our own is read and written back."""
    hints_file(tmp_path).write_text(planted(store))
    add(conf_for(store, tmp_path))
    assert set(json.loads(hints_file(tmp_path).read_text())["hosts"]) == {"planted", NODE}


def test_a_hints_file_someone_else_owns_is_not_trusted(store: LocalStore, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file away")
    hints_file(tmp_path).write_text(planted(store))
    os.chown(hints_file(tmp_path), 65534, 65534)
    add(conf_for(store, tmp_path))
    assert set(json.loads(hints_file(tmp_path).read_text())["hosts"]) == {NODE}
    assert hints_file(tmp_path).stat().st_uid == 0


def test_an_oversized_hints_file_is_not_read(store: LocalStore, tmp_path: Path) -> None:
    hints_file(tmp_path).write_text(planted(store, padding=70_000))  # > 4 MiB
    add(conf_for(store, tmp_path))
    assert set(json.loads(hints_file(tmp_path).read_text())["hosts"]) == {NODE}

"""The built `calicoctl` (and `calico` without CNI_COMMAND) on the local datastore: every
command, bad input, the config file, the names the tool answers to; proves the bundle
carries what it needs (PyYAML, jsonschema and the CRD schemas, the IPAM library, sqlite3)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.calicoctl_support import (
    SEED,
    SEED_TABLES,
    Calicoctl,
    bad_input_changes_nothing,
    every_command,
)
from tests.harness import REPO, bin_dir, calico_cli

# The seed's pool as shipped in conf/: it must apply unchanged.
SEED_POOL = (REPO / "conf" / "ippool-default.yaml").read_text()
Calico = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def calico(tmp_path: Path) -> Calico:
    executable = bin_dir() / "calico"
    if not executable.exists():
        pytest.fail(f"{executable} is missing: run `make build` first")
    env = {"LOCAL_DATASTORE_PATH": str(tmp_path / "calico.db")}

    def run(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        result = calico_cli(*argv, env=env, stdin=stdin)
        assert "Traceback" not in result.stderr, result.stderr
        return result

    return run


def test_apply_get_show_through_the_bundle(calico: Calico) -> None:
    applied = calico("ctl", "apply", "-f", "-", stdin=SEED_POOL)
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout == "Successfully applied 1 'IPPool' resource(s)\n"

    got = calico("ctl", "get", "ippools", "-o", "yaml")
    assert got.returncode == 0, got.stderr
    assert "cidr: 10.244.0.0/16" in got.stdout and "ipipMode: CrossSubnet" in got.stdout

    shown = calico("ipam", "show")
    assert shown.returncode == 0, shown.stderr
    assert "| IP Pool  | 10.244.0.0/16 |     65536 | 0 (0%)     | 65536 (100%) |" in shown.stdout

    checked = calico("ipam", "check")
    assert checked.returncode == 0, checked.stdout


def test_bad_input_is_one_line_from_the_bundle(calico: Calico) -> None:
    refused = calico("ctl", "apply", "-f", "-", stdin=SEED_POOL.replace("26", "99"))
    assert refused.returncode == 1
    assert "spec.blockSize" in refused.stderr
    assert refused.stderr.count("\n") == 1


# ------------------------------------------------- calicoctl, the operator's name for it


@pytest.fixture
def calicoctl(tmp_path: Path) -> Calicoctl:
    return Calicoctl({"LOCAL_DATASTORE_PATH": str(tmp_path / "calico.db")})


def test_every_command_on_the_local_datastore(calicoctl: Calicoctl, tmp_path: Path) -> None:
    every_command(calicoctl, tmp_path)


def test_bad_input_on_the_local_datastore(calicoctl: Calicoctl) -> None:
    calicoctl.ok("apply", "-f", "-", stdin=SEED)
    bad_input_changes_nothing(calicoctl)


def test_kubectl_calico_and_calico_ctl_are_the_same_tool(calicoctl: Calicoctl) -> None:
    calicoctl.ok("apply", "-f", "-", stdin=SEED)
    plugin_name = Calicoctl(calicoctl.env, bin_dir() / "kubectl-calico")
    table = SEED_TABLES["get", "nodes", "-o", "wide"]
    assert plugin_name.ok("get", "nodes", "-o", "wide") == table
    calico = Calicoctl(calicoctl.env, bin_dir() / "calico")
    assert calico.ok("ctl", "get", "nodes", "-o", "wide") == table
    assert calico.ok("ipam", "show") == calicoctl.ok("ipam", "show")


def test_config_file_and_its_errors(calicoctl: Calicoctl, tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    cfg = tmp_path / "calicoctl.cfg"
    cfg.write_text(
        "apiVersion: projectcalico.org/v3\nkind: CalicoAPIConfig\nmetadata: {}\n"
        f"spec:\n  datastoreType: local\n  localDatastorePath: {db}\n"
    )
    assert calicoctl.ok("apply", "-f", "-", "-c", str(cfg), stdin=SEED)
    assert "node1" in calicoctl.ok("get", "nodes", "--config", str(cfg))
    assert calicoctl.ok("get", "nodes") == "NAME   \n\n"  # the environment's is untouched
    missing = calicoctl.fails("get", "nodes", "-c", str(tmp_path / "nope.cfg"))
    assert missing == f"config file {tmp_path / 'nope.cfg'} does not exist"
    cfg.write_text(cfg.read_text() + "  etcdEndpoint: http://x\n")
    assert "unknown CalicoAPIConfig field spec.etcdEndpoint" in calicoctl.fails(
        "get", "nodes", "-c", str(cfg)
    )


def test_an_unreachable_datastore_is_one_line(tmp_path: Path) -> None:
    down = Calicoctl({"DATASTORE_TYPE": "etcdv3", "ETCD_ENDPOINTS": "http://127.0.0.1:1"})
    assert down.fails("get", "nodes").startswith("datastore error: no etcd endpoint reachable")
    assert down.fails("apply", "-f", "-", stdin=SEED).startswith("datastore error")

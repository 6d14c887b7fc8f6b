"""The admin CLI of the built `calico` executable: proves the bundle carries what it needs
(PyYAML, the IPAM library, sqlite3) and that the launcher routes argv to it."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

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

"""Real Calico v3.31.7 (`../shared/oracles/`, or CALICO_ORACLE_DIR) as a black box beside ours.

The oracle's `calico-ipam` is a link name (its role comes from the name it is invoked by),
so the binaries are linked into a directory of the test's own. In CI the oracle must be
there: a missing one fails the test instead of skipping it.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.calicoctl_support import ORACLE
from tests.harness import CNIResult
from tests.ipam_support import run_ipam

_BLOCK_ROW = re.compile(r"^\| Block\s+\|\s*(\S+)\s*\|\s*(\d+)\s*\|\s*(\d+) ")


@dataclass(frozen=True)
class RealCalico:
    """The real binaries, linked under their role names in `bin_dir`."""

    bin_dir: Path

    def ipam(self, command: str, conf: dict[str, Any], container_id: str) -> CNIResult:
        return run_ipam(
            command, {**conf, "nodename_file_optional": True}, container_id, self.bin_dir
        )

    def calicoctl(self, env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin_dir / "calicoctl"), *argv],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def block_usage(self, env: dict[str, str]) -> dict[str, int]:
        """Block CIDR → addresses in use, from `calicoctl ipam show --show-blocks`."""
        shown = self.calicoctl(env, "ipam", "show", "--show-blocks")
        assert shown.returncode == 0, shown
        usage = {}
        for line in shown.stdout.splitlines():
            match = _BLOCK_ROW.match(line)
            if match:
                usage[match.group(1)] = int(match.group(3))
        return usage


@pytest.fixture(scope="session")
def real_calico(tmp_path_factory: pytest.TempPathFactory) -> RealCalico:
    binary = ORACLE / "calico"
    if not binary.is_file():
        message = f"real Calico is not at {ORACLE} (set CALICO_ORACLE_DIR)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    directory = tmp_path_factory.mktemp("real-calico")
    for role in ("calico", "calico-ipam"):
        (directory / role).symlink_to(binary)
    (directory / "calicoctl").symlink_to(ORACLE / "calicoctl")
    return RealCalico(directory)

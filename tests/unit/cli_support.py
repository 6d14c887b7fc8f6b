"""The in-process calicoctl the unit suites share: `main()` on a fresh SQLite file named by
LOCAL_DATASTORE_PATH, with the caller's stdin, returning exit code and output."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from calicoctl.cli import main


@dataclass
class Run:
    """One CLI invocation's exit code and output."""

    code: int
    out: str
    err: str


Cli = Callable[..., Run]


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    path = str(tmp_path / "calico.db")
    monkeypatch.setenv("LOCAL_DATASTORE_PATH", path)
    for name in ("DATASTORE_TYPE", "ETCD_ENDPOINTS", "KUBECONFIG"):
        monkeypatch.delenv(name, raising=False)
    return path


@pytest.fixture
def cli(db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    def run(*argv: str, stdin: str | None = None) -> Run:
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        code = main(list(argv))
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err
        return Run(code, captured.out, captured.err)

    return run

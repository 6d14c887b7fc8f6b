"""Calico's log line format, the private rotating file."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from cni_plugin import logs

LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \[INFO\]\[\d+\] cni-plugin/test_logs\.py \d+: "
    r'hello ContainerID="abc" Pod="p\\"q"$'
)


def test_line_format_and_rotation_keeps_files_private(tmp_path: Path) -> None:
    path = tmp_path / "dir" / "cni.log"
    log = logs.setup("cni-plugin", "warning", str(path), max_size_mb=1, max_count=2)
    assert logging.getLogger().level == logging.INFO  # Calico: anything unknown means info
    log.info("hello", extra={"fields": {"Pod": 'p"q', "ContainerID": "abc"}})
    first = path.read_text().splitlines()[0]
    assert LINE.match(first), first
    for _ in range(3000):  # > 1 MiB: forces a rotation
        log.info("x" * 500)
    assert (tmp_path / "dir" / "cni.log.1").exists()
    for p in (path, tmp_path / "dir" / "cni.log.1"):
        assert oct(os.stat(p).st_mode & 0o777) == "0o600", p
    assert oct(os.stat(tmp_path / "dir").st_mode & 0o777) == "0o700"
    logging.getLogger().handlers.clear()


def test_debug_level() -> None:
    logs.setup("ipam", "DEBUG")
    assert logging.getLogger().level == logging.DEBUG
    logging.getLogger().handlers.clear()

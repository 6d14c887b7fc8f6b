"""The node-wide IPAM lock: one flock serialises assign and release on a node.

Calico blocks forever on it; we wait a bounded time (kubelet gives up on a stuck CNI
call anyway) and then say which process holds it, read from /proc/locks.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager


class IPAMLockTimeout(Exception):
    """The lock was not free within the timeout; `holder` names who has it."""

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


def acquire_flock(fd: int, timeout: float) -> bool:
    """Take an exclusive flock on fd, polling with back-off; False if `timeout` passed.

    Polled rather than blocking so the wait is bounded (flock has no timeout of its own).
    """
    deadline = time.monotonic() + timeout
    pause = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


@contextmanager
def ipam_lock(path: str, timeout: float) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created 0600, parent 0700 when we make it)."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if not acquire_flock(fd, timeout):
            raise IPAMLockTimeout(
                f"timed out after {timeout:g}s waiting for the IPAM lock {path}",
                f"held by {lock_holder(fd)}",
            )
        yield
    finally:
        os.close(fd)  # closing the fd drops the flock


def lock_holder(fd: int) -> str:
    """The PID and command line of the process holding a flock on fd's file."""
    st = os.fstat(fd)
    inode_suffix = f":{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return "an unknown process"
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].endswith(inode_suffix):
            pid = fields[4]
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                cmd = "?"
            return f"pid {pid} ({cmd})"
    return "an unknown process"

"""Entering network namespaces by path, and the checks made before touching one.

We call setns(2) ourselves: pyroute2's `IPRoute(netns=...)` forks a helper process and
costs ~13 ms per netns against <1 ms here (cost-floor.md §4). A netlink socket opened
while the thread is inside a netns stays bound to it after we switch back.

Inside the node's CNI server a request's CNI_NETNS may come as a descriptor the client
opened (`handed_over`): the server may live in another mount namespace, where the path of
a netns created after it started does not lead to the namespace.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache
from typing import Any

from cni_plugin.types import (
    ERR_INVALID_ENV,
    ERR_INVALID_NETNS,
    ERR_UNKNOWN_CONTAINER,
    CNIError,
)

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3): which kind of namespace an nsfs fd is
SELF_NETNS = "/proc/self/ns/net"


class NetnsGone(Exception):
    """The netns path does not exist (any more)."""


# (CNI_NETNS, a descriptor of it) for the request served on this thread.
_handed_over: ContextVar[tuple[str, int] | None] = ContextVar("calico_netns_fd", default=None)


@contextmanager
def handed_over(path: str, fd: int) -> Iterator[None]:
    """Within the block, `path` means the namespace `fd` refers to (the client's open)."""
    token = _handed_over.set((path, fd))
    try:
        yield
    finally:
        _handed_over.reset(token)


def _handed_fd(path: str) -> int | None:
    handed = _handed_over.get()
    return handed[1] if handed is not None and handed[0] == path else None


@cache
def _libc() -> Any:
    """libc through ctypes (~3.5 ms to import): only entering a netns needs it, not skel's
    own-netns guard nor calico-ipam."""
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    import ctypes

    if _libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def open_netns(path: str) -> int:
    """Open `path` and make sure it is a network namespace; returns the fd.

    Raises NetnsGone when the path does not exist, CNIError(4) when it is not a netns.
    """
    handed = _handed_fd(path)
    try:
        fd = os.dup(handed) if handed is not None else os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise NetnsGone(path) from exc
    except OSError as exc:
        raise CNIError(ERR_INVALID_ENV, f"failed to open netns {path!r}: {exc.strerror}") from exc
    try:
        nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError as exc:
        nstype = None
        if exc.errno not in (errno.ENOTTY, errno.EINVAL):
            os.close(fd)
            raise CNIError(ERR_INVALID_ENV, f"failed to inspect netns {path!r}: {exc}") from exc
    if nstype != CLONE_NEWNET:
        os.close(fd)
        raise CNIError(
            ERR_INVALID_ENV,
            f"CNI_NETNS {path!r} is not a network namespace",
            "expected a path like /var/run/netns/<name> or /proc/<pid>/ns/net",
        )
    return fd


def open_netns_for_add(path: str) -> int:
    """open_netns for ADD/CHECK, where a missing namespace means an unknown container."""
    try:
        return open_netns(path)
    except NetnsGone as exc:
        raise CNIError(ERR_UNKNOWN_CONTAINER, f"network namespace {path!r} does not exist") from exc


@contextmanager
def entered(fd: int) -> Iterator[None]:
    """Run the block with the calling thread inside the netns `fd`, then switch back."""
    home = os.open(SELF_NETNS, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


def is_own_netns(path: str) -> bool:
    """True when `path` is the netns this process runs in (skel's CheckNetNS)."""
    handed = _handed_fd(path)
    try:
        target = os.fstat(handed) if handed is not None else os.stat(path)
    except OSError:
        return False
    own = os.stat(SELF_NETNS)
    return (target.st_dev, target.st_ino) == (own.st_dev, own.st_ino)


def guard_own_netns(path: str, environ: dict[str, str]) -> None:
    """Refuse a CNI_NETNS that is our own netns (a recycled /proc/<pid> path, plugins#714)."""
    if not path or environ.get("CNI_NETNS_OVERRIDE", "").lower() in ("1", "true"):
        return
    if is_own_netns(path):
        raise CNIError(
            ERR_INVALID_NETNS,
            "netns must not be the plugin's own network namespace",
            f"CNI_NETNS={path}; set CNI_NETNS_OVERRIDE=1 if this is intended",
        )

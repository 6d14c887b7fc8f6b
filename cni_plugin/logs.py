"""Logging in Calico's line format, to stderr and optionally a rotating file.

`2024-05-01 12:34:56.789 [INFO][4242] cni-plugin/plugin.py 123: msg Key="v"`: stdout
carries only the CNI result, so the runtime (kubelet, containerd) gets our logs from
stderr. Structured fields go in `extra={"fields": {...}}` and print sorted by key.

The root logger is configured once per process (`route_requests`) and each invocation's
records go to its own RequestLog (`capture`), so that the node agent's concurrent requests,
and an IPAM delegate run in its caller's process, each log as a one-shot plugin would:
`setup` then configures that invocation's log instead of the process's.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TextIO

# Calico accepts debug / info / error; anything else (warning included) means info.
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "error": logging.ERROR}


class CalicoFormatter(logging.Formatter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        # A shared file handler in the agent serves requests of both components.
        component = getattr(record, "calico_component", self.component)
        line = (
            f"{stamp}.{int(record.msecs):03d} [{record.levelname}][{record.process}] "
            f"{component}/{record.filename} {record.lineno}: {record.getMessage()}"
        )
        fields = getattr(record, "fields", None)
        if fields:
            line += "".join(f" {k}={_quote(v)}" for k, v in sorted(fields.items()))
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _quote(value: object) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def setup(
    component: str,
    level: str = "info",
    file_path: str = "",
    max_size_mb: int = 100,
    max_count: int = 10,
) -> logging.Logger:
    """Configure logging for this invocation; returns the component's logger.

    A one-shot plugin reconfigures the root logger; inside the agent, the request's own
    RequestLog is configured instead.
    """
    request = _current.get()
    if request is not None:
        request.configure(component, level, file_path, max_size_mb, max_count)
        return logging.getLogger(component)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(_level(level))
    formatter = CalicoFormatter(component)
    stderr = logging.StreamHandler()
    stderr.setFormatter(formatter)
    root.addHandler(stderr)
    if file_path:
        try:
            root.addHandler(_file_handler(file_path, max_size_mb, max_count, formatter))
        except OSError as exc:
            root.warning("cannot open log file %s: %s", file_path, exc)
    return logging.getLogger(component)


def _level(name: str) -> int:
    return _LEVELS.get(name.lower(), logging.INFO)


@dataclass
class RequestLog:
    """One invocation's log: lines for the caller's stderr (collected, or written as they
    come), and its netconf's log file."""

    component: str
    stream: TextIO = field(default_factory=io.StringIO)
    level: int = logging.INFO
    file: logging.Handler | None = None

    def configure(
        self, component: str, level: str, file_path: str, max_size_mb: int, max_count: int
    ) -> None:
        self.component = component
        self.level = _level(level)
        self.file = None
        if file_path:
            try:
                self.file = _shared_file_handler(file_path, max_size_mb, max_count)
            except OSError as exc:
                logging.getLogger(component).warning("cannot open log file %s: %s", file_path, exc)

    def text(self) -> str:
        """What was collected for the caller's stderr ("" when it went straight there)."""
        return self.stream.getvalue() if isinstance(self.stream, io.StringIO) else ""

    def write(self, record: logging.LogRecord, formatter: logging.Formatter) -> None:
        if record.levelno < self.level:
            return
        record.calico_component = self.component
        self.stream.write(formatter.format(record) + "\n")
        if self.file is not None:
            self.file.handle(record)


_current: ContextVar[RequestLog | None] = ContextVar("calico_request_log", default=None)
# One handler per log file in the agent: two handlers on one file would rotate it apart.
_shared_files: dict[str, logging.Handler] = {}
_shared_files_lock = threading.Lock()


def _shared_file_handler(path: str, max_size_mb: int, max_count: int) -> logging.Handler:
    with _shared_files_lock:
        handler = _shared_files.get(path)
        if handler is None:
            handler = _file_handler(path, max_size_mb, max_count, CalicoFormatter(""))
            _shared_files[path] = handler
        return handler


class _RequestRouter(logging.Handler):
    """Sends a record to the log of the request being served on its thread, if any, else to
    the agent's own handlers."""

    def __init__(self, own: list[logging.Handler]) -> None:
        super().__init__(logging.DEBUG)
        self.own = own
        self.setFormatter(CalicoFormatter(""))

    def emit(self, record: logging.LogRecord) -> None:
        request = _current.get()
        if request is not None:
            request.write(record, self.formatter)
            return
        for handler in self.own:
            if record.levelno >= handler.level:
                handler.handle(record)


def route_requests(component: str, level: str = "info", file_path: str = "") -> logging.Logger:
    """Configure a long-running agent's logging once: its own records at `level` to stderr
    (and `file_path`), each request's records to that request's RequestLog."""
    formatter = CalicoFormatter(component)
    own: list[logging.Handler] = [logging.StreamHandler()]
    if file_path:
        own.append(_file_handler(file_path, 100, 10, formatter))
    for handler in own:
        handler.setFormatter(formatter)
        handler.setLevel(_level(level))
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.DEBUG)  # each request filters at its own netconf's level
    root.addHandler(_RequestRouter(own))
    return logging.getLogger(component)


@contextmanager
def capture(component: str, stream: TextIO | None = None) -> Iterator[RequestLog]:
    """Route the records of the invocation run inside the block (this thread only) to its
    own log: `stream`, or collected for the caller when None.

    An invocation nested in another (an in-process IPAM delegate) writes to its parent's
    stream, as an exec'd plugin shares its parent's stderr.
    """
    parent = _current.get()
    if parent is not None:
        stream = parent.stream
    request = RequestLog(component) if stream is None else RequestLog(component, stream)
    token = _current.set(request)
    try:
        yield request
    finally:
        _current.reset(token)


def _file_handler(
    path: str, max_size_mb: int, max_count: int, formatter: logging.Formatter
) -> logging.Handler:
    # Imported here: logging.handlers costs ~8 ms and only a configured file needs it.
    from logging.handlers import RotatingFileHandler

    class PrivateRotatingFileHandler(RotatingFileHandler):
        """Opens every generation 0600: the log names pods and addresses."""

        def _open(self):  # type: ignore[no-untyped-def]
            fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            return os.fdopen(fd, "a", encoding=self.encoding)

    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    handler = PrivateRotatingFileHandler(
        path, maxBytes=max(max_size_mb, 1) * 1024 * 1024, backupCount=max(max_count, 1)
    )
    handler.setFormatter(formatter)
    return handler

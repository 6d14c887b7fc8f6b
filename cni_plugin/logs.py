"""Logging in Calico's line format, to stderr and optionally a rotating file.

`2024-05-01 12:34:56.789 [INFO][4242] cni-plugin/plugin.py 123: msg Key="v"`: stdout
carries only the CNI result, so the runtime (kubelet, containerd) gets our logs from
stderr. Structured fields go in `extra={"fields": {...}}` and print sorted by key.
"""

from __future__ import annotations

import logging
import os
import time

# Calico accepts debug / info / error; anything else (warning included) means info.
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "error": logging.ERROR}


class CalicoFormatter(logging.Formatter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        line = (
            f"{stamp}.{int(record.msecs):03d} [{record.levelname}][{record.process}] "
            f"{self.component}/{record.filename} {record.lineno}: {record.getMessage()}"
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
    """Configure the root logger once per process; returns the component's logger."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(_LEVELS.get(level.lower(), logging.INFO))
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

"""The CNI protocol skeleton shared by `calico` and `calico-ipam`.

Parses the environment and stdin in the order Go's skel does (so callers see the same
first error), applies the version gates, runs the verb and prints the result or the
error JSON on stdout. No networking here.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cni_plugin.dataplane.netns import guard_own_netns
from cni_plugin.types import (
    CURRENT_VERSION,
    DEFAULT_VERSION,
    ERR_DECODE,
    ERR_INCOMPATIBLE_VERSION,
    ERR_INTERNAL,
    ERR_INVALID_CONFIG,
    ERR_INVALID_ENV,
    ERR_IO,
    SUPPORTED_VERSIONS,
    CNIError,
    Result,
    version_at_least,
    version_tuple,
)

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")

# Which variables each verb needs (skel's reqForCmdEntry table).
_REQUIRED_ENV: dict[str, dict[str, bool]] = {
    "CNI_CONTAINERID": {"ADD": True, "CHECK": True, "DEL": True},
    "CNI_NETNS": {"ADD": True, "CHECK": True},
    "CNI_IFNAME": {"ADD": True, "CHECK": True, "DEL": True},
    "CNI_PATH": {"ADD": True, "CHECK": True, "DEL": True, "GC": True, "STATUS": True},
}
_MIN_VERSION = {"CHECK": "0.4.0", "GC": "1.1.0", "STATUS": "1.1.0"}

_ID_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")
_IFNAMSIZ = 16


@dataclass
class Request:
    """One plugin invocation: the CNI_* environment and the decoded netconf."""

    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: dict[str, str] = field(default_factory=dict)
    raw_args: str = ""
    path: list[str] = field(default_factory=list)
    stdin: bytes = b""
    config: dict[str, Any] = field(default_factory=dict)
    # The caller's whole environment: in the node agent it is not this process's.
    environ: dict[str, str] = field(default_factory=dict)

    @property
    def cni_version(self) -> str:
        return self.config.get("cniVersion") or DEFAULT_VERSION


Handler = Callable[[Request], Result | None]


def validate_container_id(container_id: str) -> None:
    if not _ID_RE.match(container_id):
        raise CNIError(ERR_INVALID_ENV, "invalid characters in containerID", container_id)


def validate_network_name(name: Any) -> None:
    if not name:
        raise CNIError(ERR_INVALID_CONFIG, "missing network name")
    if not isinstance(name, str) or not _ID_RE.match(name):
        raise CNIError(ERR_INVALID_CONFIG, "invalid characters found in network name", str(name))


def validate_ifname(ifname: str) -> None:
    if not ifname:
        raise CNIError(ERR_INVALID_ENV, "interface name is empty")
    if len(ifname.encode()) >= _IFNAMSIZ:
        raise CNIError(
            ERR_INVALID_ENV,
            "interface name is too long",
            f"interface name should be less than {_IFNAMSIZ} characters",
        )
    if ifname in (".", ".."):
        raise CNIError(ERR_INVALID_ENV, "interface name is . or ..")
    if any(c in "/:" or c.isspace() for c in ifname):
        raise CNIError(
            ERR_INVALID_ENV,
            "interface name contains / or : or whitespace characters",
            ifname,
        )


def parse_cni_args(raw: str) -> dict[str, str]:
    """Parse `K1=V1;K2=V2`. Unknown keys are kept: Calico prepends IgnoreUnknown=1 itself."""
    args: dict[str, str] = {}
    if not raw:
        return args
    for pair in raw.split(";"):
        parts = pair.split("=")
        if len(parts) != 2:
            raise CNIError(ERR_INVALID_ENV, f'ARGS: invalid pair "{pair}"', "CNI_ARGS")
        args[parts[0]] = parts[1]
    return args


def _read_env(environ: dict[str, str]) -> Request:
    command = environ.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CNIError(ERR_INVALID_ENV, f"unknown CNI_COMMAND: {command}")
    req = Request(command=command, environ=environ)
    missing = []
    for var, needed_by in _REQUIRED_ENV.items():
        value = environ.get(var, "")
        if not value:
            if needed_by.get(command):
                missing.append(var)
            continue
        if var == "CNI_CONTAINERID":
            if needed_by.get(command):
                validate_container_id(value)
            req.container_id = value
        elif var == "CNI_NETNS":
            req.netns = value
        elif var == "CNI_IFNAME":
            if needed_by.get(command):
                validate_ifname(value)
            req.ifname = value
        else:
            req.path = [p for p in value.split(":") if p]
    if command in ("ADD", "DEL", "CHECK"):
        req.raw_args = environ.get("CNI_ARGS", "")
        req.args = parse_cni_args(req.raw_args)
    if missing:
        raise CNIError(ERR_INVALID_ENV, f"required env variables [{','.join(missing)}] missing")
    return req


def _decode_config(req: Request, stdin: bytes) -> None:
    req.stdin = stdin
    try:
        config = json.loads(stdin)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CNIError(ERR_DECODE, f"error unmarshall network config: {exc}") from exc
    if not isinstance(config, dict):
        raise CNIError(ERR_DECODE, "error unmarshall network config: not a JSON object")
    version = config.get("cniVersion")
    if version is not None and not isinstance(version, str):
        raise CNIError(ERR_DECODE, "error unmarshall network config: cniVersion is not a string")
    req.config = config
    validate_network_name(config.get("name"))
    _check_version(req)


def _check_version(req: Request) -> None:
    version = req.cni_version
    version_tuple(version)
    minimum = _MIN_VERSION.get(req.command)
    if minimum and not version_at_least(version, minimum):
        raise CNIError(ERR_INCOMPATIBLE_VERSION, f"config version does not allow {req.command}")
    if version not in SUPPORTED_VERSIONS:
        raise CNIError(
            ERR_INCOMPATIBLE_VERSION,
            "incompatible CNI versions",
            f'config is "{version}", plugin supports {json.dumps(list(SUPPORTED_VERSIONS))}',
        )


def _version_document(stdin: bytes) -> dict[str, Any]:
    """VERSION echoes the input cniVersion when it is valid (the spec), else 1.1.0."""
    version = CURRENT_VERSION
    try:
        requested = json.loads(stdin).get("cniVersion") if stdin.strip() else None
        if isinstance(requested, str):
            version_tuple(requested)
            version = requested
    except (ValueError, AttributeError, CNIError):
        pass
    return {"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}


def read_stdin() -> bytes:
    """This process's stdin, as the plugin reads it (a terminal counts as empty)."""
    if os.isatty(0):
        return b""
    try:
        return sys.stdin.buffer.read()
    except OSError as exc:
        raise CNIError(ERR_IO, f"error reading from stdin: {exc}") from exc


@dataclass
class Outcome:
    """What one invocation hands back to its caller: exit code and stdout bytes."""

    code: int
    stdout: bytes


def _json_line(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc) + "\n").encode()


def execute(
    handlers: dict[str, Handler], environ: dict[str, str], stdin: Callable[[], bytes]
) -> Outcome:
    """Run one CNI invocation without touching process globals, so threads can share a process.

    `stdin` is called only once the environment is valid, as Go's skel reads it. Errors
    that escape the handlers as anything but CNIError are reported as code 999 with their
    message, never as a traceback.
    """
    req = Request(command="")
    try:
        req = _read_env(environ)
        if req.command == "VERSION":
            return Outcome(0, _json_line(_version_document(stdin())))
        _decode_config(req, stdin())
        if req.command in ("ADD", "DEL", "CHECK"):
            guard_own_netns(req.netns, environ)
        result = handlers[req.command](req)
        out = b"" if result is None else _json_line(result.to_version(req.cni_version))
        return Outcome(0, out)
    except CNIError as err:
        return Outcome(1, _json_line(err.to_dict(_error_version(req))))
    except Exception as exc:  # the last resort: a CNI error, never a traceback
        import logging

        logging.getLogger("cni").exception("unexpected error")
        error = CNIError(ERR_INTERNAL, str(exc) or type(exc).__name__)
        return Outcome(1, _json_line(error.to_dict(_error_version(req))))


def _error_version(req: Request) -> str:
    """Errors carry the config's version when it is one we speak, else the newest."""
    version = req.cni_version if req.config else CURRENT_VERSION
    return version if version in SUPPORTED_VERSIONS else CURRENT_VERSION

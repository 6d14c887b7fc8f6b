"""The `calico-node` role: the daemon, or one of the probes Calico's DaemonSet runs.

    calico-node                               the daemon, in the foreground (SIGTERM stops it)
    calico-node -felix-live -bird-live        liveness probe
    calico-node -felix-ready -bird-ready      readiness probe [-threshold-time 30s]
    calico-node -v                            version
    calico-node -uninstall                    remove what calico-node put on this host

Flags take one dash, as calico-node's Go flags do (two work too).
"""

from __future__ import annotations

import os
import sys

from calico_node import VERSION

PROBES = ("felix-live", "felix-ready", "bird-live", "bird-ready")
USAGE = (
    "usage: calico-node [-felix-live] [-felix-ready] [-bird-live] [-bird-ready] "
    "[-threshold-time DURATION] [-v] | -uninstall"
)


class UsageError(Exception):
    pass


def _duration(text: str) -> float:
    from libcalico.durations import parse_duration

    value = parse_duration(text)
    if value is None:
        raise UsageError(f"calico-node: -threshold-time {text!r} is not a duration (e.g. 30s)")
    return value


def parse(argv: list[str]) -> tuple[list[str], float, bool]:
    """(probes asked for, readiness threshold seconds, version asked)."""
    from calico_node.health import DEFAULT_THRESHOLD_S

    checks: list[str] = []
    threshold = DEFAULT_THRESHOLD_S
    version = False
    args = list(argv)
    while args:
        arg = args.pop(0)
        name, eq, value = arg.lstrip("-").partition("=")
        if not arg.startswith("-") or not name:
            raise UsageError(f"calico-node: unexpected argument {arg!r}\n{USAGE}")
        if name in PROBES:
            checks.append(name)
        elif name == "threshold-time":
            if not eq:
                if not args:
                    raise UsageError("calico-node: -threshold-time needs a value")
                value = args.pop(0)
            threshold = _duration(value)
        elif name == "uninstall":
            checks.append(name)
        elif name in ("v", "version"):
            version = True
        elif name in ("h", "help"):
            raise UsageError(USAGE)
        else:
            raise UsageError(f"calico-node: unknown flag {arg!r}\n{USAGE}")
    return checks, threshold, version


def main(argv: list[str]) -> int:
    try:
        checks, threshold, version = parse(argv)
    except UsageError as err:
        print(err, file=sys.stderr)
        return 2
    if version:
        print(VERSION)
        return 0
    from calico_node.config import ConfigError, NodeConfig
    from calico_node.felix.config import FelixConfig

    try:
        config = NodeConfig.from_env()
        FelixConfig.resolve(config.environ, {}, {})  # a bad FELIX_* stops the start, naming it
    except ConfigError as err:
        print(f"calico-node: {err}", file=sys.stderr)
        return 1
    if "uninstall" in checks:
        if checks != ["uninstall"]:
            print(f"calico-node: -uninstall goes alone\n{USAGE}", file=sys.stderr)
            return 2
        from calico_node.uninstall import run

        return run(config)
    if checks:
        from calico_node.health import probe

        code, lines = probe(config.paths, checks, threshold)
        for line in lines:
            print(line)
        return code
    return run_daemon(config)


def run_daemon(config: object) -> int:
    from calico_node.daemon import Daemon, DaemonError
    from cni_plugin import logs

    if os.geteuid() != 0:
        print("calico-node: must run as root", file=sys.stderr)
        return 1
    level = (
        os.environ.get("FELIX_LOGSEVERITYSCREEN")
        or os.environ.get("CALICO_STARTUP_LOGLEVEL")
        or "info"
    )
    logs.route_requests("calico-node", level)
    try:
        return Daemon(config).run()  # type: ignore[arg-type]
    except (DaemonError, OSError) as err:
        print(f"calico-node: {err}", file=sys.stderr)
        return 1

"""The operator's CLI: `calicoctl` (and `kubectl-calico`), with calicoctl's command tree:
create / replace / apply / validate / patch / delete / get / label, `ipam`, `node`,
`datastore migrate`, `version`. `calico` without CNI_COMMAND is the same CLI, where
`calico ctl ...` (the old spelling) is `calicoctl ...`.

Every failure ends here as one line on stderr and a non-zero exit, never a traceback:
the operator's mistakes (CommandError, usage), and a datastore that cannot be used.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from libcalico.version import VERSION

EXIT_FAILURE = 1
EXIT_USAGE = 2
LOG_LEVELS = ("panic", "fatal", "error", "warn", "warning", "info", "debug")


class UsageError(Exception):
    """The command line itself is wrong."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error becomes one line instead of usage text and exit()."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _common() -> argparse.ArgumentParser:
    """Options every calicoctl command takes."""
    common = _Parser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="a CalicoAPIConfig document; default /etc/calico/calicoctl.cfg if it exists, "
        "else the environment",
    )
    common.add_argument(
        "--allow-version-mismatch",
        action="store_true",
        help="run even though the cluster's Calico version differs from this client's",
    )
    return common


def build_parser(prog: str = "calicoctl") -> argparse.ArgumentParser:
    from calicoctl import commands, ipam, migrate, node

    parser = _Parser(
        prog=prog,
        description="Manage Calico resources, IP address management and nodes.",
    )
    parser.add_argument("-l", "--log-level", choices=LOG_LEVELS, default="panic")
    parser.add_argument(
        "--allow-version-mismatch",
        dest="allow_mismatch",
        action="store_true",
        help=argparse.SUPPRESS,
    )
    parser.add_argument(
        "-v", "--version", action="store_true", help="print the version (calico: the plugin's)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    common = _common()
    commands.register(sub, common)
    ipam.register(sub.add_parser("ipam", help="IP address management"), common)
    node.register(sub.add_parser("node", help="Calico node management"), common)
    migrate.register(sub.add_parser("datastore", help="Calico datastore management"), common)
    version = sub.add_parser("version", parents=[common], help="client and cluster version")
    version.set_defaults(handler=_version, uses_datastore=False)
    if prog == "calico":
        # Served before this parser runs (entry.run_command_line); listed here for --help.
        sub.add_parser("agent", help="run the node agent that serves CNI requests")
    return parser


def _plugin_version() -> int:
    from cni_plugin.types import SUPPORTED_VERSIONS

    print(f"calico {VERSION} (CNI protocol versions supported: {', '.join(SUPPORTED_VERSIONS)})")
    return 0


def _version(opts: argparse.Namespace) -> int:
    """calicoctl's `version`: this client, then the cluster's ClusterInformation."""
    from calicoctl.config import open_datastore
    from libcalico.datastore.base import DatastoreError, NotFound
    from libcalico.model import ResourceKey

    print(f"Client Version:    {VERSION}")
    try:
        with open_datastore(opts.config) as store:
            spec = store.get(ResourceKey("ClusterInformation", "default")).value.spec
    except (NotFound, DatastoreError):
        spec = {}
    print(f"Cluster Version:   {spec.get('calicoVersion') or 'unknown'}")
    print(f"Cluster Type:      {spec.get('clusterType') or 'unknown'}")
    return 0


def _minor(version: str) -> str:
    return ".".join(version.lstrip("v").split(".")[:2])


def check_version(opts: argparse.Namespace) -> None:
    """calicoctl refuses to act on a cluster of another Calico minor version unless
    --allow-version-mismatch says the operator means it."""
    from calicoctl.config import open_datastore
    from calicoctl.errors import CommandError
    from libcalico.datastore.base import NotFound
    from libcalico.model import ResourceKey

    with open_datastore(opts.config) as store:
        try:
            info = store.get(ResourceKey("ClusterInformation", "default")).value
        except NotFound:
            return
    cluster = str(info.spec.get("calicoVersion") or "")
    if cluster and _minor(cluster) != _minor(VERSION):
        raise CommandError(
            f"version mismatch: client version {VERSION}, cluster version {cluster}; "
            "use --allow-version-mismatch to override"
        )


def _fail(message: str, code: int = EXIT_FAILURE) -> int:
    print(message, file=sys.stderr)
    return code


def _alias(argv: list[str], prog: str) -> list[str]:
    """`calico ctl get ...` is `calicoctl get ...`."""
    return argv[1:] if prog == "calico" and argv[:1] == ["ctl"] else argv


def main(argv: list[str], prog: str = "calicoctl") -> int:
    from calicoctl.errors import CommandError
    from libcalico.datastore.base import DatastoreError

    parser = build_parser(prog)
    try:
        opts = parser.parse_args(_alias(argv, prog))
        if opts.version or (prog == "calico" and opts.command == "version"):
            return _plugin_version()
        if opts.command is None:
            parser.print_help()
            return 0
        if not hasattr(opts, "handler"):
            raise UsageError(f"{prog} {opts.command}: give a subcommand (see {prog} --help)")
        allowed = opts.allow_mismatch or getattr(opts, "allow_version_mismatch", False)
        if getattr(opts, "uses_datastore", True) and not allowed:
            check_version(opts)
        return opts.handler(opts)
    except UsageError as err:
        return _fail(str(err), EXIT_USAGE)
    except CommandError as err:
        return _fail(str(err))
    except DatastoreError as err:
        return _fail(f"datastore error: {err}")
    except BrokenPipeError:
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as err:  # the last line of defence: one line, never a traceback
        return _fail(f"internal error: {type(err).__name__}: {err}")

"""The operator's CLI: `calicoctl`, and `calico` run without CNI_COMMAND.

Every failure ends here as one line on stderr and a non-zero exit, never a traceback:
the operator's mistakes (CommandError, usage), and a datastore that cannot be used.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from cni_plugin.types import SUPPORTED_VERSIONS

VERSION = "0.1.0"
EXIT_FAILURE = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """The command line itself is wrong."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error becomes one line instead of usage text and exit()."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser(prog: str = "calico") -> argparse.ArgumentParser:
    from calicoctl import commands, ipam, node_status

    parser = _Parser(
        prog=prog,
        description="Calico-compatible CNI plugin. Run by the container runtime with "
        "CNI_COMMAND set; without it, these admin commands are available.",
    )
    parser.add_argument("-v", "--version", action="store_true", help="print the version")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("version", help="print the version and the CNI versions supported")

    datastore = _Parser(add_help=False)
    datastore.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="datastore settings (netconf keys or a CalicoAPIConfig); default: environment",
    )
    commands.register(
        sub.add_parser(
            "ctl", help="manage IP pools, reservations, IPAM configuration, cluster information"
        ),
        datastore,
    )
    ipam.register(sub.add_parser("ipam", help="inspect and repair IP address use"), datastore)
    node = sub.add_parser("node", help="this node's calico-node")
    node_status.register(node.add_subparsers(metavar="COMMAND", required=True))
    # Served before this parser runs (entry.run_command_line); listed here for --help.
    sub.add_parser("agent", help="run the node agent that serves CNI requests")
    return parser


def _print_version() -> int:
    print(f"calico {VERSION} (CNI protocol versions supported: {', '.join(SUPPORTED_VERSIONS)})")
    return 0


def _fail(message: str, code: int = EXIT_FAILURE) -> int:
    print(message, file=sys.stderr)
    return code


def main(argv: list[str], prog: str = "calico") -> int:
    from calicoctl.errors import CommandError
    from libcalico.datastore.base import DatastoreError

    parser = build_parser(prog)
    try:
        opts = parser.parse_args(argv)
        if opts.version or opts.command == "version":
            return _print_version()
        if opts.command is None:
            parser.print_help()
            return 0
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

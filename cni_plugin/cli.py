"""`calico` without CNI_COMMAND: the operator's admin commands."""

from __future__ import annotations

import argparse

from cni_plugin.types import SUPPORTED_VERSIONS

VERSION = "0.1.0"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calico",
        description="Calico-compatible CNI plugin. Run by the container runtime with "
        "CNI_COMMAND set; without it, these admin commands are available.",
    )
    parser.add_argument("-v", "--version", action="store_true", help="print the version")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("version", help="print the version and the CNI versions supported")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    opts = parser.parse_args(argv)
    if opts.version or opts.command == "version":
        print(
            f"calico {VERSION} (CNI protocol versions supported: {', '.join(SUPPORTED_VERSIONS)})"
        )
        return 0
    parser.print_help()
    return 0

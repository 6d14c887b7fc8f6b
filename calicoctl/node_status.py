"""`calicoctl node status`: until calico-node reports to it, what calicoctl prints when no
Calico process runs on this host. The node's own status (BIRD's sessions) replaces this
module (branch `node`)."""

from __future__ import annotations

import argparse

from calicoctl.errors import CommandError


def run(opts: argparse.Namespace) -> int:
    raise CommandError("Calico process is not running.")

"""`calico-node -uninstall`: take off this host what calico-node put there, once calico-node
is removed from it (it refuses while a calico-node runs for these paths).

Gone afterwards: the VXLAN devices (with their FDB and neighbour entries), every route Felix
owns and BIRD's (`persist` keeps them in the kernel after BIRD stops), tunl0's address,
Felix's nat chains and the jump to them, its ipsets, the `mtu` and `nodename` files the
CNI read, and confd's generated BIRD configuration. Pods' own veths and `/32` routes are
the CNI's, removed by its DEL.
"""

from __future__ import annotations

import contextlib
import os
import sys

from calico_node.config import NodeConfig
from calico_node.felix.dataplane import uninstall
from calico_node.instance import locked_pid
from calico_node.paths import NodePaths


def run(config: NodeConfig) -> int:
    if os.geteuid() != 0:
        print("calico-node: must run as root", file=sys.stderr)
        return 1
    pid = locked_pid(config.paths.daemon_lock)
    if pid is not None:
        print(
            f"calico-node: calico-node (pid {pid}) is running for {config.paths.run_dir}: "
            "stop it first",
            file=sys.stderr,
        )
        return 1
    removed = uninstall(config.paths.lib_dir, config.environ)
    removed += _remove_files(config.paths)
    for item in removed:
        print(f"removed {item}")
    return 0


def _remove_files(paths: NodePaths) -> list[str]:
    """The files start-up and confd wrote (the generated config dir only if left empty)."""
    config_dir = paths.bird_config_dir
    generated = sorted(config_dir.glob("*.cfg")) if config_dir.is_dir() else []
    removed = []
    for path in [paths.nodename_file, *generated]:
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(str(path))
    with contextlib.suppress(OSError):
        config_dir.rmdir()
    return removed

"""The node as the syncer's consumers see it; apart from the daemon, so they need not
import the daemon that starts them."""

from __future__ import annotations

from dataclasses import dataclass

from calico_node.config import NodeConfig
from calico_node.paths import NodePaths


@dataclass(frozen=True)
class NodeContext:
    """What every consumer knows of its own node after start-up."""

    name: str
    config: NodeConfig
    paths: NodePaths

"""confd as a consumer of the syncer: each snapshot rendered, checked and, when the text
changed, BIRD reloaded; BIRD itself started once the first configuration is in place
(a BIRD started before that would loop on a missing file, calico-node.md §7.8)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from calico_node.bird import Bird
from calico_node.confd.bgp import bird_view
from calico_node.confd.render import ConfigWriter, render
from calico_node.syncer import Consumer, Snapshot

if TYPE_CHECKING:
    from calico_node.context import NodeContext

log = logging.getLogger("confd")


class Confd(Consumer):
    name = "confd"

    def __init__(self, node: NodeContext, bird_binary: str = "bird") -> None:
        self.node = node
        self.writer = ConfigWriter(node.paths.bird_config_dir, bird_binary)
        self.bird = Bird(node.paths, bird_binary)
        self.reloads = 0

    def apply(self, snapshot: Snapshot) -> None:
        view = bird_view(snapshot, self.node.name, self.node.config.router_id)
        changed = self.writer.write(render(view))
        if changed:
            log.info(
                "BIRD configuration rendered: %d mesh, %d global, %d node-specific peers, %d blocks"
                "",
                len(view.mesh), len(view.global_peers), len(view.node_peers), len(view.blocks),
            )  # fmt: skip
        if not self.bird.started:
            self.bird.start()
        elif changed:
            self.bird.reload()
            self.reloads += 1

    def stop(self) -> None:
        if self.bird.started:
            self.bird.stop()

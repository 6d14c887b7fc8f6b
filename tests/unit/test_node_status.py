"""`calicoctl node status`'s table (olekukonko/tablewriter as calicoctl v3.29 sets it up) and
the parsing of BIRD 2's `show protocols` into Calico peers."""

from __future__ import annotations

from calico_node.birdctl import Reply, parse_protocols, peer_of
from calicoctl.node_status import table

SEED = """\
+---------------+-------------------+-------+----------+-------------+
| PEER ADDRESS  |     PEER TYPE     | STATE |  SINCE   |    INFO     |
+---------------+-------------------+-------+----------+-------------+
| 192.168.10.27 | node-to-node mesh | up    | 01:31:06 | Established |
| 192.168.10.28 | node-to-node mesh | up    | 01:31:06 | Established |
+---------------+-------------------+-------+----------+-------------+"""

WRAPPED = """\
+--------------+-------------------+-------+----------+---------------------------+
| PEER ADDRESS |     PEER TYPE     | STATE |  SINCE   |           INFO            |
+--------------+-------------------+-------+----------+---------------------------+
| 172.17.8.102 | node-to-node mesh | start | 23:29:23 | Active Socket: Connection |
|              |                   |       |          | refused                   |
+--------------+-------------------+-------+----------+---------------------------+"""


def test_seed_table() -> None:
    rows = [
        ["192.168.10.27", "node-to-node mesh", "up", "01:31:06", "Established"],
        ["192.168.10.28", "node-to-node mesh", "up", "01:31:06", "Established"],
    ]
    assert table(rows) == SEED


def test_long_info_wraps_at_30() -> None:
    rows = [
        [
            "172.17.8.102",
            "node-to-node mesh",
            "start",
            "23:29:23",
            "Active Socket: Connection refused",
        ]
    ]
    assert table(rows) == WRAPPED


def test_bird2_protocols_become_calico_peers() -> None:
    reply = Reply(
        0,
        [
            (2002, "Name       Proto      Table      State  Since         Info"),
            (1002, "static1    Static     master4    up     07:18:54      "),
            (1002, "kernel1    Kernel     master4    up     07:18:54      "),
            (1002, "Mesh_172_31_9_2 BGP        ---        up     07:18:56      Established   "),
            (
                1002,
                "Node_10_0_1_1_port_1790 BGP ---   start  07:19:10      Active        "
                "Socket: Connection refused",
            ),
            (1002, "Global_fd00__1 BGP        ---        up     07:18:56      Established   "),
            (1002, "Local_Workload_10_0_0_9 BGP --- up 07:18:56 Established"),
            (0, ""),
        ],
    )
    peers = [p for proto in parse_protocols(reply) if (p := peer_of(proto))]
    assert [(p.address, p.type, p.state, p.since, p.info, p.family) for p in peers] == [
        ("172.31.9.2", "node-to-node mesh", "up", "07:18:56", "Established", 4),
        ("10.0.1.1", "node specific", "start", "07:19:10", "Active Socket: Connection refused", 4),
        ("fd00::1", "global", "up", "07:18:56", "Established", 6),
    ]
    assert peers[0].established and not peers[1].established

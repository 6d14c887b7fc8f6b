"""Felix's share of calico-node: the node's dataplane, one manager per concern.

    config.py     FelixConfiguration and FELIX_* settings, with Felix's precedence
    model.py      what the dataplane should be, computed from the syncer's Snapshot (pure)
    vxlan.py      the VXLAN devices and their static FDB and neighbour entries
    ipip.py       tunl0, where the kernel has it (it does not here: the refusal)
    routes.py     the main-table routes Felix owns (remote blocks, borrowed IPs, blackholes)
    nat.py        natOutgoing: Calico's ipsets and nat chains, written atomically
    mtu.py        the host MTU, the tunnels' MTUs and CALICO_LIB_DIR/mtu
    monitor.py    netlink events that make the dataplane be re-checked at once
    dataplane.py  the syncer consumer that drives them in order, and the uninstall

Long-running only: pyroute2 for netlink, netaddr for pool arithmetic; the CNI path never
imports this package.
"""

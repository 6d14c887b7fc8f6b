"""calico-node, the node daemon (daemon.py), with the CNI fast-path server it runs."""

# ClusterInformation's calicoVersion as this daemon writes it.
VERSION = "v0.1.0"

"""calico-kube-controllers: the cluster-wide controllers (IPAM garbage collection)."""

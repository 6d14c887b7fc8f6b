"""The pod's dataplane: an rtnetlink client, network namespaces, the veth set-up and
CHECK's read-back of it."""

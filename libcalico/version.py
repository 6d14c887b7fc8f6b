"""This release's version, as every role reports it (`calicoctl version`, `calico -v`) and
as ClusterInformation's calicoVersion should name it."""

VERSION = "v0.1.0"

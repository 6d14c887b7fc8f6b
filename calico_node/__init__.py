"""The node daemon's parts; today the CNI fast-path server the executables hand off to."""

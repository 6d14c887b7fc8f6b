"""The operator's CLI over the shared library: commands, resource documents, tables."""

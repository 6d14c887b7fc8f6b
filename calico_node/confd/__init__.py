"""confd: BIRD's configuration rendered from the node's snapshot (bgp.py: the data,
templates/: the layout, render.py: the checked write, consumer.py: the cycle)."""

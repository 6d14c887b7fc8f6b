"""Calico's shared library, after libcalico-go: the resources and their Calico JSON,
selectors, and the datastore interface with its three backends. Every role imports it;
it imports none of them and knows nothing of CNI."""

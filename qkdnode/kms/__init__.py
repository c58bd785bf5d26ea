"""The site's key manager: end-to-end keys across trusted nodes.

A site's key manager sees the key stores of all its links. It relays keys hop by hop
(one-time pad of the next link's key, Wegman-Carter tags from the same link's key),
routes around links that are down or dry, serves the end-to-end keys over ETSI GS QKD
014 and describes the site in the shape of ETSI GS QKD 015's ``qkd_node``
(docs/network.md).
"""

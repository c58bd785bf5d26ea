"""The pair activities of one node, by concern: the shared state and services
(:mod:`.core`), the link steps it answers (:mod:`.steps`), calibration, synchronisation,
key exchange, block book-keeping and monitoring. :class:`qkdnode.session.ExchangeSession`
combines them."""

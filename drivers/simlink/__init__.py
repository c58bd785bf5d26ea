"""Physical model of a QKD link (source, fiber, receiver, clocks, adversary) whose views
are the simulated instruments of both nodes.

Modules: ``params`` (configuration: each process holds one side of the link),
``truths`` (the boxes' hidden hardware truths, drawn per seed), ``source`` (transmitter
core), ``receiver`` (detection physics and the tagger's clock), ``optics`` (instrument
settings to photons), ``world`` (the per-process worlds, the ZeroMQ fiber, fault
injection), ``instruments`` (interface implementations), ``registry_entries``, ``bench``.
"""

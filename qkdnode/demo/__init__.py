"""The ``qkdnode demo``: a transmitter and a receiver daemon over a simulated fiber.

Modules:

- :mod:`qkdnode.demo.config`: the demo TOML (every simulation parameter) and its overrides;
- :mod:`qkdnode.demo.nodeconfig`: the two node configs built from it (ports, keys, TOML);
- :mod:`qkdnode.demo.runner`: spawn the daemons, drive them over the bus, check the keys;
- :mod:`qkdnode.demo.summary`: the result record, its text and JSON forms, the live line;
- :mod:`qkdnode.demo.compare`: the same link in theory (decoy-state GLLP and PLOB);
- :mod:`qkdnode.demo.sweep`: one run per distance, a table, a CSV and a PNG;
- :mod:`qkdnode.demo.netns`: one network namespace per site, veth pairs between them
  (multi-site runs whose traffic crosses real interfaces instead of loopback).
"""

"""Simulators of instruments that speak their own protocol over TCP (not SCPI, not serial).

Each runs on loopback in a background thread and is what the real driver connects to."""

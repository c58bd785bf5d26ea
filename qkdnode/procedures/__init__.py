"""Calibration and synchronization procedures run by the node's state machine.

Each procedure is a pure core (functions of arrays, tested on synthetic data) plus a thin
async function driving the instrument interfaces of :mod:`drivers.interfaces` on one
node; what it needs from the other node is passed in as arguments or callables.
"""

"""Instrument drivers for a QKD node: interfaces, transports, real drivers, simulators.

This package is the lower layer: it never imports :mod:`qkdnode` and can be used alone
from a lab script::

    from drivers.registry import open_instrument
    laser = open_instrument("keysight_816x", name="laser", resource="GPIB0::20::INSTR@sim")
"""

__version__ = "0.1.0"

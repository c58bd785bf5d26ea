"""The public face of the simulated backends, for the node runtime and its config.

The node never reaches into a simulator's internals: it validates the ``[simulation]``
parameters with the models named here and runs the backend through
:class:`drivers.interfaces.SimulatedBackend` (warm up, start, stop, inject faults). The
simulated link (:mod:`drivers.simlink`) is the one backend today; it is imported only when
a config asks for it.
"""

from __future__ import annotations

from typing import Literal

from drivers.interfaces import SimulatedBackend
from drivers.simlink.params import ReceiverSimParams, TransmitterSimParams

SideParams = TransmitterSimParams | ReceiverSimParams

__all__ = ["ReceiverSimParams", "SideParams", "TransmitterSimParams", "open_backend"]


def open_backend(
    role: Literal["transmitter", "receiver"],
    params: SideParams,
    fiber_endpoint: str | None,
    name: str = "",
) -> SimulatedBackend:
    """This process's side of the simulated link (not started: call ``warm_up`` and
    ``start``). ``fiber_endpoint``: where the two sides' processes meet (None: none).
    ``name``: the link's name when the process takes part in several simulated links
    (its simulated instruments give it as their ``resource``); "" for the only one."""
    from drivers.simlink.backend import SimLinkBackend

    return SimLinkBackend(role, params, fiber_endpoint, name)

"""The simulated link as a :class:`drivers.interfaces.SimulatedBackend`: this process's
side of it (the transmitter's or the receiver's world), warmed up, started and stopped by
the node runtime, faults injected through :class:`drivers.interfaces.FaultInjector`."""

from __future__ import annotations

from typing import Any, Literal

from drivers.interfaces import FaultInjector, SimulatedBackend
from drivers.simlink.world import SideParams, get_world, start_world, stop_world, warm_up


class _WorldFaults(FaultInjector):
    def __init__(self, name: str) -> None:
        self.name = name

    def inject(self, fault: str, **params: Any) -> None:
        get_world(self.name).inject(fault, **params)

    def clear(self, fault: str) -> None:
        get_world(self.name).clear(fault)


class SimLinkBackend(SimulatedBackend):
    """One side of the simulated link (``role``'s world from that side's ``params``),
    joined to the other side's process over ``fiber_endpoint`` (None: no fiber). ``name``
    tells it from the other simulated links of the same process ("" when it is the only
    one); the simulated instruments on it give that name as their ``resource``."""

    def __init__(
        self,
        role: Literal["transmitter", "receiver"],
        params: SideParams,
        fiber_endpoint: str | None,
        name: str = "",
    ) -> None:
        self.role = role
        self.name = name
        self.params = params
        self.fiber_endpoint = fiber_endpoint
        self._started = False
        self._faults = _WorldFaults(name)

    def warm_up(self) -> None:
        warm_up(self.params)  # this side's kernels only (a receiver never builds Alice)

    def start(self) -> None:
        start_world(self.role, self.params, self.fiber_endpoint, name=self.name)
        self._started = True

    def stop(self) -> None:
        if self._started:
            stop_world(self.name)
            self._started = False

    @property
    def faults(self) -> FaultInjector:
        if not self._started:
            raise RuntimeError("the simulated link is not started")
        return self._faults

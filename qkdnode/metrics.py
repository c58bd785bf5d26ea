"""Prometheus metrics of a node, served over HTTP at ``/metrics``.

All metrics live on the node's own :class:`~prometheus_client.CollectorRegistry` (never the
global one), so two nodes in one test process do not collide. Names follow the Prometheus
conventions: ``qkdnode_`` prefix, base units as suffixes (``_seconds``, ``_bits``,
``_hertz``, ``_ratio``), ``_total`` for counters.

Why an aiohttp server on the event loop and not ``prometheus_client.start_http_server``
(a thread): the node already depends on aiohttp (ETSI 014 delivery), start and stop are
awaited like every other service, the socket binds exactly the configured address, and a
scrape is answered by the same loop that runs the node. If that loop hangs, the scrape
fails and Prometheus's ``up`` turns 0 instead of showing stale gauges as if all were well
(the same reasoning as the watchdog ping from the loop). Updates from worker threads are
safe: prometheus-client metrics are thread-safe.

Process metrics: prometheus-client's ``ProcessCollector`` needs ``/proc/stat``, which the
unit hides (``ProcSubset=pid``); :class:`SelfProcessCollector` reads only ``/proc/self``.

Secrets never reach this module: labels carry state names, basis names, detector and
instrument names only.
"""

from __future__ import annotations

import math
import os
import resource
import time
from collections.abc import Iterable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

import qkdnode
from qkdnode.alarms import ALARMS
from qkdnode.statemachine import State

#: Node states known in advance (the state machine's), so every state series exists (0)
#: from the first scrape. States passed to :meth:`NodeMetrics.set_state` that are not
#: listed are added on the fly.
DEFAULT_STATES: tuple[str, ...] = tuple(s.value for s in State)

#: Key store states of :meth:`NodeMetrics.set_keystore` that always exist.
DEFAULT_KEY_STATES: tuple[str, ...] = ("available", "reserved", "delivered", "expired")

#: Stage durations range from a sifting pass (ms) to a calibration sweep (minutes).
STAGE_BUCKETS_S: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)

BLOCK_OUTCOMES: tuple[str, ...] = ("ok", "aborted")


class SelfProcessCollector(Collector):
    """``process_*`` metrics from ``/proc/self`` and ``getrusage`` only.

    Works under ``ProcSubset=pid``: the start time uses ``CLOCK_BOOTTIME`` instead of the
    ``btime`` line of ``/proc/stat``.
    """

    def __init__(self, proc_self: str = "/proc/self") -> None:
        self._proc_self = proc_self
        self._ticks = float(os.sysconf("SC_CLK_TCK"))
        self._pagesize = resource.getpagesize()

    def collect(self) -> Iterable[Metric]:
        times = os.times()
        yield CounterMetricFamily(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            value=times.user + times.system,
        )
        try:
            with open(os.path.join(self._proc_self, "stat"), "rb") as f:
                fields = f.read().rsplit(b")", 1)[-1].split()
            # fields[0] is field 3 (state) of proc_pid_stat(5).
            start_ticks = float(fields[19])
            vsize = float(fields[20])
            rss_pages = float(fields[21])
        except (OSError, IndexError, ValueError):
            pass
        else:
            boot_epoch = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
            yield GaugeMetricFamily(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                value=boot_epoch + start_ticks / self._ticks,
            )
            yield GaugeMetricFamily(
                "process_virtual_memory_bytes", "Virtual memory size in bytes.", value=vsize
            )
            yield GaugeMetricFamily(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                value=rss_pages * self._pagesize,
            )
        try:
            open_fds = len(os.listdir(os.path.join(self._proc_self, "fd")))
        except OSError:
            pass
        else:
            yield GaugeMetricFamily(
                "process_open_fds", "Number of open file descriptors.", value=open_fds
            )
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY:
            yield GaugeMetricFamily(
                "process_max_fds", "Maximum number of open file descriptors.", value=soft
            )


def _finite(value: Any, what: str) -> float:
    x = float(value)
    if math.isnan(x):
        raise ValueError(f"{what} is NaN")
    return x


class NodeMetrics:
    """The metrics of one node and the HTTP endpoint serving them.

    ``node_id`` and ``role`` label the ``qkdnode_info`` series. ``states`` are the node
    states pre-created as 0 so dashboards and alerts see every series from the start.
    """

    def __init__(
        self,
        node_id: str = "",
        role: str = "",
        *,
        states: Iterable[str] = DEFAULT_STATES,
        process_metrics: bool = True,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._info = Info("qkdnode", "Node identity and software version.", registry=r)
        self._info.info({"node_id": node_id, "role": role, "version": qkdnode.__version__})

        self._state = Gauge(
            "qkdnode_state",
            "Current node state: 1 for the active state, 0 for the others.",
            ["state"],
            registry=r,
        )
        self._states: list[str] = []
        for s in states:
            self._add_state(s)
        self.current_state: str | None = None
        self._state_changes = Counter(
            "qkdnode_state_changes", "Number of node state changes.", registry=r
        )
        self._state_since = Gauge(
            "qkdnode_state_since_timestamp_seconds",
            "Unix time at which the node entered its current state.",
            registry=r,
        )
        self._healthy = Gauge(
            "qkdnode_healthy",
            "1 when the node reports itself healthy, 0 otherwise.",
            registry=r,
        )

        self._qber = Gauge(
            "qkdnode_qber_ratio",
            "Quantum bit error ratio of the last block.",
            ["basis"],
            registry=r,
        )
        self._sifted_rate = Gauge(
            "qkdnode_sifted_key_rate_bits_per_second",
            "Sifted key rate of the last block.",
            registry=r,
        )
        self._secret_rate = Gauge(
            "qkdnode_secret_key_rate_bits_per_second",
            "Secret key rate of the last block (0 for an aborted block).",
            registry=r,
        )
        self._ec_efficiency = Gauge(
            "qkdnode_ec_efficiency_ratio",
            "Error-correction efficiency f = disclosed bits / (n H2(QBER)) of the last block.",
            registry=r,
        )
        self._blocks = Counter(
            "qkdnode_blocks", "Key blocks processed, by outcome.", ["outcome"], registry=r
        )
        for outcome in BLOCK_OUTCOMES:
            self._blocks.labels(outcome=outcome)
        self._sifted_bits = Counter("qkdnode_sifted_bits", "Sifted key bits produced.", registry=r)
        self._secret_bits = Counter("qkdnode_secret_bits", "Secret key bits produced.", registry=r)
        self._disclosed_bits = Counter(
            "qkdnode_disclosed_bits",
            "Bits disclosed during error correction and verification.",
            registry=r,
        )
        self._last_block = Gauge(
            "qkdnode_last_block_timestamp_seconds",
            "Unix time at which the last key block finished.",
            registry=r,
        )

        self._keys = Gauge(
            "qkdnode_keystore_keys", "Keys in the key store, by state.", ["state"], registry=r
        )
        for key_state in DEFAULT_KEY_STATES:
            self._keys.labels(state=key_state)
        self._key_capacity = Gauge(
            "qkdnode_keystore_capacity_keys", "Maximum number of keys in the key store.", registry=r
        )
        self._key_fill = Gauge(
            "qkdnode_keystore_fill_ratio",
            "Available keys divided by the key store capacity.",
            registry=r,
        )

        self._detector_rate = Gauge(
            "qkdnode_detector_count_rate_hertz",
            "Click rate of each single-photon detector.",
            ["detector"],
            registry=r,
        )
        self._instrument_up = Gauge(
            "qkdnode_instrument_up",
            "1 when the instrument answers, 0 otherwise.",
            ["instrument"],
            registry=r,
        )
        self._stage = Histogram(
            "qkdnode_stage_duration_seconds",
            "Duration of each processing stage (sifting, error correction, ...).",
            ["stage"],
            buckets=STAGE_BUCKETS_S,
            registry=r,
        )
        self._auth_balance = Gauge(
            "qkdnode_auth_key_balance_bits",
            "Pre-shared and recycled key bits left for message authentication.",
            registry=r,
        )
        self._alarm = Gauge(
            "qkdnode_alarm_active",
            "1 while the alarm is raised, 0 otherwise (every known alarm is listed).",
            ["alarm", "severity"],
            registry=r,
        )
        for name, (severity, _) in ALARMS.items():
            self._alarm.labels(alarm=name, severity=severity.value).set(0)
        self._key_rate = Gauge(
            "qkdnode_session_key_rate_bits_per_second",
            "Secret bits committed since the exchange started, divided by its duration.",
            registry=r,
        )
        self._since_block = Gauge(
            "qkdnode_last_block_age_seconds",
            "Seconds since the last committed key block (since start if none).",
            registry=r,
        )
        if process_metrics:
            r.register(SelfProcessCollector())
            PlatformCollector(registry=r)
            GCCollector(registry=r)

        self._runner: web.AppRunner | None = None
        self.bound: tuple[str, int] | None = None

    # -- updates -------------------------------------------------------------------------

    def _add_state(self, name: str) -> None:
        if not name:
            raise ValueError("state name must not be empty")
        if name not in self._states:
            self._states.append(name)
            self._state.labels(state=name).set(0)

    def set_state(self, name: str) -> None:
        """Mark ``name`` as the current node state (one-hot over all known states)."""
        self._add_state(name)
        if name == self.current_state:
            return
        for s in self._states:
            self._state.labels(state=s).set(1 if s == name else 0)
        if self.current_state is not None:
            self._state_changes.inc()
        self.current_state = name
        self._state_since.set(time.time())

    def set_healthy(self, healthy: bool) -> None:
        self._healthy.set(1 if healthy else 0)

    def observe_block(self, stats: Mapping[str, Any]) -> None:
        """Record a finished key block.

        Keys read from ``stats`` (all optional; other keys are ignored, so the pipeline's
        full statistics dict can be passed):

        - ``outcome``: ``"ok"`` (default) or ``"aborted"``
        - ``qber``: ratio by basis, e.g. ``{"Z": 0.012, "X": 0.02}``, or one number (basis "all")
        - ``sifted_bits``, ``secret_bits``, ``disclosed_bits``: bits in this block
        - ``duration_s``: wall time the block took; rates are bits / duration_s
        - ``sifted_key_rate_bps``, ``secret_key_rate_bps``: explicit rates (override)
        - ``ec_efficiency``: error-correction efficiency f
        - ``stage_durations_s``: ``{stage: seconds}``, fed to :meth:`observe_stage`
        """
        outcome = str(stats.get("outcome", "ok"))
        if outcome not in BLOCK_OUTCOMES:
            raise ValueError(f"block outcome must be one of {BLOCK_OUTCOMES}, got {outcome!r}")
        qber = stats.get("qber")
        if isinstance(qber, Mapping):
            for basis, value in qber.items():
                self._qber.labels(basis=str(basis)).set(_finite(value, f"qber[{basis}]"))
        elif qber is not None:
            self._qber.labels(basis="all").set(_finite(qber, "qber"))

        sifted = int(stats.get("sifted_bits", 0))
        secret = int(stats.get("secret_bits", 0)) if outcome == "ok" else 0
        disclosed = int(stats.get("disclosed_bits", 0))
        if min(sifted, secret, disclosed) < 0:
            raise ValueError("bit counts must be >= 0")
        self._sifted_bits.inc(sifted)
        self._secret_bits.inc(secret)
        self._disclosed_bits.inc(disclosed)

        duration = _finite(stats.get("duration_s") or 0.0, "duration_s")
        if "sifted_key_rate_bps" in stats:
            self._sifted_rate.set(_finite(stats["sifted_key_rate_bps"], "sifted_key_rate_bps"))
        elif duration > 0:
            self._sifted_rate.set(sifted / duration)
        if "secret_key_rate_bps" in stats and outcome == "ok":
            self._secret_rate.set(_finite(stats["secret_key_rate_bps"], "secret_key_rate_bps"))
        elif duration > 0 or outcome != "ok":
            self._secret_rate.set(secret / duration if duration > 0 else 0.0)
        if "ec_efficiency" in stats and stats["ec_efficiency"] is not None:
            self._ec_efficiency.set(_finite(stats["ec_efficiency"], "ec_efficiency"))
        for stage, seconds in dict(stats.get("stage_durations_s", {})).items():
            self.observe_stage(str(stage), float(seconds))
        self._blocks.labels(outcome=outcome).inc()
        self._last_block.set(time.time())

    def set_keystore(self, counts: Mapping[str, int], capacity: int) -> None:
        """Key counts by state (``available``, ``reserved``, ...) and the store's capacity.

        The fill ratio is ``available / capacity`` (all non-expired keys when the counts
        have no ``available`` entry).
        """
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        for key_state, n in counts.items():
            self._keys.labels(state=str(key_state)).set(int(n))
        self._key_capacity.set(capacity)
        if "available" in counts:
            filled = int(counts["available"])
        else:
            filled = sum(int(n) for s, n in counts.items() if s != "expired")
        self._key_fill.set(min(1.0, filled / capacity))

    def set_detector_rates(self, rates_hz: Mapping[str, float]) -> None:
        """Click rate of each detector (Hz), e.g. ``{"D0": 1.2e5, "D1": 1.1e5}``."""
        for detector, rate in rates_hz.items():
            self._detector_rate.labels(detector=str(detector)).set(_finite(rate, "rate"))

    def set_instrument_up(self, name: str, up: bool) -> None:
        self._instrument_up.labels(instrument=name).set(1 if up else 0)

    def set_alarm(self, name: str, severity: str, active: bool) -> None:
        self._alarm.labels(alarm=name, severity=severity).set(1 if active else 0)

    def set_session(self, key_rate_bps: float, seconds_since_last_block: float) -> None:
        self._key_rate.set(_finite(key_rate_bps, "key_rate_bps"))
        self._since_block.set(_finite(seconds_since_last_block, "seconds_since_last_block"))

    def set_auth_balance_bits(self, n: int) -> None:
        self._auth_balance.set(int(n))

    def observe_stage(self, stage: str, seconds: float) -> None:
        if seconds < 0 or math.isnan(seconds):
            raise ValueError(f"stage duration must be >= 0, got {seconds}")
        self._stage.labels(stage=stage).observe(seconds)

    # -- exposition ----------------------------------------------------------------------

    def render(self) -> bytes:
        """The text exposition format of all metrics (what ``/metrics`` returns)."""
        data: bytes = generate_latest(self.registry)
        return data

    async def _handle_metrics(self, request: web.Request) -> web.Response:
        body = self.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start_http(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` only; returns the bound port (for ``port=0``)."""
        if self._runner is not None:
            raise RuntimeError("metrics endpoint already started")
        app = web.Application()
        app.router.add_get("/metrics", self._handle_metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host=host, port=port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_port = port
        for address in runner.addresses:
            if isinstance(address, tuple) and len(address) >= 2:
                bound_port = int(address[1])
                break
        self.bound = (host, bound_port)
        return bound_port

    @property
    def url(self) -> str | None:
        """``http://host:port/metrics`` once started."""
        if self.bound is None:
            return None
        host, port = self.bound
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}/metrics"

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        self.bound = None

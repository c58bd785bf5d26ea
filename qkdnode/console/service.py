"""The console as a site service: it hears the links, keeps the history, serves the pages.

Started by the daemon after the links (like the key manager) and stopped before them. It
listens to each link's telemetry in-process (blocks, alarms, detector rates, calibration
and sync results go to the history as they come, and to the open pages), reads each
link's ``status`` every :data:`~qkdnode.console.live.LIVE_INTERVAL_S` for the overview,
and writes one history sample per link every ``console.sample_interval_s``.

History writes run in a worker thread, in batches, off the node's event loop; a write
that fails is logged and dropped (the console must never stop the key flow).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from qkdnode.bus.commands import CallerInfo
from qkdnode.bus.errors import CommandError
from qkdnode.config.console import ConsoleSection
from qkdnode.console.history import HistoryStore
from qkdnode.console.live import LIVE_INTERVAL_S, LiveHub
from qkdnode.console.models import (
    ActiveAlarm,
    AlarmRecord,
    BlockRecord,
    EventRecord,
    LinkRow,
    Overview,
    Role,
    Sample,
)
from qkdnode.console.ports import ConsoleLink

log = structlog.get_logger(__name__)

#: the console's own reads of a link (status, alarms, network view)
READER = CallerInfo("console", "monitor")
#: telemetry topics kept in the history's ``events`` table as they came
KEPT_TOPICS = ("state", "sync", "sync.acquired", "tracking")
KEPT_PREFIXES = ("calibration.",)
#: seconds between two prunes of the history
PRUNE_INTERVAL_S = 3600.0
#: detector rates older than this many sampling intervals are not sampled
RATES_FRESH_INTERVALS = 2.0

Written = Sample | BlockRecord | AlarmRecord | EventRecord


class ConsoleService:
    """The web console of site ``site`` over the links ``ports()`` gives at start."""

    def __init__(
        self,
        site: str,
        cfg: ConsoleSection,
        state_dir: Path,
        ports: Callable[[], Sequence[ConsoleLink]],
        *,
        network: bool = False,
        live_interval_s: float = LIVE_INTERVAL_S,
    ) -> None:
        self.site = site
        self.cfg = cfg
        path = cfg.history_file
        self.history_path = path if path.is_absolute() else state_dir / path
        self._ports = ports
        self.network = network
        self.live_interval_s = live_interval_s
        self.links: dict[str, ConsoleLink] = {}
        self.hub = LiveHub()
        self.history: HistoryStore | None = None
        self.rows: dict[str, LinkRow] = {}
        self.network_view: dict[str, Any] | None = None
        self._rates: dict[str, tuple[float, tuple[float, ...]]] = {}
        self._queue: asyncio.Queue[Written] = asyncio.Queue(10_000)
        self._unlisten: list[Callable[[], None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._server: Any = None
        self.url: str | None = None

    # -- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Open the history, hear the links, serve the pages. Raises HistoryError or
        OSError (port taken) with nothing left running."""
        from qkdnode.console.server import start_console_server

        self.history = await asyncio.to_thread(
            HistoryStore, self.history_path, retention_s=self.cfg.retention_days * 86400.0
        )
        await asyncio.to_thread(self.history.prune)
        for port in self._ports():
            self.links[port.name] = port
            self._unlisten.append(port.listen(self._listener(port.name)))
        try:
            self._server = await start_console_server(self)
        except BaseException:
            await self.stop()
            raise
        self.url = self._server.url
        self._tasks = [
            asyncio.create_task(self._write_loop(), name="console-history"),
            asyncio.create_task(self._live_loop(), name="console-live"),
            asyncio.create_task(self._prune_loop(), name="console-prune"),
        ]
        log.info("console.listening", url=self.url, links=sorted(self.links))

    async def stop(self) -> None:
        for stop in self._unlisten:
            stop()
        self._unlisten.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.stop()
            self._server = None
        if self.history is not None:
            await self._flush()
            await asyncio.to_thread(self.history.close)
            self.history = None

    # -- what the pages read ------------------------------------------------------------

    def overview(self, role: Role | None) -> Overview:
        return Overview(
            site=self.site,
            ts_s=time.time(),
            role=role,
            stale_after_s=self.cfg.stale_after_s,
            links=[self.rows[name] for name in sorted(self.rows)],
            network=self.network,
        )

    async def act(self, link: str, action: str, caller: CallerInfo) -> dict[str, Any]:
        """Run ``action`` on ``link`` as ``caller`` (the control socket's checks apply).
        KeyError for an unknown link; CommandError when refused."""
        port = self.links[link]
        log.info("console.action", link=link, action=action, by=caller.name)
        result = await port.call(action, caller)
        await self.refresh()
        return result

    async def network_now(self) -> dict[str, Any] | None:
        """The key management network as this site sees it (None: not in a network)."""
        if not self.network:
            return None
        for port in self.links.values():
            try:
                view = await port.call("network", READER)
            except CommandError:
                continue
            self.network_view = view
            return view
        return self.network_view

    # -- telemetry ----------------------------------------------------------------------

    def _listener(self, link: str) -> Callable[[str, int, float, dict[str, Any]], None]:
        def hear(topic: str, seq: int, ts: float, payload: dict[str, Any]) -> None:
            self.on_telemetry(link, topic, ts, payload)

        return hear

    def on_telemetry(self, link: str, topic: str, ts: float, payload: dict[str, Any]) -> None:
        """One telemetry message of ``link``: to the history and to the pages."""
        if topic == "block":
            block = block_record(link, ts, payload)
            self._keep(block)
            self.hub.push("block", block.model_dump(mode="json"))
        elif topic == "alarm":
            alarm = alarm_record(link, ts, payload)
            if alarm is not None:
                self._keep(alarm)
                self.hub.push("alarm", alarm.model_dump(mode="json"))
        elif topic == "rates":
            rates = _numbers(payload.get("detector_count_rate_hz"))
            self._rates[link] = (ts, rates)
            self.hub.push("rates", {"link": link, "ts_s": ts, "detector_rates_hz": rates})
        elif topic == "network":
            self.network_view = payload
            self.hub.push("network", payload)
        elif topic in KEPT_TOPICS or topic.startswith(KEPT_PREFIXES):
            event = EventRecord(link=link, ts_s=ts, topic=topic, payload=payload)
            self._keep(event)
            self.hub.push("event", event.model_dump(mode="json"))

    def _keep(self, record: Written) -> None:
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            log.warning("console.history_queue_full", dropped=type(record).__name__)

    # -- loops --------------------------------------------------------------------------

    async def refresh(self) -> list[LinkRow]:
        """Read every link's status now; publish the overview."""
        now = time.time()
        rows = await asyncio.gather(*(self._row(n, p, now) for n, p in self.links.items()))
        for row in rows:
            self.rows[row.link] = row
        self.hub.push("overview", self.overview(None).model_dump(mode="json"))
        return list(rows)

    async def _row(self, name: str, port: ConsoleLink, now: float) -> LinkRow:
        try:
            status = await port.call("status", READER)
        except Exception as exc:
            log.debug("console.status_failed", link=name, error=str(exc)[:200])
            old = self.rows.get(name)
            if old is not None:
                return old.model_copy(update={"reachable": False})
            return LinkRow(
                link=name, role=port.role, peer_id=port.peer_site, state="UNKNOWN", reachable=False
            )
        return link_row(name, status, now)

    async def _live_loop(self) -> None:
        next_sample = 0.0
        while True:
            try:
                rows = await self.refresh()
                now = time.time()
                if now >= next_sample:
                    next_sample = now + self.cfg.sample_interval_s
                    for row in rows:
                        if row.reachable:
                            self._keep(self._sample(row, now))
            except Exception as exc:  # never let the console's loop die
                log.exception("console.live_failed", error=str(exc))
            await asyncio.sleep(self.live_interval_s)

    def _sample(self, row: LinkRow, now: float) -> Sample:
        rates: tuple[float, ...] = ()
        heard = self._rates.get(row.link)
        fresh_s = RATES_FRESH_INTERVALS * max(self.cfg.sample_interval_s, 1.0)
        if heard is not None and now - heard[0] <= fresh_s:
            rates = heard[1]
        return Sample(
            link=row.link,
            ts_s=now,
            state=row.state,
            key_rate_bps=row.key_rate_bps,
            qber=row.qber,
            keys_available=row.keys_available,
            fill_ratio=row.fill_ratio,
            auth_balance_bits=row.auth_balance_bits,
            secret_bits=row.secret_bits,
            detector_rates_hz=rates,
        )

    async def _write_loop(self) -> None:
        while True:
            first = await self._queue.get()
            batch = [first]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._write(batch)

    async def _flush(self) -> None:
        batch: list[Written] = []
        while not self._queue.empty():
            batch.append(self._queue.get_nowait())
        if batch:
            await self._write(batch)

    async def _write(self, batch: list[Written]) -> None:
        store = self.history
        if store is None:
            return
        try:
            await asyncio.to_thread(_write_batch, store, batch)
        except Exception as exc:
            log.error("console.history_write_failed", rows=len(batch), error=str(exc)[:200])

    async def _prune_loop(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_INTERVAL_S)
            if self.history is not None:
                try:
                    n = await asyncio.to_thread(self.history.prune)
                    log.info("console.history_pruned", rows=n)
                except Exception as exc:
                    log.error("console.history_prune_failed", error=str(exc)[:200])


def _write_batch(store: HistoryStore, batch: list[Written]) -> None:
    store.add_samples(r for r in batch if isinstance(r, Sample))
    store.add_blocks(r for r in batch if isinstance(r, BlockRecord))
    for record in batch:
        if isinstance(record, AlarmRecord):
            store.add_alarm(record)
        elif isinstance(record, EventRecord):
            store.add_event(record)


# -- telemetry and status -> records ------------------------------------------------------


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    x = float(value)
    return x if math.isfinite(x) else None


def _int(value: Any) -> int:
    x = _num(value)
    return int(x) if x is not None else 0


def _numbers(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(x for x in (_num(v) for v in value) if x is not None)


def block_record(link: str, ts: float, payload: dict[str, Any]) -> BlockRecord:
    """The ``block`` telemetry payload as a record (missing fields 0 or None)."""
    seconds = sum(
        x
        for k, v in payload.items()
        if k.startswith("seconds_") and (x := _num(v)) is not None and x >= 0
    )
    stats = {
        k: v
        for k, v in payload.items()
        if isinstance(v, str | bool | type(None)) or _num(v) is not None
    }
    return BlockRecord(
        link=link,
        ts_s=ts,
        block_id=_int(payload.get("block_id")),
        ok=bool(payload.get("ok")),
        qber_z=_num(payload.get("qber_z")),
        qber_x=_num(payload.get("qber_x")),
        detections=max(0, _int(payload.get("detections"))),
        sifted_z=max(0, _int(payload.get("sifted_z"))),
        ec_disclosed_bits=max(0, _int(payload.get("ec_disclosed_bits"))),
        final_key_bits=max(0, _int(payload.get("final_key_bits"))),
        block_seconds=seconds,
        stats=stats,
    )


def alarm_record(link: str, ts: float, payload: dict[str, Any]) -> AlarmRecord | None:
    event = payload.get("event")
    if event not in ("raise", "clear"):
        return None
    return AlarmRecord(
        link=link,
        ts_s=ts,
        event=event,
        name=str(payload.get("name", ""))[:100],
        severity=str(payload.get("severity", ""))[:20],
        cause=str(payload.get("reason") if event == "clear" else payload.get("cause", ""))[:500],
    )


def link_row(link: str, status: dict[str, Any], now: float) -> LinkRow:
    """The overview row of ``link`` from its ``status`` reply (docs/protocol.md)."""
    stats = status.get("stats") if isinstance(status.get("stats"), dict) else {}
    assert isinstance(stats, dict)
    keystore = status.get("keystore") if isinstance(status.get("keystore"), dict) else {}
    assert isinstance(keystore, dict)
    last = stats.get("last_block")
    last_id = _num(last.get("block_id")) if isinstance(last, dict) else None
    alarms = [
        ActiveAlarm(
            name=str(a.get("name", "")),
            severity=str(a.get("severity", "")),
            since_s=_num(a.get("since")) or 0.0,
            cause=str(a.get("cause", ""))[:500],
        )
        for a in status.get("alarms", [])
        if isinstance(a, dict)
    ]
    return LinkRow(
        link=link,
        role=str(status.get("role", "")),
        peer_id=str(status.get("peer_id", "")),
        state=str(status.get("state", "UNKNOWN")),
        state_since_s=_num(status.get("state_since")),
        healthy=bool(status.get("healthy")),
        peer_connected=bool(status.get("peer_connected")),
        key_rate_bps=max(0.0, _num(stats.get("secret_key_rate_bps")) or 0.0),
        qber=_num(stats.get("qber")),
        keys_available=max(0, _int(keystore.get("available"))),
        fill_ratio=max(0.0, _num(status.get("keystore_fill_ratio")) or 0.0),
        auth_balance_bits=_int(stats.get("auth_key_balance_bits")),
        secret_bits=max(0, _int(stats.get("secret_bits"))),
        last_block_id=int(last_id) if last_id is not None else None,
        seconds_since_last_block=_num(status.get("seconds_since_last_block")),
        alarms=alarms,
        updated_s=now,
        reachable=True,
    )

"""The text of ``qkdnode ctl watch``'s screens: one node's state, last block, key rate,
QBER, key store, authentication balance, progress and alarms (:func:`render_node`), and the
raw telemetry view (:func:`render_view`)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from qkdnode.cli.ctl_format import duration, scalar
from qkdnode.cli.ctl_nodes import NodeAddr
from qkdnode.client import TelemetryEvent


def render_view(values: dict[str, TelemetryEvent], seq: int, stale: bool, endpoint: str) -> str:
    """The text of the raw telemetry view (one line per topic, newest value)."""
    head = f"qkdnode telemetry  {endpoint}  seq {seq}  {time.strftime('%H:%M:%S')}"
    lines = [head + ("  [STALE: no data]" if stale else ""), "-" * min(100, len(head) + 20)]
    lines += _topic_lines(values)
    return "\n".join(lines) + "\n"


def _topic_lines(values: dict[str, TelemetryEvent], now: float | None = None) -> list[str]:
    now = time.time() if now is None else now
    width = max((len(t) for t in values), default=5)
    lines = []
    for topic in sorted(values):
        ev = values[topic]
        age = max(0.0, now - ev.ts)
        body = ", ".join(f"{k}={scalar(v)}" for k, v in ev.payload.items())
        lines.append(f"{topic:<{width}}  {age:6.1f}s  {body}"[:200])
    return lines


@dataclass
class NodeScreen:
    """What ``watch`` knows about one node; :func:`render_node` draws it."""

    addr: NodeAddr
    status: dict[str, Any] | None = None
    status_at: float = 0.0  # wall time of ``status``
    values: dict[str, TelemetryEvent] = field(default_factory=dict)
    connected: bool = False
    down_since: float | None = None  # wall time
    down_reason: str = ""
    telemetry_stale: bool = False
    restarts: int = 0
    notices: deque[str] = field(default_factory=lambda: deque(maxlen=3))
    measured_rate_bps: float | None = None
    error: str = ""


def render_node(screen: NodeScreen, now: float, topics: tuple[str, ...] = ()) -> list[str]:
    """The lines of one node's screen: state and age, last block, key rate, QBER, key store
    fill, authentication balance, alarms, progress; only the fields the node reports."""
    st = screen.status or {}
    stats = st.get("stats") if isinstance(st.get("stats"), dict) else {}
    assert isinstance(stats, dict)
    name = str(st.get("node_id") or screen.addr.label)
    role = f" ({st['role']})" if st.get("role") else ""
    tel = f"  telemetry {screen.addr.telemetry}" if screen.addr.telemetry else ""
    lines = [f"== {name}{role}  control {screen.addr.control}{tel}"]

    def row(label: str, text: str) -> None:
        lines.append(f"  {label:<13}{text}")

    if not screen.connected:
        since = screen.down_since or now
        why = f": {screen.down_reason}" if screen.down_reason else ""
        row(
            "connection",
            f"UNREACHABLE for {duration(now - since)}{why}; waiting for it to come back",
        )
    if screen.error:
        row("error", screen.error)
    for notice in screen.notices:
        row("notice", notice)
    if not st:
        return lines
    state = str(st.get("state", "?"))
    age = _state_age(st, screen.values, now, screen.status_at)
    extras = []
    if "peer_connected" in st:
        peer = st.get("peer_id") or "peer"
        extras.append(f"peer {peer} {'connected' if st['peer_connected'] else 'DOWN'}")
    if "healthy" in st:
        extras.append("healthy" if st["healthy"] else "UNHEALTHY")
    if screen.telemetry_stale:
        extras.append("telemetry silent")
    stale_status = now - screen.status_at
    if not screen.connected or stale_status > 10:
        extras.append(f"status from {duration(stale_status)} ago")
    row("state", f"{state}{f' for {age}' if age else ''}   {'   '.join(extras)}".rstrip())
    block = _block_line(st, stats, screen.values, now, screen.status_at)
    if block:
        row("last block", block)
    rate = _first_number(stats.get("secret_key_rate_bps"))  # live, running exchange included
    if rate:
        row("key rate", _rate(rate))
    elif screen.measured_rate_bps is not None:
        row("key rate", f"{_rate(screen.measured_rate_bps)} (secret bits counted here)")
    elif state == "EXCHANGING":
        row("key rate", "measuring...")
    qber = _first_number(st.get("qber"), stats.get("qber"))
    if qber is not None:
        row("QBER", f"{qber * 100:.2f} %")
    store = _store_line(st, screen.addr)
    if store:
        row("key store", store)
    auth = _first_number(st.get("auth_key_balance_bits"), stats.get("auth_key_balance_bits"))
    if auth is not None:
        row("auth balance", f"{int(auth):,} bits")
    for text in _progress_lines(
        state, st=st, stats=stats, values=screen.values, addr=screen.addr, now=now
    ):
        row("progress", text)
    alarms = st.get("alarms")
    if isinstance(alarms, list):
        if not alarms:
            row("alarms", "none")
        for alarm in alarms:
            row("alarms" if alarm is alarms[0] else "", _alarm_line(alarm, now))
    elif "alarm" in screen.values:  # a node that does not list its active alarms
        ev = screen.values["alarm"]
        text = ev.payload.get("cause") or ev.payload.get("message") or ""
        kind = ev.payload.get("name") or ev.payload.get("alarm") or "?"
        what = f" {ev.payload['event']}" if isinstance(ev.payload.get("event"), str) else ""
        row("last alarm", f"{kind}{what} {duration(now - ev.ts)} ago: {text}")
    if topics:
        shown = {t: e for t, e in screen.values.items() if t.startswith(topics)}
        lines += ["  " + line for line in _topic_lines(shown, now)]
    return lines


def _first_number(*values: Any) -> float | None:
    for v in values:
        if isinstance(v, int | float) and not isinstance(v, bool):
            return float(v)
    return None


def _state_age(
    st: dict[str, Any], values: dict[str, TelemetryEvent], now: float, status_at: float
) -> str:
    since = st.get("state_since")
    if isinstance(since, int | float) and since > 0:
        return duration(now - float(since))
    ev = values.get("state")
    if ev is not None and str(ev.payload.get("new", "")) == str(st.get("state")):
        return duration(now - ev.ts)
    return ""


def _block_line(
    st: dict[str, Any],
    stats: dict[str, Any],
    values: dict[str, TelemetryEvent],
    now: float,
    status_at: float,
) -> str:
    last = stats.get("last_block") if isinstance(stats.get("last_block"), dict) else {}
    assert isinstance(last, dict)
    ev = values.get("block")
    info: dict[str, Any] = dict(last)
    age: float | None = None
    ev_id, last_id = (ev.payload.get("block_id") if ev else None), last.get("block_id")
    if ev is not None and (
        not last
        or ev_id == last_id
        or (isinstance(ev_id, int) and isinstance(last_id, int) and ev_id > last_id)
    ):
        # telemetry is newer than the last status poll, or tells the same block's outcome
        info = {**last, **ev.payload} if ev_id == last_id else dict(ev.payload)
        age = now - ev.ts
    since = st.get("seconds_since_last_block")
    if isinstance(since, int | float):
        age = float(since) + max(0.0, now - status_at)
    if not info:
        return f"none yet ({duration(age)} without a block)" if age is not None else ""
    parts = [f"#{info.get('block_id', '?')}"]
    if isinstance(info.get("ok"), bool):
        parts.append("ok" if info["ok"] else "ABORTED")
    if age is not None:
        parts.append(f"{duration(age)} ago")
    text = " ".join(parts)
    figures = []
    if isinstance(info.get("final_key_bits"), int | float):
        figures.append(f"{int(info['final_key_bits']):,} secret bits")
    qz, qx = info.get("qber_z"), info.get("qber_x")
    if isinstance(qz, int | float):
        q = f"QBER Z {qz * 100:.2f} %"
        if isinstance(qx, int | float):
            q += f" X {qx * 100:.2f} %"
        figures.append(q)
    counts = [
        f"{int(stats[k]):,} {label}"
        for k, label in (("blocks_ok", "ok"), ("blocks_aborted", "aborted"))
        if isinstance(stats.get(k), int) and stats[k]
    ]
    if counts:
        figures.append("blocks " + " / ".join(counts))
    return text + (": " + ", ".join(figures) if figures else "")


def _store_line(st: dict[str, Any], addr: NodeAddr) -> str:
    counts = st.get("keystore") if isinstance(st.get("keystore"), dict) else {}
    assert isinstance(counts, dict)
    fill = _first_number(st.get("keystore_fill_ratio"))
    available = counts.get("available")
    if fill is None and isinstance(available, int) and addr.max_key_count:
        fill = available / addr.max_key_count
    parts = []
    if isinstance(available, int):
        parts.append(f"{available:,} keys available")
    if fill is not None:
        parts.append(f"fill {fill * 100:.1f} %")
    others = [f"{k} {v:,}" for k, v in counts.items() if k != "available" and isinstance(v, int)]
    if others and parts:
        parts.append("(" + ", ".join(others) + ")")
    return "  ".join(parts)


def _progress_lines(
    state: str,
    *,
    st: dict[str, Any],
    stats: dict[str, Any],
    values: dict[str, TelemetryEvent],
    addr: NodeAddr,
    now: float,
) -> list[str]:
    out = []
    state_ev = values.get("state")
    entered = _first_number(st.get("state_since"))
    if entered is None and state_ev is not None and state_ev.payload.get("new") == state:
        entered = state_ev.ts
    if state in ("CALIBRATING", "SYNCHRONIZING"):
        noun = "calibration" if state == "CALIBRATING" else "synchronization"
        done = [
            f"{t.removeprefix('calibration.')} {'ok' if e.payload.get('ok', True) else 'FAILED'}"
            for t, e in sorted(values.items(), key=lambda kv: kv[1].seq)
            if (t.startswith("calibration") or t.startswith("sync"))
            and (entered is None or e.ts >= entered)
        ]
        running = f" for {duration(now - entered)}" if entered is not None else ""
        out.append(f"{noun} running{running}" + (f"; done: {', '.join(done)}" if done else ""))
    if state == "EXCHANGING":
        # receiver: detections read but not yet in a finished block = the blocks being
        # processed (whole blocks) + the block filling up
        read, used = stats.get("detections_read"), stats.get("detections")
        if isinstance(read, int) and isinstance(used, int) and read > used:
            ahead = read - used
            size = addr.block_detections
            if size:
                waiting, filling = divmod(ahead, size)
                text = f"block filling: {filling:,} / {size:,} detections ({filling / size:.0%})"
                if waiting:
                    text += f", {waiting} block{'s' if waiting > 1 else ''} in post-processing"
                out.append(text)
            else:
                out.append(f"{ahead:,} detections read, not yet in a finished block")
    for topic, ev in sorted(values.items()):
        if now - ev.ts > 60:
            continue
        p = ev.payload
        done_n, total = p.get("done"), p.get("total")
        frac = _first_number(p.get("fraction"), p.get("progress"))
        if isinstance(done_n, int | float) and isinstance(total, int | float) and total > 0:
            out.append(f"{topic} {done_n:g} / {total:g} ({100 * done_n / total:.0f} %)")
        elif frac is not None and 0 <= frac <= 1:
            out.append(f"{topic} {frac * 100:.0f} %")
    return out


def _alarm_line(alarm: Any, now: float) -> str:
    if not isinstance(alarm, dict):
        return str(alarm)
    sev = str(alarm.get("severity", "")).upper()
    name = alarm.get("name", "?")
    since = alarm.get("since")
    when = ""
    if isinstance(since, int | float):
        when = f" since {time.strftime('%H:%M:%S', time.localtime(since))}"
        when += f" ({duration(now - since)})"
    cause = alarm.get("cause") or ""
    return f"{sev + ' ' if sev else ''}{name}{when}{': ' + cause if cause else ''}"


def _rate(bps: float) -> str:
    for unit, scale in (("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.3g} {unit}"
    return f"{bps:.3g} bit/s"

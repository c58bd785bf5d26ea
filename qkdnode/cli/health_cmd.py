"""``qkdnode health``: is the node up and healthy? For monitoring checks.

Two ways to ask:

- ``--endpoint tcp://127.0.0.1:5550``: the ``status`` command on the control socket
  (through :mod:`qkdnode.client`); the node's own ``healthy`` flag decides;
- ``--metrics-url http://127.0.0.1:9464/metrics``: a scrape of the Prometheus endpoint;
  ``qkdnode_healthy`` decides (the active ``qkdnode_state`` when that series is absent).

``--config FILE`` takes both addresses from a node config: the control endpoint first
(when the node allows plaintext, or with ``--server-key``/``--client-key`` for CURVE),
then the metrics endpoint (when enabled) if the control socket does not answer. A node
with several links (``[[links]]``) is asked link by link and the worst link is reported
(its name as ``link=NAME`` in the line).
A node's ``status`` reply without a ``healthy`` field is judged by its state.

Output is one Nagios-style line, ``QKDNODE OK - state=running healthy=yes | perfdata``, or
a JSON object with ``--json``. Exit codes: 0 healthy, 1 unhealthy or unreachable, 2 usage;
with ``--nagios`` the plugin convention 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

from qkdnode.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE

OK, WARNING, CRITICAL, UNKNOWN = "OK", "WARNING", "CRITICAL", "UNKNOWN"
NAGIOS_CODES = {OK: 0, WARNING: 1, CRITICAL: 2, UNKNOWN: 3}

#: Healthy but worth a look (compared case-insensitively): reported as WARNING.
WARNING_STATES = frozenset({"connecting", "paused", "degraded"})
#: Judged unhealthy when the node does not say itself (no ``healthy`` field or series).
UNHEALTHY_STATES = frozenset({"offline", "fault", "shutdown"})

#: Perf data taken from a scrape: (metric family, label filter, perf data name).
_PERF_NAME = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass
class HealthResult:
    status: str
    source: str
    target: str
    state: str | None = None
    healthy: bool | None = None
    detail: str = ""
    perfdata: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status in (OK, WARNING)

    def line(self) -> str:
        parts = [f"QKDNODE {self.status} -"]
        if self.state is not None:
            parts.append(f"state={self.state}")
        if self.healthy is not None:
            parts.append(f"healthy={'yes' if self.healthy else 'no'}")
        if self.detail:
            parts.append(self.detail)
        text = " ".join(parts)
        if self.perfdata:
            text += " | " + " ".join(f"{k}={_fmt(v)}" for k, v in self.perfdata.items())
        return text

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def _classify(state: str | None, healthy: bool) -> str:
    if not healthy:
        return CRITICAL
    if state is not None and state.lower() in WARNING_STATES:
        return WARNING
    return OK


def _healthy_from_state(state: str | None) -> bool:
    return state is not None and state.lower() not in UNHEALTHY_STATES


def _perf_key(name: str) -> str:
    return _PERF_NAME.sub("_", name)


# -- via the control socket -------------------------------------------------------------


def check_control(
    endpoint: str,
    timeout_s: float,
    server_key: str | None = None,
    client_key: str | None = None,
) -> HealthResult:
    """Ask the node's control socket for ``status``.

    ``server_key`` (Z85 or ``.pub`` file) and ``client_key`` (secret key file of a client
    listed in the node's ``bus.clients``, role monitor) enable CURVE.
    """
    from qkdnode.client import Client

    try:
        with Client(endpoint, server_key, client_key, timeout_s=timeout_s) as client:
            reply = client.call("status")
    except Exception as exc:  # any failure to get an answer means "not healthy"
        return HealthResult(
            CRITICAL, "control", endpoint, detail=f"no answer: {type(exc).__name__}: {exc}"
        )
    if not isinstance(reply, dict):
        return HealthResult(
            UNKNOWN, "control", endpoint, detail=f"unexpected status reply {type(reply).__name__}"
        )
    raw_state = reply.get("state")
    state = str(raw_state) if raw_state is not None else None
    if state is None:
        return HealthResult(UNKNOWN, "control", endpoint, detail="status reply has no state")
    raw_healthy = reply.get("healthy")
    healthy = bool(raw_healthy) if raw_healthy is not None else _healthy_from_state(state)
    alarms = [
        (str(a.get("name", "?")), str(a.get("severity", "")))
        for a in reply.get("alarms") or []
        if isinstance(a, dict)
    ]
    perf: dict[str, float] = {}
    for key, value in reply.items():
        if (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and key != "pid"
        ):
            perf[_perf_key(str(key))] = float(value)
    status, detail = _with_alarms(_classify(state, healthy), alarms)
    return HealthResult(status, "control", endpoint, state, healthy, detail, perf)


def _with_alarms(status: str, alarms: list[tuple[str, str]]) -> tuple[str, str]:
    """Active alarms decide too: a critical one is CRITICAL, any other at least WARNING."""
    if not alarms:
        return status, ""
    if any(sev == "critical" for _, sev in alarms):
        status = CRITICAL
    elif status == OK:
        status = WARNING
    return status, "alarms: " + ",".join(f"{n}({sev})" for n, sev in alarms)


# -- via the metrics endpoint -----------------------------------------------------------


def check_metrics(url: str, timeout_s: float) -> HealthResult:
    """Scrape the Prometheus endpoint and judge the node from its state series."""
    from prometheus_client.parser import text_string_to_metric_families

    if not url.startswith(("http://", "https://")):
        return HealthResult(UNKNOWN, "metrics", url, detail="metrics URL must be http(s)://")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (scheme checked)
            body = resp.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        return HealthResult(CRITICAL, "metrics", url, detail=f"no answer: {reason}")
    try:
        families = {f.name: f for f in text_string_to_metric_families(body)}
    except ValueError as exc:
        return HealthResult(UNKNOWN, "metrics", url, detail=f"unparsable metrics: {exc}")

    state: str | None = None
    if "qkdnode_state" in families:
        for s in families["qkdnode_state"].samples:
            if s.value == 1:
                state = s.labels.get("state")
    if state is None:
        return HealthResult(UNKNOWN, "metrics", url, detail="no active qkdnode_state in the scrape")
    healthy_family = families.get("qkdnode_healthy")
    if healthy_family is not None and healthy_family.samples:
        healthy = healthy_family.samples[0].value == 1
    else:
        healthy = _healthy_from_state(state)

    perf: dict[str, float] = {}

    def take(family: str, prefix: str, label: str | None = None) -> None:
        f = families.get(family)
        if f is None:
            return
        for s in f.samples:
            if s.name != family or not math.isfinite(s.value):
                continue
            key = prefix if label is None else f"{prefix}_{s.labels.get(label, '')}"
            perf[_perf_key(key)] = s.value

    take("qkdnode_secret_key_rate_bits_per_second", "secret_key_rate_bps")
    take("qkdnode_sifted_key_rate_bits_per_second", "sifted_key_rate_bps")
    take("qkdnode_qber_ratio", "qber", "basis")
    take("qkdnode_keystore_fill_ratio", "keystore_fill")
    take("qkdnode_auth_key_balance_bits", "auth_balance_bits")
    up_family = families.get("qkdnode_instrument_up")
    down = [
        s.labels.get("instrument", "?")
        for s in (up_family.samples if up_family is not None else [])
        if s.value != 1
    ]
    detail = f"instruments down: {','.join(sorted(down))}" if down else ""
    status = _classify(state, healthy)
    if down and status == OK:
        status = WARNING
    alarm_family = families.get("qkdnode_alarm_active")
    alarms = [
        (s.labels.get("alarm", "?"), s.labels.get("severity", ""))
        for s in (alarm_family.samples if alarm_family is not None else [])
        if s.value == 1
    ]
    status, alarm_detail = _with_alarms(status, alarms)
    detail = " ".join(x for x in (detail, alarm_detail) if x)
    return HealthResult(status, "metrics", url, state, healthy, detail, perf)


# -- command ----------------------------------------------------------------------------


def register(sub: Any) -> None:
    p = sub.add_parser(
        "health",
        help="check that a node answers and is healthy (for monitoring)",
        description="Exit 0 when the node answers and reports itself healthy.",
    )
    p.add_argument("--endpoint", help="control endpoint, e.g. tcp://127.0.0.1:5550")
    p.add_argument("--metrics-url", help="metrics URL, e.g. http://127.0.0.1:9464/metrics")
    p.add_argument("--server-key", help="node's CURVE public key (Z85 or .pub file) for --endpoint")
    p.add_argument(
        "--client-key",
        help="CURVE secret key file of this monitoring client (listed in the node's "
        "bus.clients with role monitor)",
    )
    p.add_argument(
        "--config",
        help="node config (path or bare name in $CONFIGURATION_DIRECTORY) to take the "
        "endpoints from",
    )
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of a line")
    p.add_argument(
        "--nagios",
        action="store_true",
        help="Nagios exit codes: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN",
    )
    p.set_defaults(func=_health)


#: Severity order for a node with several links: the worst link decides.
_SEVERITY = {OK: 0, WARNING: 1, UNKNOWN: 2, CRITICAL: 3}

Targets = list[tuple[str, str]]


def _targets(args: argparse.Namespace) -> tuple[list[tuple[str, Targets]], str | None]:
    """One ``(link, [(kind, target), ...])`` per link to judge (the targets of a link are
    tried in order; link "" for a one-link node), or an error message."""
    targets: Targets = []
    if args.endpoint:
        targets.append(("control", args.endpoint))
    if args.metrics_url:
        targets.append(("metrics", args.metrics_url))
    if targets:
        return [("", targets)], None
    if not args.config:
        return [], "give --endpoint, --metrics-url or --config"
    from qkdnode.config import ConfigError, load_site
    from qkdnode.paths import PathResolutionError, config_path

    try:
        site = load_site(config_path(args.config))
    except (ConfigError, PathResolutionError) as exc:
        return [], str(exc)
    groups: list[tuple[str, Targets]] = []
    for link in site.links:  # a node with several links is healthy when every link is
        cfg = link.cfg
        targets = []
        if cfg.bus.allow_plaintext or args.server_key:
            targets.append(("control", cfg.bus.control_endpoint))
        if cfg.metrics.enabled:
            host = cfg.metrics.listen_host
            host = f"[{host}]" if ":" in host else host
            targets.append(("metrics", f"http://{host}:{cfg.metrics.listen_port}/metrics"))
        if not targets:
            where = f"link {link.id!r} of " if link.id else ""
            return [], (
                f"{where}the node uses CURVE (give --server-key and --client-key) and its "
                "metrics endpoint is disabled"
            )
        groups.append((link.id, targets))
    return groups, None


def _health(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        return _emit(
            args, HealthResult(UNKNOWN, "", "", detail="--timeout must be > 0"), usage=True
        )
    groups, error = _targets(args)
    if error is not None:
        return _emit(args, HealthResult(UNKNOWN, "", "", detail=error), usage=True)
    worst: HealthResult | None = None
    for link, targets in groups:
        result: HealthResult | None = None
        for kind, target in targets:
            if kind == "control":
                result = check_control(target, args.timeout, args.server_key, args.client_key)
            else:
                result = check_metrics(target, args.timeout)
            if result.state is not None:
                break  # an answer (good or bad) settles it; no answer tries the next target
        assert result is not None
        if link:
            result.detail = f"link={link}" + (f" {result.detail}" if result.detail else "")
        if worst is None or _SEVERITY[result.status] > _SEVERITY[worst.status]:
            worst = result
    assert worst is not None
    return _emit(args, worst)


def _emit(args: argparse.Namespace, result: HealthResult, *, usage: bool = False) -> int:
    if args.json:
        print(json.dumps(result.as_dict(), sort_keys=True))
    else:
        print(result.line())
    if args.nagios:
        return NAGIOS_CODES[result.status]
    if usage:
        return EXIT_USAGE
    return EXIT_OK if result.ok else EXIT_FAILURE

"""A standalone bus server with a small command table, for client developers and tests.

``python -m qkdnode.bus.devserver --plaintext --plaintext-role operator`` serves control
and telemetry on loopback with commands that behave like the daemon's (``status``,
``start``, ``stop``, ``calibrate``, ``sync``, ``keys.get`` with the daemon's content
models and reply field names) plus ``echo`` and ``sleep``, over an in-memory state
(``idle`` -> ``running`` ...; the daemon's states are upper case). Handy to develop a
client in another language against docs/protocol.md without instruments. Like the
daemon, a plaintext bus gives every caller the role ``monitor`` unless
``--plaintext-role operator`` is given. Prints one JSON line with the bound endpoints
once it is ready, then serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from typing import Any

import zmq
import zmq.asyncio
from pydantic import BaseModel, ConfigDict, Field

from qkdnode.bus.commands import (
    CallerInfo,
    CommandSpec,
    CommandTable,
    Content,
    KeysGetContent,
)
from qkdnode.bus.control import ControlServer
from qkdnode.bus.errors import CommandError, ErrorCode
from qkdnode.bus.keys import load_secret_key
from qkdnode.bus.telemetry import TelemetryPublisher
from qkdnode.config.sections import BusSection, CurveClient
from qkdnode.log import configure_logging

#: key size of ``keys.get`` without ``size_bits`` (the daemon uses keystore.key_size_bits)
DEFAULT_KEY_SIZE_BITS = 256


class EchoContent(BaseModel):
    """Content of ``echo``: any JSON object, returned as it came."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{"a": [1, 2]}]})


class SleepContent(Content):
    """Content of ``sleep``."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"seconds": 0.5}]})

    seconds: float = Field(ge=0, le=600, description="how long the handler waits")


class DevNode:
    """In-memory node state and real async handlers (no instruments)."""

    def __init__(self, telemetry: TelemetryPublisher | None) -> None:
        self.state = "idle"
        self.telemetry = telemetry
        self.calibrations = 0
        self.started_at = time.time()

    def _set(self, new: str, event: str) -> None:
        old, self.state = self.state, new
        if self.telemetry is not None:
            self.telemetry.publish(
                "state", {"old": old, "new": new, "event": event, "reason": "devserver"}
            )

    async def status(self, content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
        return {
            "state": self.state,
            "uptime_s": time.time() - self.started_at,
            "calibrations": self.calibrations,
            "pid": os.getpid(),
        }

    async def start(self, content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
        self._set("running", "exchange")
        return {"state": self.state}

    async def stop(self, content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
        self._set("idle", "stop")
        return {"state": self.state}

    async def calibrate(self, content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
        self._set("calibrating", "calibrate")
        try:
            await asyncio.sleep(0.05)
            self.calibrations += 1
            result = {"ok": True, "steps": ["bias", "peak", "delay"], "n": self.calibrations}
            if self.telemetry is not None:
                self.telemetry.publish("calibration.devserver", result)
        finally:
            self._set("idle", "calibrated")
        return result

    async def sync(self, content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"synchronized": True, "offset_ps": 0}

    async def keys_get(self, content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
        if self.state != "running":
            raise CommandError(
                "no key available", code=ErrorCode.NO_KEY, details={"state": self.state}
            )
        n = int(content["number"])
        size = int(content["size_bits"] or DEFAULT_KEY_SIZE_BITS)
        return {
            "keys": [
                {
                    "key_ID": str(uuid.uuid4()),
                    "key": base64.b64encode(os.urandom(size // 8)).decode(),
                }
                for _ in range(n)
            ]
        }

    async def echo(self, content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
        return content

    async def sleep(self, content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
        await asyncio.sleep(float(content["seconds"]))
        return {"slept_s": content["seconds"]}

    def table(self) -> CommandTable:
        running = frozenset({"running"})
        return CommandTable(
            [
                CommandSpec("status", self.status, None, "monitor"),
                CommandSpec("start", self.start, frozenset({"idle"}), "operator"),
                CommandSpec("stop", self.stop, frozenset({"running", "calibrating"}), "operator"),
                CommandSpec("calibrate", self.calibrate, frozenset({"idle"}), "operator"),
                CommandSpec("sync", self.sync, frozenset({"idle", "running"}), "operator"),
                CommandSpec(
                    "keys.get",
                    self.keys_get,
                    running,
                    "operator",
                    KeysGetContent,
                    errors=(ErrorCode.NO_KEY,),
                ),
                CommandSpec("echo", self.echo, None, "monitor", EchoContent),
                CommandSpec("sleep", self.sleep, None, "monitor", SleepContent),
            ]
        )


async def serve(
    bus: BusSection, secret: bytes | None, telemetry_hz: float, ready: Any = None
) -> None:
    ctx = zmq.asyncio.Context()
    pub = TelemetryPublisher(ctx, bus, secret)
    node = DevNode(pub)
    server = ControlServer(
        ctx,
        bus,
        node.table(),
        lambda: node.state,
        secret,
        telemetry=pub,
        server_name="qkdnode-devserver",
    )
    await pub.start()
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    info = {"control": server.endpoint, "telemetry": pub.endpoint, "pid": os.getpid()}
    if ready is not None:
        ready(info)
    else:
        print(json.dumps(info), flush=True)

    async def rates() -> None:
        n = 0
        while telemetry_hz > 0:
            n += 1
            rate = 2.5e4 + n % 100
            pub.publish("rates", {"detector_count_rate_hz": [rate, rate, rate, rate]})
            await asyncio.sleep(1.0 / telemetry_hz)

    rate_task = asyncio.create_task(rates())
    try:
        await stop.wait()
    finally:
        rate_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await rate_task
        await server.stop()
        await pub.stop()
        ctx.term()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qkdnode.bus.devserver", description=__doc__)
    p.add_argument("--control", default="tcp://127.0.0.1:0")
    p.add_argument("--telemetry", default="tcp://127.0.0.1:0")
    p.add_argument("--plaintext", action="store_true")
    p.add_argument("--plaintext-role", default="monitor", choices=["monitor", "operator"])
    p.add_argument("--secret-key", help="server secret key file (CURVE)")
    p.add_argument("--client", action="append", default=[], metavar="NAME:ROLE:PUBKEY")
    p.add_argument("--rate-limit", type=float, default=5000.0)
    p.add_argument("--max-frame", type=int, default=256 * 1024)
    p.add_argument("--telemetry-hz", type=float, default=0.0)
    p.add_argument("--heartbeat-s", type=float, default=1.0)
    args = p.parse_args(argv)
    configure_logging("warning")
    clients = []
    for item in args.client:
        name, role, key = item.split(":", 2)
        clients.append(CurveClient(name=name, role=role, public_key=key))  # type: ignore[arg-type]
    bus = BusSection(
        control_endpoint=args.control,
        telemetry_endpoint=args.telemetry,
        allow_plaintext=args.plaintext,
        plaintext_role=args.plaintext_role,
        clients=clients,
        client_rate_limit_per_s=args.rate_limit,
        max_control_frame_bytes=args.max_frame,
        heartbeat_interval_s=args.heartbeat_s,
    )
    secret = load_secret_key(args.secret_key) if args.secret_key else None
    asyncio.run(serve(bus, secret, args.telemetry_hz))
    return 0


if __name__ == "__main__":
    sys.exit(main())

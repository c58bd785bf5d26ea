"""Socket options shared by the bus servers and clients (security, limits, heartbeats)."""

from __future__ import annotations

from typing import Any, cast

import structlog
import zmq

log = structlog.get_logger(__name__)


def make_curve_server(sock: zmq.Socket[Any], secret_key: bytes, domain: str) -> None:
    """CURVE server with ZAP ``domain``; refuse handshakes if no ZAP handler answers."""
    sock.curve_secretkey = secret_key
    sock.curve_publickey = zmq.curve_public(secret_key)
    sock.curve_server = True
    sock.zap_domain = domain.encode()
    try:
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    except (zmq.ZMQError, AttributeError):
        pass  # libzmq without the option: our ZAP handler is bound before any bind()


def make_curve_client(
    sock: zmq.Socket[Any], server_public: bytes, client_public: bytes, client_secret: bytes
) -> None:
    sock.curve_serverkey = server_public
    sock.curve_publickey = client_public
    sock.curve_secretkey = client_secret


def set_heartbeat(sock: zmq.Socket[Any], interval_s: float, liveness: int) -> None:
    """ZMTP-level heartbeats so a vanished TCP peer is dropped by libzmq itself."""
    ivl_ms = max(100, int(interval_s * 1000))
    sock.setsockopt(zmq.HEARTBEAT_IVL, ivl_ms)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, ivl_ms * max(1, liveness))
    sock.setsockopt(zmq.HEARTBEAT_TTL, ivl_ms * max(1, liveness))


def warn_plaintext(component: str, endpoint: str) -> None:
    log.warning(
        "bus.plaintext",
        component=component,
        endpoint=endpoint,
        note="CURVE disabled by bus.allow_plaintext; for local tests only",
    )


def bound_endpoint(sock: zmq.Socket[Any]) -> str:
    """The endpoint a socket actually listens on (resolves ``:0`` random ports)."""
    last = sock.getsockopt(zmq.LAST_ENDPOINT)
    return last.decode() if isinstance(last, bytes) else str(last)


def events(sock: zmq.Socket[Any]) -> int:
    """``ZMQ_EVENTS`` (POLLIN/POLLOUT bits); the FD is edge-triggered, so check this."""
    return cast(int, sock.getsockopt(zmq.EVENTS))


_RCVMORE = int(zmq.RCVMORE)


def receive_capped(
    sock: zmq.Socket[bytes], *, first_flags: int, plaintext: bool, max_frames: int
) -> tuple[list[bytes], int, str | None]:
    """Every frame of one message on a ROUTER: (the first ``max_frames`` frames, how many
    there were, the sender's ZAP ``User-Id`` or None). ``first_flags`` go to the first
    ``recv`` (``zmq.NOBLOCK`` raises ``zmq.Again`` when nothing waits); the rest of a
    multipart message is already there. Plaintext sockets carry no ``User-Id``."""
    user_id: str | None = None
    if plaintext:
        frames: list[bytes] = [sock.recv(first_flags)]
        count = 1
        while sock.getsockopt(_RCVMORE):
            part = sock.recv()
            count += 1
            if count <= max_frames:
                frames.append(part)
        return frames, count, None
    frames = [sock.recv(flags=first_flags, copy=False).bytes]
    count = 1
    while sock.getsockopt(_RCVMORE):
        zframe = sock.recv(copy=False)
        count += 1
        if user_id is None:
            uid = zframe.get("User-Id")
            user_id = uid if isinstance(uid, str) else None
        if count <= max_frames:
            frames.append(zframe.bytes)
    return frames, count, user_id

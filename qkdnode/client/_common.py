"""Socket set-up shared by the blocking and asyncio clients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import zmq

from qkdnode.bus.keys import generate_keypair, is_z85_key, load_keypair, load_public_key
from qkdnode.bus.sockets import make_curve_client

KeyLike = bytes | str | Path
KeyPair = tuple[bytes, bytes]


def server_key(value: KeyLike | None) -> bytes | None:
    """A server public key given as Z85 bytes/str or as a ``.pub`` file path."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii")
    if isinstance(value, str) and is_z85_key(value.strip()):
        return value.strip().encode("ascii")
    return load_public_key(value)


def client_keypair(value: KeyPair | KeyLike | None) -> KeyPair:
    """``(public, secret)`` from a tuple, a secret key file, or a fresh throw-away pair."""
    if value is None:
        return generate_keypair()
    if isinstance(value, tuple):
        public, secret = value
        return public, secret
    return load_keypair(value.decode() if isinstance(value, bytes) else value)


def connect(sock: zmq.Socket[Any], endpoint: str) -> None:
    """``sock.connect(endpoint)``; a malformed endpoint is a :class:`ValueError` that names it
    (libzmq only says "Invalid argument"). The socket is closed on failure."""
    try:
        sock.connect(endpoint)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise ValueError(
            f"invalid endpoint {endpoint!r} ({exc.strerror}): "
            "expected tcp://HOST:PORT or ipc://PATH"
        ) from None


def configure(
    sock: zmq.Socket[Any],
    server_public: bytes | None,
    keys: KeyPair | None,
    max_frame_bytes: int,
    reconnect_max_s: float,
) -> None:
    sock.linger = 0
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
    sock.reconnect_ivl = 100
    sock.reconnect_ivl_max = int(reconnect_max_s * 1000)
    if server_public is not None:
        assert keys is not None
        make_curve_client(sock, server_public, keys[0], keys[1])

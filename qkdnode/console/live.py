"""Live updates of the console: one fan-out of server-sent events to every open page.

The console pushes what it hears (telemetry of each link, the overview rows it computes
every :data:`LIVE_INTERVAL_S`); pages never poll. Each page has a bounded queue: a page
that falls :data:`QUEUE_EVENTS` events behind is cut off (its browser reconnects and
starts again from a fresh overview) rather than let the node's memory grow. At most
:data:`MAX_SUBSCRIBERS` pages listen at once; one more is refused.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

#: events a page may fall behind before it is cut off
QUEUE_EVENTS = 512
#: pages listening at once
MAX_SUBSCRIBERS = 32
#: seconds between two overview pushes
LIVE_INTERVAL_S = 2.0
#: seconds between keep-alive comments on an idle stream
KEEPALIVE_S = 5.0


class TooManySubscribers(Exception):
    """:data:`MAX_SUBSCRIBERS` pages already listen."""


class Subscription:
    """One page's stream: ``next()`` gives encoded SSE frames; None once cut off."""

    def __init__(self, hub: LiveHub) -> None:
        self._hub = hub
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_EVENTS)
        self.cut_off = False

    def offer(self, frame: bytes) -> None:
        if self.cut_off:
            return
        try:
            self.queue.put_nowait(frame)
        except asyncio.QueueFull:
            self.cut_off = True
            # make room for the end marker: the page reconnects
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(None)

    async def next(self, timeout_s: float) -> bytes | None:
        """The next frame, a keep-alive comment after ``timeout_s`` of silence, or None
        when the stream is cut off."""
        try:
            return await asyncio.wait_for(self.queue.get(), timeout_s)
        except TimeoutError:
            return b": keep-alive\n\n"

    def close(self) -> None:
        self._hub.unsubscribe(self)


class LiveHub:
    """The console's subscribers and what is published to them."""

    def __init__(self, max_subscribers: int = MAX_SUBSCRIBERS) -> None:
        self._subs: set[Subscription] = set()
        self._max = max_subscribers
        self.published = 0

    def subscribe(self) -> Subscription:
        if len(self._subs) >= self._max:
            raise TooManySubscribers(f"{self._max} pages already listen")
        sub = Subscription(self)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def push(self, event: str, data: Any) -> None:
        """Send ``data`` (JSON-able) as SSE event ``event`` to every page."""
        if not self._subs:
            return
        frame = sse_frame(event, data)
        self.published += 1
        for sub in list(self._subs):
            sub.offer(frame)


def sse_frame(event: str, data: Any) -> bytes:
    """One server-sent event; ``data`` as one line of JSON (NaN refused)."""
    body = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return f"event: {event}\ndata: {body}\n\n".encode()

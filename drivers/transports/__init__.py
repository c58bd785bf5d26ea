"""Transports: the byte or message pipes between a driver and its instrument.

Each transport owns one lock (``transport.lock``) so that concurrent callers cannot
interleave a request and its reply, and reopens a lost connection with backoff.
"""

from drivers.transports.base import MessageTransport, reopen_with_backoff

__all__ = ["MessageTransport", "reopen_with_backoff"]
